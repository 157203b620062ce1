"""The API's parts without a model: stop strings, validation, the wait queue, keys, sessions, error mapping."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from api.auth import ApiKeyMissing, api_key_for, check_key, is_loopback
from api.errors import ApiError, from_engine_error
from api.schema import parse_chat_request
from api.service import session_id
from api.stops import StopScanner
from api.waiting import QueueFull, WaitQueue


def _stream(scanner: StopScanner, pieces: list[str]) -> tuple[list[str], str]:
    text, sent = "", []
    for i, piece in enumerate(pieces):
        text += piece
        sent.append(scanner.feed(text, final=i == len(pieces) - 1))
    return sent, "".join(sent)


def test_stop_scanner_holds_back_a_possible_stop_and_cuts_at_it():
    sent, out = _stream(StopScanner(("Paris",)), ["The capital is ", "Pa", "ri", "s.", " More"])
    assert out == "The capital is "
    assert sent[1] == "" and sent[2] == ""  # "Pa", "Pari" could still become "Paris": held back


def test_stop_scanner_releases_held_text_that_did_not_become_a_stop():
    sent, out = _stream(StopScanner(("Paris",)), ["We went to Pa", "mplona."])
    assert sent[0] == "We went to "
    assert out == "We went to Pamplona."


def test_stop_scanner_earliest_of_several_wins_and_no_stops_passes_all():
    assert _stream(StopScanner(("c", "b")), ["abcd"])[1] == "a"
    assert _stream(StopScanner(("\n\n",)), ["one\n", "\ntwo"])[1] == "one"
    assert _stream(StopScanner(()), ["a", "b"])[1] == "ab"
    assert _stream(StopScanner(("x",)), ["x is first"])[1] == ""


def test_chat_request_maps_roles_parts_and_defaults():
    r = parse_chat_request({"messages": [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
    ], "max_tokens": 10, "max_completion_tokens": 20, "stop": "END", "stream": True,
        "stream_options": {"include_usage": True}, "seed": -1, "frequency_penalty": 0, "unknown_field": 1})
    assert r.messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    assert r.max_tokens == 20 and r.stop == ("END",) and r.stream and r.include_usage
    assert r.temperature == 1.0 and r.top_p == 1.0 and r.model is None and 0 <= r.seed < 2 ** 63


@pytest.mark.parametrize("body, param", [
    ({"messages": [{"role": "system", "content": "only a system prompt"}]}, "messages"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [{}]}]}, "messages[0].tool_calls"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": True}, "temperature"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": float("nan")}, "temperature"),
    ({"messages": [{"role": "user", "content": "x"}], "stop": [""]}, "stop"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools"),
    ({"messages": [{"role": "user", "content": "x"}], "presence_penalty": 1}, "presence_penalty"),
    ({"messages": [{"role": "user", "content": "x"}], "stream_options": {"include_usage": "yes"}},
     "stream_options.include_usage"),
])
def test_chat_request_refuses_with_the_field_named(body, param):
    with pytest.raises(ApiError) as e:
        parse_chat_request(body)
    assert e.value.status == 400 and e.value.param == param and e.value.message


def test_wait_queue_bounds_admissions_and_gives_places_back():
    # Order is the engine's GPU queue's job (tests/test_gpu_queue.py); this only bounds how many API requests wait.
    q = WaitQueue(max_waiting=1)
    first, second = q.admit(), q.admit()
    with pytest.raises(QueueFull) as full:
        q.admit()
    assert full.value.retry_after_s >= 1 and full.value.waiting == 1 and q.waiting == 1
    first.release()
    third = q.admit()  # the first left: a place is free
    second.release()
    second.release()  # twice is harmless: it must not free a place someone else holds
    assert q.waiting == 0
    q.admit()
    with pytest.raises(QueueFull):
        q.admit()
    third.release()


def test_loopback_needs_no_key_anywhere_else_does(monkeypatch):
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost") and is_loopback("127.0.0.2")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5") and not is_loopback("myhost")
    assert api_key_for("127.0.0.1", None, environ={}) is None
    with pytest.raises(ApiKeyMissing, match="SMALLCHAT_API_KEY"):
        api_key_for("0.0.0.0", None, environ={})
    assert api_key_for("0.0.0.0", None, environ={"SMALLCHAT_API_KEY": "k1"}) == "k1"
    assert api_key_for("0.0.0.0", "k2", environ={"SMALLCHAT_API_KEY": "k1"}) == "k2"


def test_key_check():
    check_key(None, None)
    check_key("s3cret", "Bearer s3cret")
    check_key("s3cret", "bearer s3cret")
    for header in (None, "", "Bearer", "Bearer s3cre", "Bearer s3cret2", "Basic s3cret", "s3cret"):
        with pytest.raises(ApiError) as e:
            check_key("s3cret", header)
        assert e.value.status == 401 and "s3cret" not in e.value.message


def test_cli_refuses_a_public_api_without_a_key(monkeypatch, capsys):
    import app

    monkeypatch.delenv("SMALLCHAT_API_KEY", raising=False)
    monkeypatch.setenv("SMALLCHAT_AUTH", "u:p")  # a non-loopback --host also needs the web UI's password (issue 12)
    with pytest.raises(SystemExit) as e:
        app.parse_args(["--api", "--host", "0.0.0.0"])
    assert e.value.code == 2 and "--api-key" in capsys.readouterr().err
    assert app.parse_args(["--api"]).api_key_value is None  # loopback: no key needed
    args = app.parse_args(["--api-only", "--host", "0.0.0.0", "--api-key", "k-123"])
    assert args.api_key_value == "k-123"
    monkeypatch.setenv("SMALLCHAT_API_KEY", "k-env")
    assert app.parse_args(["--api", "--host", "0.0.0.0"]).api_key_value == "k-env"
    with pytest.raises(SystemExit):
        app.parse_args(["--api", "--ask", "hi"])


def test_cli_lets_only_keyed_callers_load_models(monkeypatch, capsys):
    import app

    monkeypatch.delenv("SMALLCHAT_API_KEY", raising=False)
    with pytest.raises(SystemExit) as e:
        app.parse_args(["--api", "--api-allow-load"])  # loopback, no key: every caller would be anonymous
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--api-allow-load lets API callers load models: give --api-key" in err
    args = app.parse_args(["--api", "--api-allow-load", "--api-key", "k-123"])
    assert args.api_allow_load and args.api_key_value == "k-123"


def test_session_id_follows_the_conversation():
    chat = parse_chat_request({"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"}]})
    next_turn = parse_chat_request({"messages": [
        {"role": "system", "content": "S"}, {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}]})
    other = parse_chat_request({"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q9"}]})
    other_user = parse_chat_request({"messages": chat.messages, "user": "alice"})
    sid = session_id("m", chat)
    assert sid == session_id("m", next_turn) and sid.startswith("api-")
    assert len({sid, session_id("m", other), session_id("m", other_user), session_id("m2", chat)}) == 4
    assert "Q1" not in sid


def test_engine_errors_map_to_statuses():
    import torch

    from models.catalog import UnknownModelError
    from models.generation import ChatTemplateError
    from models.kv_cache import ContextOverflowError
    from models.loading import ModelLoadError

    overflow = ContextOverflowError("overflow_refused", needed=5000, allowed=3000)
    assert (e := from_engine_error(overflow)).status == 400 and e.code == "context_length_exceeded"
    assert "5000" in e.message and "3000" in e.message
    assert from_engine_error(ModelLoadError("oom_answer")).status == 507
    assert from_engine_error(torch.OutOfMemoryError("CUDA out of memory")).status == 507
    assert from_engine_error(ModelLoadError("no_model")).status == 503
    assert from_engine_error(UnknownModelError("no_such_path", path="nope")).status == 404
    assert from_engine_error(ChatTemplateError("template_rejected", detail="no system role")).status == 400
    assert from_engine_error(ValueError("a bug, not the user's input")) is None  # a 500
    assert from_engine_error(RuntimeError("a bug")) is None  # unexpected: a 500


def test_unexpected_exception_is_a_logged_500_and_the_server_keeps_serving(catalog, caplog):
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from api.routes import Api
    from api.service import ApiService
    from models.engine import Engine

    api = Api(ApiService(Engine(catalog)), api_key=None)

    async def broken(request):
        raise KeyError("a bug")

    async def fine(request):
        return JSONResponse({"ok": True})

    app = Starlette(routes=[Route("/broken", api._endpoint(broken)), Route("/fine", api._endpoint(fine))])
    caplog.set_level(logging.ERROR, logger="smallchat.api")
    with TestClient(app, raise_server_exceptions=True) as client:
        r = client.get("/broken")
        assert r.status_code == 500
        error = r.json()["error"]
        assert error["code"] == "internal_error" and error["type"] == "server_error"
        assert client.get("/fine").json() == {"ok": True}
    record = next(r for r in caplog.records if "internal error" in r.getMessage())
    error_id = error["message"].split("id ")[1].split(")")[0]
    assert error_id in record.getMessage() and record.exc_info[0] is KeyError


def test_a_client_leaving_is_noticed_even_while_items_keep_coming():
    """A plain (non-streamed) answer yields text without pauses; the disconnect check must still run."""
    import asyncio

    from starlette.requests import Request

    from api.bridge import ThreadedStream
    from api.routes import DISCONNECT_POLL_S, ClientGone, _Watch

    def endless(stop: threading.Event):
        while not stop.is_set():  # like an answer: an item every 20 ms until stopped
            time.sleep(0.02)
            yield "token"

    async def gone():  # the ASGI receive channel of a client that has closed its connection
        return {"type": "http.disconnect"}

    async def run():
        stream = ThreadedStream(endless)
        watch = _Watch(stream, Request({"type": "http", "method": "POST", "headers": []}, gone))
        started = time.monotonic()

        async def read_all():
            while True:
                await watch.next()

        with pytest.raises(ClientGone):
            await asyncio.wait_for(read_all(), timeout=5)
        assert time.monotonic() - started < DISCONNECT_POLL_S + 0.5
        assert stream.stop_event.is_set()
        assert await asyncio.to_thread(stream.finished.wait, 5)  # the producer thread ended

    asyncio.run(run())


def test_an_error_mid_stream_is_sent_as_an_error_event_then_done(catalog):
    """After the status line is sent, an error can only be said inside the stream, as OpenAI does."""
    import asyncio
    import json

    from api.bridge import ThreadedStream
    from api.objects import CompletionIds
    from api.routes import Api
    from api.service import ApiService, Delta
    from models.engine import Engine
    from models.loading import ModelLoadError

    def failing(stop: threading.Event):
        yield Delta("Hello")
        raise ModelLoadError("oom_answer")

    async def run():
        stream = ThreadedStream(failing)
        first = await stream.next()
        api = Api(ApiService(Engine(catalog)), api_key=None)
        return [e async for e in api._events(stream, first, CompletionIds("m"), False, time.perf_counter())]

    events = asyncio.run(run())
    assert all(e.startswith("data: ") and e.endswith("\n\n") for e in events)
    payloads = [e[len("data: "):].strip() for e in events]
    assert payloads[-1] == "[DONE]"
    assert json.loads(payloads[1])["choices"][0]["delta"]["content"] == "Hello"
    error = json.loads(payloads[-2])["error"]
    assert error["code"] == "out_of_memory" and error["type"] == "server_error"
