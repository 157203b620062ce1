"""Faults (issue 12, measured): each one ends with a clear message, the chat kept, and the app still working.

Out of memory is injected through real seams (transformers' from_pretrained, the model's forward);
the disk through the cache folder (a path under a file, and ENOSPC at the folder's creation,
since this runs as root, where a read-only chmod blocks nothing). A client leaving mid-stream is
tested for the API in tests/test_api.py (test_client_leaving_mid_stream_stops_the_answer,
test_client_leaving_a_plain_request_stops_the_answer) and for a browser tab here.
"""

from __future__ import annotations

import errno
import shutil
import time
from pathlib import Path

import pytest
import torch

from ui import chat_history as ch
from ui.handlers import ChatHandlers, ChatSession

NO_PROGRESS = dict(progress=lambda *a, **k: None)


@pytest.fixture()
def handlers(catalog, tiny_llama, tmp_path):
    """Chat handlers over a fresh engine with a copy of the tiny model (a copy: one test deletes it)."""
    from models.engine import Engine
    from models.loading import LoadSettings

    folder = tmp_path / "tiny"
    shutil.copytree(tiny_llama, folder)
    engine = Engine(catalog, cache_dir=tmp_path / "cache")
    engine.load(str(folder), LoadSettings(context_tokens=512))
    return ChatHandlers(engine)


def answer(handlers, history, session=None, max_new=8):
    """The last history the answer handler streams for `history`."""
    return list(handlers.answer(history, "", 0, 0.9, max_new, session or ChatSession(), "en"))[-1]


def talk(handlers, session, history, text, max_new=8):
    """Send `text` as the page does (submit, then answer); the history afterwards."""
    _, history = handlers.submit(text, history, session, "en", 0, 0.9, max_new)
    return answer(handlers, history, session, max_new)


def titles(history) -> list[str]:
    return [(m.get("metadata") or {}).get("title", "") for m in history]


def turns(history) -> list[tuple[str, str]]:
    """The conversation itself (what the model sees), without UI-only lines."""
    return [(m["role"], m["content"]) for m in ch.model_messages(history)]


def engine_idle(engine, within_s: float) -> bool:
    """The engine's lock is free within `within_s` (no answer is computing)."""
    if engine._lock.acquire(timeout=within_s):
        engine._lock.release()
        return True
    return False


class ForwardFails:
    """Wraps a model's forward: the call number `at` (1 = the prefill) raises CUDA's out-of-memory error."""

    def __init__(self, model, at: int):
        self.inner, self.at, self.calls = model.forward, at, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.at:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return self.inner(*args, **kwargs)


def test_out_of_memory_at_load_says_so_keeps_the_chat_and_a_later_load_works(handlers, monkeypatch):
    import transformers

    session = ChatSession()
    history = talk(handlers, session, [], "Hello")
    folder = handlers.engine.loaded.ref.location

    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 7.00 GiB (injected)")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_memory)
    status, panel, _, _ = handlers.load(folder, "none", False, None, 1024, "en", **NO_PROGRESS)
    # A load keeps the models that fit (issue 12, per-user models): the one in use stays, and the status says both.
    assert "Out of GPU memory while loading" in status and "Still using" in status, status
    assert "mem-bar" in panel
    # The chat is the page's: untouched, and the model still in use answers on.
    later = talk(handlers, session, history, "Are you there?")
    assert later[:len(history)] == history and later[len(history)]["content"] == "Are you there?"
    assert "TTFT" in titles(later)[-1]
    later = later[:len(history) + 1]
    monkeypatch.undo()
    status, *_ = handlers.load(folder, "none", False, None, 1024, "en", **NO_PROGRESS)
    assert "Loaded" in status
    again = answer(handlers, later[:len(history) + 1], session)
    assert "TTFT" in titles(again)[-1] and turns(again)[:3] == turns(later)[:3]


@pytest.mark.parametrize("at, where", [(1, "prefill"), (4, "mid-decode")])
def test_out_of_memory_while_answering_keeps_the_chat_and_the_next_turn_works(handlers, monkeypatch, at, where):
    session = ChatSession()
    history = talk(handlers, session, [], "Hello")
    model = handlers.engine.loaded.model
    monkeypatch.setattr(model, "forward", ForwardFails(model, at))
    _, asked = handlers.submit("Tell me more", history, session, "en", 0, 0.9, 8)
    failed = answer(handlers, asked, session)
    assert failed[:len(asked)] == asked, "every earlier message and the question stay"
    assert "Out of GPU memory during the answer" in titles(failed)[-1] and "the chat is kept" in titles(failed)[-1]
    partial = failed[len(asked):-1]
    if where == "prefill":
        assert partial == []  # nothing was generated: no empty answer bubble
    else:
        assert len(partial) == 1 and partial[0]["content"], "the tokens streamed before the failure stay visible"
    assert session.id not in handlers.engine._sessions.sessions(), "a cache in an unknown state is dropped"
    assert engine_idle(handlers.engine, within_s=5)
    monkeypatch.undo()
    after = talk(handlers, session, failed, "And now?")
    assert "TTFT" in titles(after)[-1] and after[:len(failed)] == failed


def test_the_model_folder_deleted_while_loaded(handlers):
    session = ChatSession()
    folder = Path(handlers.engine.loaded.ref.location)
    history = talk(handlers, session, [], "Hello")
    shutil.rmtree(folder)
    # The weights are in memory: chatting goes on.
    history = talk(handlers, session, history, "Still there?")
    assert "TTFT" in titles(history)[-1]
    assert handlers.current_model_text("en").startswith("Current model")
    assert "mem-bar" in handlers.memory_html("en")
    # Loading it again says the folder is gone, and the model in memory stays in use.
    before = handlers.engine.loaded
    status, _, model_box, _ = handlers.load(str(folder), "4bit", False, None, 512, "en", **NO_PROGRESS)
    assert "Could not load" in status and str(folder) in status and "Still using" in status, status
    assert handlers.engine.loaded is before and model_box == before.ref.label
    assert "Could not load" in handlers.fit_check(str(folder), "none", False, None, 512, "en")
    assert "TTFT" in titles(talk(handlers, session, history, "One more"))[-1]


def _cache_cannot_be_written(handlers, lang="en") -> str:
    """Load the embedded model (which unpacks into the cache) and return the status; the old model must stay."""
    before = handlers.engine.loaded
    status, _, model_box, _ = handlers.load("smollm2-135m-instruct", "none", False, None, 512, lang, **NO_PROGRESS)
    assert handlers.engine.loaded is before and model_box == before.ref.label, status
    return status


def test_a_cache_folder_that_cannot_be_created_is_said_and_the_model_stays(catalog, tiny_llama, tmp_path):
    from models.engine import Engine
    from models.loading import LoadSettings

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    engine = Engine(catalog, cache_dir=blocker / "cache")  # as read-only as it gets for root
    engine.load(str(tiny_llama), LoadSettings(context_tokens=512))
    handlers = ChatHandlers(engine)
    status = _cache_cannot_be_written(handlers)
    assert f"Cannot write the model cache in {blocker / 'cache'} (Not a directory)" in status, status
    assert "SMALLCHAT_CACHE" in status
    assert "TTFT" in titles(talk(handlers, ChatSession(), [], "Hello"))[-1]


def test_a_full_cache_disk_is_said_and_the_model_stays(handlers, monkeypatch):
    cache = handlers.engine.cache_dir
    real_mkdir = Path.mkdir

    def full(self, *args, **kwargs):
        if str(self).startswith(str(cache)):
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", full)
    status = _cache_cannot_be_written(handlers)
    assert f"Cannot write the model cache in {cache} (No space left on device)" in status, status
    zh = _cache_cannot_be_written(handlers, "zh")
    assert "No space left on device" in zh and "SMALLCHAT_CACHE" in zh
    monkeypatch.undo()
    assert "TTFT" in titles(talk(handlers, ChatSession(), [], "Hello"))[-1]
    assert not any(p.name.count(".tmp-") for p in cache.rglob("*")), "no half-written copy is left behind"


@pytest.mark.slow
def test_closing_the_tab_mid_answer_stops_the_engine_and_the_next_request_works(browser, app_url, embedded_engine):
    context = browser.new_context(locale="en-US")
    page = context.new_page()
    page.goto(app_url)
    page.wait_for_selector("#message textarea", timeout=60_000)
    page.fill("#message textarea", "Write a very long story about a dragon who learns to cook.")
    page.press("#message textarea", "Enter")
    page.wait_for_function("document.querySelector('#chatbot').innerText.split(/\\s+/).length > 20", timeout=120_000)
    assert embedded_engine._lock.locked(), "the answer should still be streaming (200 new tokens)"
    closed = time.monotonic()
    context.close()
    assert engine_idle(embedded_engine, within_s=10), "the engine kept generating for a closed tab"
    stopped_after = time.monotonic() - closed
    other = browser.new_context(locale="en-US")
    try:
        page = other.new_page()
        page.goto(app_url)
        page.wait_for_selector("#message textarea", timeout=60_000)
        page.fill("#message textarea", "What is the capital of France?")
        page.press("#message textarea", "Enter")
        page.wait_for_function("document.querySelector('#chatbot').innerText.includes('TTFT')", timeout=120_000)
        assert "Paris" in page.inner_text("#chatbot")
    finally:
        other.close()
    assert stopped_after < 10
