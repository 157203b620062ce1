"""Issue 12 (shared use): typed HTML shown as text, private endpoints, input checks, failed loads."""

import gradio as gr
import pytest

from ui import chat_history as ch
from ui.chatbot import ChatHistoryData, LiteralChatbot

PAYLOADS = [
    "<script>alert(1)</script>",
    "<img src=x onerror=alert(1)>",
    "<svg onload=alert(1)>",
    "```\n<div>code</div>\n```\n  indented **bold** &lt; \\\\ \\< $$x$$",
]


@pytest.mark.parametrize("text", PAYLOADS + ["plain words", ""])
def test_literal_markdown_round_trips_and_hides_every_tag(text):
    shown = ch.to_literal_markdown(text)
    assert ch.is_literal_markdown(shown)
    assert ch.from_literal_markdown(shown) == text
    # No unescaped "<", backtick or "$$" is left for Markdown, HTML or LaTeX to act on.
    assert "<" not in shown.replace("\\<", "") and "`" not in shown.replace("\\`", "") and "$$" not in shown


def test_raw_text_from_an_api_client_is_kept_as_is():
    assert ch.from_literal_markdown("What is 2+2? <b>") == "What is 2+2? <b>"


def test_the_chatbot_escapes_user_messages_for_the_browser_and_unescapes_them_for_handlers():
    bot = LiteralChatbot()
    history = [{"role": "user", "content": PAYLOADS[1]}, {"role": "assistant", "content": "**Hi** <b>x</b>"},
               {"role": "user", "content": "  indented\n  twice"}]
    wire = bot.postprocess(history)
    texts = [m.content[0].text for m in wire.root]
    assert texts[0] == ch.to_literal_markdown(PAYLOADS[1])
    assert texts[1] == "**Hi** <b>x</b>"  # answers stay Markdown (Gradio sanitizes them)
    back = bot.preprocess(ChatHistoryData.model_validate(wire.model_dump()))
    assert [ch.content_text(m["content"]) for m in back] == [PAYLOADS[1], "**Hi** <b>x</b>", "  indented\n  twice"]


def test_the_history_format_accepts_plain_strings_and_refuses_garbage_clearly():
    data = ChatHistoryData.model_validate([{"role": "user", "content": "Hi"}])
    assert data.root[0].content[0].text == "Hi"
    for bad in ["Hi", [{"role": "robot", "content": "x"}], [{"role": "user", "content": 3}], ["x"]]:
        with pytest.raises(gr.Error) as e:
            ChatHistoryData.model_validate(bad)
        assert "message" in str(e.value).lower() or "content" in str(e.value)


@pytest.mark.slow
def test_only_the_chat_is_public_api_and_it_explains_bad_input(app_url, embedded_engine):
    from gradio_client import Client

    client = Client(app_url, verbose=False)
    assert set(client.view_api(print_info=False, return_format="dict")["named_endpoints"]) == {"/answer"}
    before = embedded_engine.loaded
    for name in ("/load", "/fit_check", "/memory", "/compare", "/compare_batch", "/quality_check", "/load_2"):
        with pytest.raises(Exception):
            client.predict("smollm2-135m-instruct", "4bit", False, None, 512, "en", api_name=name)
    # Not over plain HTTP either.
    import httpx

    reply = httpx.post(f"{app_url}gradio_api/call/load", json={"data": ["smollm2-135m-instruct", "4bit", False, None, 512, "en"]})
    assert reply.status_code == 404 and "not part of this app's API" in reply.text, reply.text
    answer = httpx.post(f"{app_url}gradio_api/call/answer", json={"data": [[{"role": "user", "content": "Hi"}]]})
    assert answer.status_code == 200 and "event_id" in answer.text  # the public endpoint still answers
    assert embedded_engine.loaded is before  # nothing was switched by an API caller
    # Plain-string content (OpenAI style) is accepted ...
    history = client.predict([{"role": "user", "content": "What is the capital of France?"}], api_name="/answer")
    assert any("Paris" in str(m["content"]) for m in history if m["role"] == "assistant")
    # ... and a malformed history gets a sentence, not "upstream Gradio app has raised an exception".
    with pytest.raises(Exception) as e:
        client.predict([{"role": "user", "content": 42}], api_name="/answer")
    assert "content must be a string or a list of parts" in str(e.value)


@pytest.fixture()
def handlers(catalog, tiny_llama):
    from models.engine import Engine
    from models.loading import LoadSettings
    from ui.handlers import ChatHandlers

    engine = Engine(catalog)
    engine.load(str(tiny_llama), LoadSettings(context_tokens=512))
    return ChatHandlers(engine)


@pytest.mark.parametrize("temperature, top_p, max_new, says", [
    (0.2, 0.9, 0, "Max new tokens must be a whole number from 1 to 4096 (got 0)"),
    (0.2, 0.9, -5, "Max new tokens must be a whole number from 1 to 4096 (got -5)"),
    (0.2, 0.9, "abc", "(got abc)"),
    (0.2, 0.9, 2.5, "whole number"),
    (0.2, 0.9, 10 ** 9, "from 1 to 4096"),
    (-1, 0.9, 8, "Temperature (0 = greedy) must be a number from 0 to 2"),
    (float("nan"), 0.9, 8, "Temperature"),
    (0.2, 0, 8, "Top-p must be a number from 0.05 to 1"),
    (0.2, None, 8, "Top-p"),
])
def test_a_bad_number_is_refused_in_the_chat_and_the_message_stays(handlers, temperature, top_p, max_new, says):
    from ui.handlers import ChatSession

    session = ChatSession()
    before = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    msg, history = handlers.submit("Next question", before, session, "en", temperature, top_p, max_new)
    assert msg == "Next question"  # still in the box
    assert history[:2] == before and len(history) == 3 and says in history[2]["metadata"]["title"]
    # The chained answer finds no new question: nothing is generated.
    assert list(handlers.answer(history, "", temperature, top_p, max_new, session, "en")) == [history]
    # An API caller sending the same numbers to /answer gets the same sentence and no answer.
    asked = before + [{"role": "user", "content": "Next question"}]
    out = list(handlers.answer(asked, "", temperature, top_p, max_new, session, "en"))
    assert len(out) == 1 and out[0][:3] == asked and says in out[0][3]["metadata"]["title"]


def test_bad_numbers_are_refused_in_chinese_too(handlers):
    from ui.handlers import ChatSession

    _, history = handlers.submit("你好", [], ChatSession(), "zh", 0.2, 0.9, 0)
    assert "最多生成 token 数必须是 1 到 4096 之间的整数" in history[-1]["metadata"]["title"]


def test_load_and_fit_check_refuse_a_bad_context_length_clearly(handlers):
    before = handlers.engine.loaded
    for bad in (0, -5, "abc", None):
        status, _, model_box, _ = handlers.load("smollm2-135m-instruct", "none", False, None, bad, "en",
                                                progress=lambda *a, **k: None)
        assert model_box == handlers.engine.loaded.ref.label
        assert "Context length to plan for (tokens) must be a whole number from 256 to 32768" in status
        assert "Context length" in handlers.fit_check("smollm2-135m-instruct", "none", False, None, bad, "en")
    assert handlers.engine.loaded is before


def test_a_too_long_message_fails_clearly_is_not_sent_again_and_goes_back_to_the_box(handlers):
    from ui.handlers import ChatSession

    session = ChatSession()
    history = run(handlers, [{"role": "user", "content": "Hello"}], session)
    # 100,000 characters are over the message size limit: refused before entering the chat, kept in the box.
    msg, same = handlers.submit("word " * 20_000, history, session, "en", 0, 0.9, 8)
    assert msg == "word " * 20_000 and same[:-1] == history and "the limit is 50,000" in same[-1]["metadata"]["title"]
    # Under that limit but over the 512-token context: the model refuses it.
    huge = "word " * 2_000
    msg, history = handlers.submit(huge, history, session, "en", 0, 0.9, 8)
    history = run(handlers, history, session)
    error = history[-1]["metadata"]["title"]
    assert "Your message alone needs" in error
    allowed = int(error.split("the context allows ")[1].split(".")[0])
    unsent = [m for m in history if m["role"] == "user" and m.get("metadata")]
    assert len(unsent) == 1 and unsent[0]["content"] == huge  # kept, marked, not lost
    assert huge not in [m["content"] for m in ch.model_messages(history)]
    # The page puts it back into the (empty) box, never over what is typed there.
    assert handlers.restore_unsent(history, "draft") == gr.skip()
    assert handlers.restore_unsent(history, "") == huge
    # Later turns work as usual: no "context full" notice, an answer and metrics.
    _, later = handlers.submit("And now?", history, session, "en", 0, 0.9, 8)
    later = run(handlers, later, session)
    assert "TTFT" in later[-1]["metadata"]["title"]
    assert not any("Context full" in (m.get("metadata") or {}).get("title", "") for m in later)
    assert handlers.restore_unsent(later, "") == gr.skip()  # a later turn: nothing to put back
    # When a long chat really does overflow, the notice gives the same limit the error gave.
    long_turns = []
    for i in range(6):
        long_turns += [{"role": "user", "content": f"question {i} " + "word " * 60},
                       {"role": "assistant", "content": "answer " * 60}]
    out = run(handlers, long_turns + [{"role": "user", "content": "last"}], session)
    notice = [m["metadata"]["title"] for m in out if "Context full" in (m.get("metadata") or {}).get("title", "")]
    assert notice and f"({allowed} tokens allowed)" in notice[0], (notice, allowed)


def run(handlers, history, session):
    return list(handlers.answer(history, "", 0, 0.9, 8, session, "en"))[-1]


def test_sampling_defaults_come_from_the_model_then_the_catalog_then_the_app(catalog):
    from transformers import GenerationConfig

    from models.generation import sampling_defaults

    smol = catalog.get("smollm2-135m-instruct")
    card = sampling_defaults(GenerationConfig(), smol)  # transformers 5: no values unless the file sets them
    assert (card.temperature, card.top_p, card.source) == (0.2, 0.5, "catalog")
    own = sampling_defaults(GenerationConfig(do_sample=True, temperature=0.6, top_p=0.8), smol)
    assert (own.temperature, own.top_p, own.source) == (0.6, 0.8, "generation_config")
    half = sampling_defaults(GenerationConfig(do_sample=True, temperature=0.3), smol)
    assert (half.temperature, half.top_p, half.source) == (0.3, 0.5, "generation_config")  # top-p from the catalog
    greedy = sampling_defaults(GenerationConfig(do_sample=False, top_p=0.8), None)
    assert greedy.temperature == 0.0
    app = sampling_defaults(None, catalog.get("qwen2.5-7b-instruct"))
    assert (app.temperature, app.top_p, app.source) == (0.7, 0.9, "app")


def test_the_sliders_follow_the_models_defaults_once_per_model_and_say_where_from(catalog, tiny_llama, tmp_path):
    import shutil

    from transformers import GenerationConfig

    from models.engine import Engine
    from models.loading import LoadSettings
    from ui.handlers import ChatHandlers, ChatSession

    own = tmp_path / "own"
    shutil.copytree(tiny_llama, own)
    GenerationConfig(do_sample=True, temperature=0.35, top_p=0.85).save_pretrained(own)
    engine = Engine(catalog)
    engine.load(str(own), LoadSettings(context_tokens=512))
    handlers, session = ChatHandlers(engine), ChatSession()
    temperature, top_p, note = handlers.apply_sampling_defaults(session, "en")
    assert (temperature, top_p) == (0.35, 0.85) and "generation_config.json" in note and "0.35" in note
    # Again for the same model: the user's own slider values are left alone, the note stays.
    assert handlers.apply_sampling_defaults(session, "zh")[:2] == (gr.skip(), gr.skip())
    assert "默认采样" in handlers.apply_sampling_defaults(session, "zh")[2]
    engine.load(str(tiny_llama), LoadSettings(context_tokens=512))  # no generation_config values, no catalog entry
    temperature, top_p, note = handlers.apply_sampling_defaults(session, "en")
    assert (temperature, top_p) == (0.7, 0.9) and "the app's own" in note
    # Values given on the command line are kept whatever the model.
    handlers.fixed_sampling = (0.0, 0.9)
    assert handlers.apply_sampling_defaults(ChatSession(), "en") == (gr.skip(), gr.skip(),
                                                                      handlers.apply_sampling_defaults(session, "en")[2])
    assert "command line" in handlers.apply_sampling_defaults(session, "en")[2]


def test_chinese_mode_covers_the_language_label_table_headers_quant_reasons_and_cpu_name(catalog):
    from models.hardware import MemorySnapshot
    from models.quant import quant_options
    from ui.compare_handlers import TABLE_HEADERS, table_headers
    from ui.i18n import explain_quant, t
    from ui.panels import memory_panel_html

    assert t("language", "zh") == "语言"
    assert table_headers("en") == TABLE_HEADERS
    zh = table_headers("zh")
    assert "配置" in zh and "回答" in zh and not set(zh) & {"config", "question", "answer", "score", "error"}
    options = quant_options("cpu") + quant_options("cuda", (7, 0)) + quant_options("cuda", (5, 0))
    unavailable = [o for o in options if not o.available]
    assert {o.why.code for o in unavailable} >= {"quant_int4_no_cuda", "quant_int4_old_gpu", "quant_bf16_old_gpu",
                                                 "quant_int8_old_gpu", "quant_nf4_old_gpu"}
    for o in unavailable:
        assert explain_quant(o, "en") == o.reason  # one table: the English is the engine's text word for word
        assert explain_quant(o, "zh") != o.reason and "需要" in explain_quant(o, "zh")
    snap = MemorySnapshot(device="cpu", device_name="CPU (no CUDA GPU found)", total=8 << 30, free=4 << 30,
                          weights=1 << 28, kv_cache=0, other_allocator=0, runtime=1 << 28, other_processes=1 << 30,
                          peak=0, ram_total=8 << 30, ram_available=4 << 30)
    panel = memory_panel_html(snap, "zh")
    assert "CPU（未检测到 CUDA 显卡）" in panel and "no CUDA GPU found" not in panel
    assert "CPU (no CUDA GPU found)" in memory_panel_html(snap, "en")


@pytest.mark.slow
def test_with_its_defaults_the_embedded_model_says_paris_every_time(embedded_engine):
    import threading

    from models.generation import SamplingSettings
    from ui.handlers import ChatHandlers

    d = ChatHandlers(embedded_engine).sampling_defaults()
    assert d.source == "catalog" and d.temperature > 0  # sampled, not greedy
    question = [{"role": "user", "content": "What is the capital of France?"}]
    answers = []
    for seed in range(10):
        *_, last = embedded_engine.chat(question, SamplingSettings(24, d.temperature, d.top_p, seed), threading.Event())
        answers.append(last.text)
    assert all("Paris" in a for a in answers), answers


NOISE = ["Failed to load", "_C_mxfp8", "_pytree", "register_constant", "Loading weights:", "it/s]", "s/it]",
         "pip install kernels", "de-quantizing GGUF tensors...:"]


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["none", "4bit"])
def test_the_cli_prints_only_its_own_progress_and_the_answer(quant):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, str(root / "app.py"), "--ask", "hi", "--temperature", "0",
                             "--max-new-tokens", "8", "--quant", quant], capture_output=True, text=True, timeout=400,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=root)
    assert result.returncode == 0, result.stderr
    assert [n for n in NOISE if n in result.stderr] == [], result.stderr
    assert "[100%] Loaded" in result.stderr and "metrics: TTFT" in result.stderr and result.stdout.strip()


@pytest.mark.parametrize("argv, env, message", [
    (["--host", "0.0.0.0"], {}, "--host 0.0.0.0 makes the app reachable from other machines"),
    (["--host", "192.168.1.5"], {}, "give --auth USER:PASS (or set SMALLCHAT_AUTH=USER:PASS)"),
    (["--host", "myhost.lan"], {}, "--auth"),
    (["--share"], {}, "--share publishes the app on a public link"),
    (["--host", "0.0.0.0", "--auth", "alice"], {}, "must be USER:PASS"),
    (["--host", "0.0.0.0"], {"SMALLCHAT_AUTH": ":nopass"}, "must be USER:PASS"),
    (["--max-message-chars", "0"], {}, "--max-message-chars must be at least 1"),
])
def test_exposing_the_app_needs_a_password(argv, env, message, capsys, monkeypatch):
    import app

    monkeypatch.delenv("SMALLCHAT_AUTH", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SystemExit):
        app.parse_args(argv)
    assert message in capsys.readouterr().err


def test_launch_options_say_how_the_app_is_served_and_never_print_the_password(monkeypatch):
    import app

    monkeypatch.delenv("SMALLCHAT_AUTH", raising=False)
    options, notice = app.launch_options(app.parse_args([]))
    assert options["share"] is False and options["auth"] is None and options["server_name"] == "127.0.0.1"
    assert "this machine only" in notice
    for host in ("localhost", "127.0.0.2", "::1"):
        assert app.is_loopback(host)
    options, notice = app.launch_options(app.parse_args(["--host", "0.0.0.0", "--auth", "alice:s3cret:x"]))
    assert options["auth"] == ("alice", "s3cret:x") and options["share"] is False
    assert "password" in notice and "alice" in notice and "s3cret" not in notice
    monkeypatch.setenv("SMALLCHAT_AUTH", "bob:pw")
    options, notice = app.launch_options(app.parse_args(["--host", "0.0.0.0", "--share"]))
    assert options["auth"] == ("bob", "pw") and options["share"] is True and "gradio.live" in notice


def test_the_app_tells_gradios_servers_nothing(catalog, monkeypatch):
    # Gradio's default is to send telemetry (the app's blocks, events and whether it uses a password) to
    # api.gradio.app at start-up and launch, and to ask PyPI for its newest version. A local chat app tells no one.
    from gradio import analytics

    from models.engine import Engine
    from net import free_port
    from ui.layout import build_demo, launch_kwargs

    calls = []
    monkeypatch.setattr(analytics, "_do_analytics_request", lambda topic, data: calls.append(topic))
    monkeypatch.setattr(analytics, "version_check", lambda: calls.append("version check"))
    monkeypatch.delenv("GRADIO_ANALYTICS_ENABLED", raising=False)  # Gradio's own default: on
    demo = build_demo(Engine(catalog))
    assert demo.analytics_enabled is False
    demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True,
                **launch_kwargs(demo))
    demo.close()
    assert calls == []


def test_a_message_over_the_size_limit_is_refused_naming_the_limit(handlers):
    from ui.handlers import ChatSession

    handlers.max_message_chars = 1000
    session = ChatSession()
    msg, history = handlers.submit("x" * 1001, [], session, "en", 0, 0.9, 8)
    assert msg == "x" * 1001
    assert history[-1]["metadata"]["title"] == ("⚠️ Your message is 1,001 characters; the limit is 1,000 "
                                                "(--max-message-chars). Nothing was sent; shorten it.")
    out = list(handlers.answer([{"role": "user", "content": "y" * 1001}], "", 0, 0.9, 8, session, "en"))
    assert len(out) == 1 and "the limit is 1,000" in out[0][-1]["metadata"]["title"]


def test_an_upload_over_the_size_limit_is_refused_naming_the_limit(catalog, tmp_path):
    from models.engine import Engine
    from models.messages import UserFacingError
    from ui.compare_handlers import MAX_UPLOAD_BYTES, CompareHandlers

    big = tmp_path / "big.toml"
    big.write_text("# " + "x" * MAX_UPLOAD_BYTES + "\n")
    with pytest.raises(UserFacingError) as e:
        CompareHandlers(Engine(catalog)).resolve_set(None, str(big), "", "")
    assert str(e.value) == "big.toml is 1,048,579 bytes; uploads are limited to 1,048,576 bytes (1 MiB)."
    assert e.value.render("zh") == "big.toml 的大小为 1,048,579 bytes；上传文件上限为 1,048,576 bytes (1 MiB)。"


@pytest.mark.slow
def test_an_exposed_server_says_so_and_asks_for_the_password(tmp_path):
    import os
    import socket
    import subprocess
    import sys
    import time
    from pathlib import Path

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = Path(__file__).resolve().parents[1]
    log = open(tmp_path / "stderr.txt", "w+")
    server = subprocess.Popen([sys.executable, str(root / "app.py"), "--host", "0.0.0.0", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=log, cwd=root,
                              env={**os.environ, "HF_HUB_OFFLINE": "1", "SMALLCHAT_AUTH": "alice:s3cret"})
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/config", timeout=5).status_code:
                    break
            except httpx.TransportError:
                time.sleep(1)
        assert httpx.get(f"http://127.0.0.1:{port}/config").status_code == 401  # no password, no app
        login = httpx.post(f"http://127.0.0.1:{port}/login", data={"username": "alice", "password": "s3cret"})
        assert login.status_code == 200, login.text
        log.seek(0)
        stderr = log.read()
        assert f"serving http://0.0.0.0:{port} with a password (user 'alice')" in stderr
        assert "s3cret" not in stderr
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.parametrize("temperature, top_p, max_new, seed, says", [
    (0, 0.9, 0, 0, "Max new tokens must be a whole number from 1 to 4096 (got 0)"),
    (0, 0.9, -5, 0, "(got -5)"),
    (0, 0, 8, 0, "Top-p must be a number from 0.05 to 1"),
    (3, 0.9, 8, 0, "Temperature (0 = greedy) must be a number from 0 to 2"),
    (0, 0.9, 8, -1, "Seed (same for A and B) must be a whole number"),
    (0, 0.9, 8, "x", "Seed"),
])
def test_the_compare_tab_refuses_bad_numbers_before_loading_anything(catalog, tiny_llama, temperature, top_p, max_new,
                                                                     seed, says):
    from models.engine import Engine
    from ui.compare_handlers import CompareHandlers, CompareSession

    engine = Engine(catalog)
    out = list(CompareHandlers(engine).run(str(tiny_llama), "none", str(tiny_llama), "none", "Hi", "", temperature,
                                           top_p, max_new, seed, None, 512, CompareSession(), "en"))
    assert len(out) == 1 and says in out[0][4]
    assert engine.loaded is None and not engine.residents()  # nothing was loaded
