"""The real embedded model (SmolLM2-135M-Instruct from PyPI), through the engine, the CLI and gradio_client."""

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from models.generation import SamplingSettings
from models.loading import LoadSettings
from models.sources import default_cache_dir

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def ask(engine, question, **kw):
    update = None
    for update in engine.chat([{"role": "user", "content": question}],
                              SamplingSettings(temperature=0, max_new_tokens=kw.get("max_new_tokens", 40)),
                              threading.Event()):
        pass
    return update


def test_embedded_model_knows_the_capital_of_france(embedded_engine):
    assert "Paris" in ask(embedded_engine, "What is the capital of France?").text


def test_unpacked_cache_reloads_in_well_under_a_second(embedded_engine, catalog):
    from models.engine import Engine

    engine = Engine(catalog)
    started = time.perf_counter()
    engine.load("", LoadSettings())
    assert time.perf_counter() - started < 3  # the load itself, cache hit (model + tokenizer)
    assert engine.loaded.load_seconds < 3
    unpacked = default_cache_dir() / "unpacked" / "SmolLM2-135M-Instruct.Q4_1"
    assert (unpacked / "model.safetensors").is_file() and (unpacked / "chat_template.jinja").is_file()


def test_streaming_chinese_never_shows_broken_characters(embedded_engine):
    # A multi-byte character split over two tokens must never be shown half-decoded: every
    # streamed text is a prefix of the final answer, and the final answer is what the
    # tokenizer decodes from all tokens at once. (A "\ufffd" can only appear where the
    # model itself produced bytes that are not valid UTF-8; then it is in the final text too,
    # except at the very end, where an answer cut off inside a character drops the broken tail.)
    stop = threading.Event()
    updates = list(embedded_engine.chat([{"role": "user", "content": "请用中文介绍一下北京。"}],
                                        SamplingSettings(temperature=0, max_new_tokens=40), stop))
    final = updates[-1]
    tokenizer = embedded_engine.loaded.tokenizer
    full = tokenizer.decode(final.token_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    assert final.text == full.rstrip("\ufffd")
    assert any("\u4e00" <= ch <= "\u9fff" for ch in final.text)  # it did answer in Chinese
    for update in updates:
        assert final.text.startswith(update.text)
        assert not update.text.endswith("\ufffd")


def run_cli(*args, timeout=300):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(ROOT / "app.py"), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def test_cli_ask_prints_the_answer_and_metrics():
    result = run_cli("--ask", "What is the capital of France?", "--temperature", "0", "--max-new-tokens", "30")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert "TTFT" in result.stderr and "tok/s" in result.stderr and "weights" in result.stderr


def test_cli_4bit_with_system_prompt():
    result = run_cli("--ask", "What is the capital of France?", "--quant", "4bit", "--temperature", "0",
                     "--system", "You are a geography teacher.", "--max-new-tokens", "30")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout and "(4bit" in result.stderr


@pytest.mark.parametrize("args, message", [
    (["--model", "no-such-model"], "Valid ids"),
    (["--model", "/no/such/folder"], "No such folder"),
    (["--model", "someone/not-cached"], "offline"),
    (["--quant", "3bit"], "invalid choice"),
    (["--gpu-budget", "-1"], "positive"),
])
def test_cli_bad_input_exits_non_zero_with_a_message(args, message, tmp_path):
    result = run_cli("--ask", "hi", *args)
    assert result.returncode != 0
    assert message in result.stderr


def test_gradio_client_chat(app_url):
    from gradio_client import Client

    client = Client(app_url, verbose=False)
    question = [{"role": "user", "content": [{"type": "text", "text": "What is the capital of France?"}]}]
    history = client.predict(question, api_name="/answer")
    texts = [m["content"] for m in history if m["role"] == "assistant" and not m.get("metadata")]
    assert any("Paris" in str(t) for t in texts)
    assert any("TTFT" in (m.get("metadata") or {}).get("title", "") for m in history)
