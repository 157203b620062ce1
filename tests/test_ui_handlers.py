"""The UI's event handlers, driven directly: history handling, bad input, errors, language."""

import copy

import gradio as gr
import pytest
import torch

from models.engine import Engine
from models.loading import LoadSettings
from ui import chat_history as ch
from ui.handlers import ChatHandlers, ChatSession
from ui.i18n import STRINGS, language_from_header, t


@pytest.fixture()
def handlers(catalog, tiny_llama):
    engine = Engine(catalog)
    engine.load(str(tiny_llama), LoadSettings(context_tokens=512))
    return ChatHandlers(engine)


def run_answer(handlers, history, session, **kw):
    args = dict(system_prompt="", temperature=0, top_p=0.9, max_new_tokens=8, lang="en")
    args.update(kw)
    return list(handlers.answer(history, args["system_prompt"], args["temperature"], args["top_p"],
                                args["max_new_tokens"], session, args["lang"]))[-1]


def test_submit_then_answer_adds_the_reply_and_a_metrics_line(handlers):
    session = ChatSession()
    msg, history = handlers.submit("Hello world", [], session, "en")
    assert msg == "" and history == [{"role": "user", "content": "Hello world"}]
    history = run_answer(handlers, history, session)
    assert history[1]["role"] == "assistant" and history[1]["content"]
    assert "TTFT" in history[2]["metadata"]["title"] and history[2]["content"] == ""


def test_empty_message_keeps_everything(handlers):
    history = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    msg, new_history = handlers.submit("   ", history, ChatSession(), "en")
    assert msg == "   " and new_history == history
    assert run_answer(handlers, new_history, ChatSession()) == history


def test_metrics_lines_are_not_sent_to_the_model():
    history = [
        {"role": "user", "content": [{"type": "text", "text": "Hi"}]},  # Gradio 6 content parts
        {"role": "assistant", "content": "Hello!"},
        ch.ui_note("TTFT 0.1 s"),
        {"role": "user", "content": "Again"},
    ]
    assert ch.model_messages(ch.normalize(history), "Be brief.") == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Again"},
    ]


def test_regenerate_and_undo(handlers):
    session = ChatSession()
    history = [{"role": "user", "content": "one"}, {"role": "assistant", "content": "1"}, ch.ui_note("m"),
               {"role": "user", "content": "two"}, {"role": "assistant", "content": "2"}, ch.ui_note("m")]
    assert handlers.regenerate(history, session) == history[:4]
    undone, text = handlers.undo(history, "")
    assert undone == history[:3] and text == "two"
    # Something already typed in the box is not overwritten by Undo.
    assert handlers.undo(history, "draft")[1] == "draft"
    assert handlers.regenerate([], session) == []


def test_the_chat_cannot_be_edited_while_an_answer_streams(handlers):
    session = ChatSession()
    _, history = handlers.submit("Hello world", [], session, "en")
    stream = handlers.answer(history, "", 0, 0.9, 200, session, "en")
    streaming = next(stream)
    assert session.answering
    skip = gr.skip()
    # Send, regenerate, undo and clear are refused with a message; the typed text stays in the box.
    assert handlers.submit("second question", streaming, session, "en") == ("second question", skip)
    assert handlers.regenerate(streaming, session, "en") == skip
    assert handlers.undo(streaming, "draft", session, "en") == (skip, "draft")
    assert handlers.clear(session, "en") == skip
    assert list(handlers.answer(streaming, "", 0, 0.9, 8, session, "en")) == [skip]  # the chained answer
    handlers.stop(session)  # Stop frees the tab at once, even before the answer has wound down
    assert not session.answering
    final = list(stream)[-1]
    assert final[1]["role"] == "assistant" and final[1]["content"].startswith(streaming[1]["content"])
    assert handlers.clear(session, "en") == []


def test_an_api_answer_never_starts_with_a_stale_stop(handlers):
    session = ChatSession()
    handlers.stop(session)  # e.g. Stop pressed after the previous answer had ended
    history = run_answer(handlers, [{"role": "user", "content": "Hello world"}], session)
    assert history[1]["content"] and "TTFT" in history[2]["metadata"]["title"]


def test_stop_sets_only_this_tabs_switch():
    a, b = copy.deepcopy(ChatSession()), copy.deepcopy(ChatSession())
    ChatHandlers.stop(None, a)
    assert a.stop_event.is_set() and not b.stop_event.is_set()
    assert not a.new_answer().is_set()


def test_answer_error_keeps_history_and_explains(handlers, monkeypatch):
    def explode(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(handlers.engine.loaded.model, "generate", explode)
    history = [{"role": "user", "content": "Hello"}]
    out = run_answer(handlers, history, ChatSession())
    assert out[0] == history[0]
    assert "Out of GPU memory" in out[-1]["metadata"]["title"]


def test_load_errors_are_shown_and_the_old_model_stays(handlers, tmp_path):
    before = handlers.engine.loaded
    status, panel, model_box, quant_box = handlers.load(str(tmp_path / "missing"), "4bit", False, None, 512, "en",
                                                        progress=lambda *a, **k: None)
    assert "Could not load" in status and "No such folder" in status
    assert "Still using" in status and "the model box is set back to it" in status and "mem-bar" in panel
    assert handlers.engine.loaded is before
    # The model and quantization boxes go back to the model still answering.
    assert (model_box, quant_box) == (before.ref.label, "none")


def test_fit_check_and_panel_in_chinese(handlers):
    verdict = handlers.fit_check("qwen2.5-7b-instruct", "4bit", False, None, 4096, "zh")
    assert "预测峰值" in verdict or "放不下" in verdict or "显卡" in verdict
    assert "KV 缓存" in handlers.memory_html("zh")
    assert "Could not load" in handlers.fit_check("no-such-model", "none", False, None, 4096, "en")


def test_every_string_has_both_languages_and_the_header_picks_one():
    assert all(set(v) == {"en", "zh"} for v in STRINGS.values())
    assert language_from_header("zh-CN,zh;q=0.9,en;q=0.8") == "zh"
    assert language_from_header("en-US,en;q=0.9,zh;q=0.5") == "en"
    assert language_from_header(None) == "en"
    assert t("loading", "zh", model="m", quant="4bit") == "正在加载 m（4bit）…"


def test_layer_split_and_offload_verdict_speak_the_users_language(catalog):
    from models.memory import Budget, GiB, MiB, plan_fit
    from models.quant import Quant
    from ui.panels import plan_text, split_text

    split = {"gpu": 10, "cpu": 22, "disk": 0}
    assert split_text(split, True, "en") == "layers: 10 on GPU, 22 in CPU RAM (prefetched a layer ahead)"
    assert split_text(split, False, "zh") == "层分布：GPU 上 10 层，内存中 22 层"
    assert split_text({"gpu": 0, "cpu": 4, "disk": 2}, False, "en") == "layers: 4 in CPU RAM, 2 on disk"
    budget = Budget(gpu_bytes=8 * GiB, ram_bytes=64 * GiB, disk_bytes=100 * GiB, cuda_context_bytes=500 * MiB)
    plan = plan_fit(catalog.get("internlm2.5-7b-chat").shape, Quant.NONE, 2, 4096, budget, stream_slots=2)
    assert "提前一层预取" in plan_text(plan, "zh")
    assert "prefetched a layer ahead" in plan_text(plan, "en")


def _raised(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the test inspects whatever the engine raised
        return e
    raise AssertionError("expected an error")


def test_engine_errors_are_said_in_the_users_language(catalog, tiny_llama, tmp_path):
    from models.kv_cache import OverflowPolicy, fit_messages
    from models.sources import check_folder
    from models.messages import render
    from ui.i18n import explain

    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "weights-only").mkdir()
    (tmp_path / "weights-only" / "config.json").write_text("{}")
    (tmp_path / "weights-only" / "model.safetensors").write_text("")
    (tmp_path / "notes.txt").write_text("x")
    no_template = Engine(catalog)
    from tiny import write_tiny_llama
    base = write_tiny_llama(tmp_path / "base", chat_template=None)
    long_chat = [{"role": "user", "content": "word " * 50}]
    errors = {
        "unknown_id": _raised(lambda: catalog.get("nope")),
        "unknown_model": _raised(lambda: catalog.resolve("not a model")),
        "no_such_path": _raised(lambda: catalog.resolve("/no/such/folder")),
        "not_gguf": _raised(lambda: catalog.resolve(str(tmp_path / "notes.txt"))),
        "no_config": _raised(lambda: check_folder(empty)),
        "no_tokenizer": _raised(lambda: check_folder(tmp_path / "weights-only")),
        "no_chat_template": _raised(lambda: no_template.load(str(base), LoadSettings())),
        "no_model": _raised(lambda: list(Engine(catalog).chat([{"role": "user", "content": "hi"}], None, None))),
        "overflow_refused": _raised(lambda: fit_messages(long_chat * 3, lambda m: 60 * len(m), 100, OverflowPolicy.REFUSE)),
        "message_too_long": _raised(lambda: fit_messages(long_chat, lambda m: 60 * len(m), 10, OverflowPolicy.DROP_OLDEST)),
    }
    for code, error in errors.items():
        assert getattr(error, "code", None) == code, (code, error)
        # One table: the English is the engine's own message, and the Chinese comes from the same entry.
        assert render(code, "en", **error.params) == str(error) == explain(error, "en")
        assert explain(error, "zh") != str(error) and explain(error, "zh") == render(code, "zh", **error.params)
    # In the UI: a failed load in Chinese says why in Chinese.
    status, _, model_box, _ = ChatHandlers(Engine(catalog)).load(str(tmp_path / "missing"), "none", False, None, 512,
                                                                 "zh", progress=lambda *a, **k: None)
    assert model_box == gr.skip()  # no model in use: the box keeps what was typed
    assert "加载失败" in status and "没有这个文件夹或文件" in status
