"""The OpenAI-compatible API against real servers in this process, with the real embedded model.

One server is the web app with the API mounted (as `app.py --api` builds it) and is driven with
the official `openai` client; a second one serves the API alone (`--api-only`) with a key and a
one-place wait queue, for auth and queue-full cases. Error cases use raw HTTP (httpx, sockets).
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time

import httpx
import pytest

from net import free_port

pytestmark = pytest.mark.slow

openai = pytest.importorskip("openai")

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
PARIS = "The capital of France is Paris."
KEY = "test-key-5f0c"  # a throwaway key for the key-protected server
LONG_ANSWER = [{"role": "user", "content": "Write a long story about a dragon who learns to cook."}]


@pytest.fixture(scope="module")
def web_api(embedded_engine):
    """The web UI with the API at /v1, as `app.py --api` serves it: (base URL, ApiService)."""
    from api.server import build_api, gradio_app_kwargs
    from api.service import ApiSettings
    from ui.layout import UiDefaults, build_demo, launch_kwargs

    api_app = build_api(embedded_engine, ApiSettings(default_max_tokens=64), api_key=None)
    demo = build_demo(embedded_engine, UiDefaults(temperature=0.0))
    port = free_port()
    demo.queue(default_concurrency_limit=None).launch(
        server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
        **launch_kwargs(demo, app_kwargs=gradio_app_kwargs(api_app)),
    )
    yield f"http://127.0.0.1:{port}", api_app.state.service
    demo.close()


@pytest.fixture(scope="module")
def keyed_api(embedded_engine):
    """The API alone (`--api-only`) with a key and room for one waiting request: (port, ApiService)."""
    from api.server import build_api, standalone_app, uvicorn_server
    from api.service import ApiSettings

    api_app = build_api(embedded_engine, ApiSettings(max_waiting=1, default_max_tokens=64), api_key=KEY)
    port = free_port()
    server = uvicorn_server(standalone_app(api_app), "127.0.0.1", port)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "the standalone API server did not start"
        time.sleep(0.05)
    yield port, api_app.state.service
    server.should_exit = True
    thread.join(10)


@pytest.fixture
def client(web_api):
    """The official OpenAI client pointed at the app (no key needed on 127.0.0.1)."""
    return openai.OpenAI(base_url=web_api[0] + "/v1", api_key="unused", max_retries=0, timeout=120)


def _engine_lock_free(engine, within_s: float) -> bool:
    # The engine's GPU lock (private): taking it proves no answer is still computing.
    if engine._lock.acquire(timeout=within_s):
        engine._lock.release()
        return True
    return False


def _error(response: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error


# ----- the openai client ---------------------------------------------------------------

def test_models_lists_what_is_in_memory_then_the_catalog(client):
    models = client.models.list().data
    assert models[0].id == "smollm2-135m-instruct" and models[0].resident  # the app's default model first
    assert "smollm2-135m-instruct:none" in [m.id for m in models if m.resident]
    qwen = next(m for m in models if m.id == "qwen2.5-1.5b-instruct")
    assert not qwen.resident and not qwen.loadable  # listed, but no anonymous caller may load it
    assert client.models.retrieve("smollm2-135m-instruct").id == "smollm2-135m-instruct"


def test_chat_answers_with_usage(client, embedded_engine):
    from models.generation import chat_input_ids

    r = client.chat.completions.create(model="smollm2-135m-instruct", messages=FRANCE, temperature=0)
    assert r.choices[0].message.content == PARIS
    assert r.choices[0].finish_reason == "stop"
    assert r.model == "smollm2-135m-instruct" and r.object == "chat.completion"
    tokenizer = embedded_engine.loaded.tokenizer
    assert r.usage.prompt_tokens == len(chat_input_ids(tokenizer, FRANCE))
    # The answer's tokens plus the end-of-turn token that ended it.
    answer_tokens = len(tokenizer(PARIS, add_special_tokens=False)["input_ids"])
    assert r.usage.completion_tokens in (answer_tokens, answer_tokens + 1)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_content_as_text_parts(client):
    parts = [{"type": "text", "text": "What is the capital "}, {"type": "text", "text": "of France?"}]
    r = client.chat.completions.create(model="smollm2-135m-instruct", temperature=0,
                                       messages=[{"role": "user", "content": parts}])
    assert r.choices[0].message.content == PARIS


def test_streaming_matches_plain_answer_and_reports_usage(client):
    chunks = list(client.chat.completions.create(
        model="smollm2-135m-instruct", messages=FRANCE, temperature=0, stream=True,
        stream_options={"include_usage": True},
    ))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == PARIS
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 3  # streamed, not one lump
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    assert len({c.id for c in chunks}) == 1
    usage = chunks[-1].usage
    assert not chunks[-1].choices and usage.completion_tokens >= 7
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_stop_string_cuts_the_text_and_the_generation(client, embedded_engine):
    r = client.chat.completions.create(model="smollm2-135m-instruct", messages=FRANCE, temperature=0, stop=[" of"])
    assert r.choices[0].message.content == "The capital"
    assert r.choices[0].finish_reason == "stop"
    full_answer = len(embedded_engine.loaded.tokenizer(PARIS, add_special_tokens=False)["input_ids"])
    assert r.usage.completion_tokens < full_answer  # it stopped computing, not just hid the rest
    streamed = client.chat.completions.create(model="smollm2-135m-instruct", messages=FRANCE, temperature=0,
                                              stop=["Paris", "Lyon"], stream=True)
    pieces = [c.choices[0].delta.content or "" for c in streamed if c.choices]
    assert "".join(pieces) == "The capital of France is "
    assert not any("Par" in p for p in pieces)  # the stop string's start was held back, never sent


def test_max_tokens_ends_with_length(client):
    r = client.chat.completions.create(model="smollm2-135m-instruct", messages=FRANCE, temperature=0, max_tokens=3)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 3
    assert PARIS.startswith(r.choices[0].message.content)


def test_seeded_sampling_repeats(client):
    def ask():
        return client.chat.completions.create(model="smollm2-135m-instruct", messages=FRANCE, temperature=1.0,
                                              top_p=0.95, seed=1234, max_tokens=8).choices[0].message.content
    assert ask() == ask()


def test_second_turn_reuses_the_conversation_cache(client):
    opening = [{"role": "system", "content": "You are a geography tutor."},
               {"role": "user", "content": "Which river flows through Paris?"}]
    first = client.chat.completions.create(model="smollm2-135m-instruct", messages=opening, temperature=0,
                                           max_tokens=6)
    second_turn = opening + [{"role": "assistant", "content": first.choices[0].message.content},
                             {"role": "user", "content": "And through London?"}]
    second = client.chat.completions.create(model="smollm2-135m-instruct", messages=second_turn, temperature=0,
                                            max_tokens=6)
    cached = second.usage.prompt_tokens_details.cached_tokens
    # The whole first prompt (and the answer's tokens as far as they re-tokenize alike) came from the cache.
    assert cached >= first.usage.prompt_tokens
    assert cached < second.usage.prompt_tokens


def test_four_concurrent_streams_do_not_mix(client):
    questions = ["What is the capital of France?", "What is 2 + 2?", "Name a primary color.",
                 "Say hello in Spanish."]

    def chat(q, stream):
        messages = [{"role": "user", "content": q}]
        if not stream:
            return client.chat.completions.create(model="smollm2-135m-instruct", messages=messages, temperature=0,
                                                  max_tokens=8).choices[0].message.content
        chunks = list(client.chat.completions.create(model="smollm2-135m-instruct", messages=messages,
                                                     temperature=0, max_tokens=8, stream=True))
        assert len({c.id for c in chunks}) == 1  # every chunk belongs to this answer
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    expected = [chat(q, stream=False) for q in questions]
    assert len(set(expected)) == 4
    got: dict[int, str] = {}
    errors: list[BaseException] = []

    def run(i):
        try:
            got[i] = chat(questions[i], stream=True)
        except BaseException as e:  # reported below, in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert [got[i] for i in range(4)] == expected


def test_client_leaving_mid_stream_stops_the_answer(client, embedded_engine, caplog):
    caplog.set_level(logging.INFO, logger="smallchat.api")
    stream = client.chat.completions.create(model="smollm2-135m-instruct", messages=LONG_ANSWER, temperature=0,
                                            max_tokens=400, stream=True)
    received = 0
    for chunk in stream:
        received += bool(chunk.choices and chunk.choices[0].delta.content)
        if received == 3:
            break
    stream.close()
    # 400 tokens take far longer than this on CPU: a free lock means the computation stopped.
    assert _engine_lock_free(embedded_engine, within_s=5), "the answer kept the engine busy after the client left"
    assert any("499" in r.getMessage() for r in caplog.records)
    r = client.chat.completions.create(model="smollm2-135m-instruct", messages=FRANCE, temperature=0)
    assert r.choices[0].message.content == PARIS


# ----- errors over raw HTTP ---------------------------------------------------------

def _post(base: str, body, **kw) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(base + "/v1/chat/completions", content=content, timeout=60,
                      headers={"Content-Type": "application/json", **kw.pop("headers", {})}, **kw)


def test_bad_json_is_400(web_api):
    _error(_post(web_api[0], b"{not json"), 400, code="invalid_json")
    _error(_post(web_api[0], b"[1, 2]"), 400, code="invalid_json")
    _error(_post(web_api[0], b"x" * (5 << 20)), 413, code="body_too_large")


@pytest.mark.parametrize("change, param", [
    ({"messages": "hello"}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content[0]"),
    ({"temperature": "hot"}, "temperature"),
    ({"temperature": 3}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 1.5}, "max_tokens"),
    ({"seed": "x"}, "seed"),
    ({"stop": [1]}, "stop"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stream": "yes"}, "stream"),
    ({"n": 2}, "n"),
    ({"model": 7}, "model"),
])
def test_bad_fields_are_400_naming_the_field(web_api, change, param):
    body = {"model": "smollm2-135m-instruct", "messages": FRANCE, **change}
    _error(_post(web_api[0], body), 400, param=param)


def test_unknown_model_is_404_and_unloaded_model_409(web_api):
    _error(_post(web_api[0], {"model": "gpt-17", "messages": FRANCE}), 404, param="model", code="model_not_found")
    # A path is never loaded from the API, whatever it points at.
    _error(_post(web_api[0], {"model": "/etc", "messages": FRANCE}), 404, code="model_not_found")
    error = _error(_post(web_api[0], {"model": "qwen2.5-1.5b-instruct", "messages": FRANCE}), 409,
                   code="model_not_loaded")
    assert "is not in memory" in error["message"] and "--api-allow-load and an --api-key" in error["message"]
    assert "In memory now: smollm2-135m-instruct" in error["message"]
    _error(httpx.get(web_api[0] + "/v1/models/gpt-17"), 404)
    _error(httpx.get(web_api[0] + "/v1/no-such-endpoint"), 404)


def test_context_overflow_is_400(web_api):
    huge = [{"role": "user", "content": "hello " * 5000}]
    for stream in (False, True):
        error = _error(_post(web_api[0], {"model": "smollm2-135m-instruct", "messages": huge, "stream": stream}),
                       400, code="context_length_exceeded")
        assert "tokens" in error["message"]


def _raw_request(port: int, body: dict, key: str | None = KEY) -> socket.socket:
    """Send a chat request over a plain socket (so the test can drop the connection whenever it likes)."""
    data = json.dumps(body).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n" + (f"Authorization: Bearer {key}\r\n" if key else "") + "\r\n")
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    sock.sendall(head.encode() + data)
    return sock


def _read_until(sock: socket.socket, marker: bytes) -> bytes:
    seen = b""
    while marker not in seen:
        data = sock.recv(4096)
        assert data, f"connection closed before {marker!r}: {seen[:300]!r}"
        seen += data
    return seen


def _wait_for(condition, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_full_queue_is_503_with_retry_after_and_leavers_free_their_place(keyed_api, embedded_engine):
    port, service = keyed_api
    base = f"http://127.0.0.1:{port}"
    auth = {"Authorization": f"Bearer {KEY}"}
    running = _raw_request(port, {"messages": LONG_ANSWER, "stream": True, "max_tokens": 400, "temperature": 0})
    waiting = None
    try:
        _read_until(running, b"data:")  # answering now
        waiting = _raw_request(port, {"messages": FRANCE, "temperature": 0})
        assert _wait_for(lambda: service.queue.waiting == 1, 10)
        r = _post(base, {"messages": FRANCE}, headers=auth)
        _error(r, 503, code="queue_full")
        assert int(r.headers["Retry-After"]) >= 1
        waiting.close()  # a client that leaves while waiting gives its place back
        assert _wait_for(lambda: service.queue.waiting == 0, 5)
    finally:
        running.close()
        if waiting is not None:
            waiting.close()
    assert _engine_lock_free(embedded_engine, within_s=5)
    r = _post(base, {"messages": FRANCE, "temperature": 0}, headers=auth)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == PARIS


def test_client_leaving_a_plain_request_stops_the_answer(web_api, embedded_engine):
    """Without streaming nothing is written until the end, so the server must notice the disconnect itself."""
    port = int(web_api[0].rsplit(":", 1)[1])
    sock = _raw_request(port, {"messages": LONG_ANSWER, "max_tokens": 400, "temperature": 0}, key=None)
    try:
        assert _wait_for(embedded_engine._lock.locked, 10)  # answering now
        time.sleep(0.5)
    finally:
        sock.close()
    assert _engine_lock_free(embedded_engine, within_s=5), "the answer went on after its client left"


def test_api_key_is_checked(keyed_api):
    base = f"http://127.0.0.1:{keyed_api[0]}"
    _error(httpx.get(base + "/v1/models"), 401, code="invalid_api_key")
    _error(httpx.get(base + "/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
    _error(httpx.get(base + "/v1/models", headers={"Authorization": KEY}), 401)  # no "Bearer"
    _error(_post(base, {"messages": FRANCE}), 401)
    keyed = openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0)
    assert keyed.models.list().data[0].id == "smollm2-135m-instruct"
    r = keyed.chat.completions.create(model="smollm2-135m-instruct", messages=FRANCE, temperature=0)
    assert r.choices[0].message.content == PARIS


def test_web_ui_still_served_beside_the_api(web_api):
    assert httpx.get(web_api[0] + "/").status_code == 200
    assert httpx.get(web_api[0] + "/config").status_code == 200


def test_loads_only_for_callers_with_the_key_and_a_failed_load_keeps_nothing_broken(catalog):
    """--api-allow-load with --api-key: a catalog model that is not in memory is loaded in the request's turn
    (next to the others), then answers; one that cannot load is a 409. Without a key nobody may load."""
    from starlette.testclient import TestClient

    from api.server import build_api
    from api.service import ApiSettings
    from models.engine import Engine

    engine = Engine(catalog)  # its own engine: this test loads and must not disturb the shared one
    with TestClient(build_api(engine, ApiSettings(allow_load=True), api_key=None)) as anonymous:
        error = _error(anonymous.post("/chat/completions", json={"model": "smollm2-135m-instruct", "messages": FRANCE}),
                       409, code="model_not_loaded")
        assert "only callers with the API key may load models" in error["message"]
        assert not any(m["loadable"] for m in anonymous.get("/models").json()["data"])
    assert engine.residents() == []
    keyed = {"Authorization": f"Bearer {KEY}"}
    with TestClient(build_api(engine, ApiSettings(allow_load=True), api_key=KEY), headers=keyed) as http:
        listed = http.get("/models").json()["data"]
        assert [m["id"] for m in listed] == catalog.ids() and all(m["loadable"] for m in listed)  # nothing loaded yet
        _error(http.post("/chat/completions", json={"messages": FRANCE}), 503, code="no_model_loaded")
        r = http.post("/chat/completions", json={"model": "smollm2-135m-instruct", "messages": FRANCE,
                                                 "temperature": 0})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == PARIS
        assert http.get("/models").json()["data"][0] == {**http.get("/models").json()["data"][0],
                                                          "id": "smollm2-135m-instruct", "resident": True}
        # Offline here: the hub model cannot be fetched; the model in memory stays.
        _error(http.post("/chat/completions", json={"model": "qwen2.5-1.5b-instruct", "messages": FRANCE}), 409,
               code="model_load_failed")
        assert [m.ref.label for m in engine.residents()] == ["smollm2-135m-instruct"]


def test_a_request_picks_among_the_models_in_memory_and_never_loads_anonymously(catalog):
    """Two quantizations in memory (as two browser tabs would leave them): ID:QUANT picks one, the answer says
    which, and an anonymous request for one that is not in memory is refused without loading anything."""
    from starlette.testclient import TestClient

    from api.server import build_api
    from api.service import ApiSettings
    from models.engine import Engine
    from models.facade import Quant
    from models.loading import LoadSettings

    engine = Engine(catalog)
    engine.load("", LoadSettings(context_tokens=1024))
    engine.ensure("smollm2-135m-instruct", LoadSettings(quant=Quant.NF4, context_tokens=1024))
    with TestClient(build_api(engine, ApiSettings(), api_key=None)) as http:
        resident = [m["id"] for m in http.get("/models").json()["data"] if m["resident"]]
        assert resident == ["smollm2-135m-instruct", "smollm2-135m-instruct:none", "smollm2-135m-instruct:4bit"]
        r = http.post("/chat/completions", json={"model": "smollm2-135m-instruct:4bit", "messages": FRANCE,
                                                 "temperature": 0, "max_tokens": 8})
        assert r.status_code == 200 and r.json()["model"] == "smollm2-135m-instruct:4bit"
        assert engine.residents()[-1].settings.quant is Quant.NF4  # the 4-bit model answered (most recently used)
        error = _error(http.post("/chat/completions", json={"model": "smollm2-135m-instruct:8bit", "messages": FRANCE}),
                       409, param="model", code="model_not_loaded")
        assert "API requests do not load models on this server" in error["message"]
        assert "In memory now: smollm2-135m-instruct, smollm2-135m-instruct:none, smollm2-135m-instruct:4bit" \
            in error["message"]
        _error(http.post("/chat/completions", json={"model": "smollm2-135m-instruct:bogus", "messages": FRANCE}), 404,
               code="model_not_found")
    assert len(engine.residents()) == 2  # nothing was loaded or unloaded by the API


def test_old_conversations_caches_are_dropped_beyond_the_limit(embedded_engine):
    from starlette.testclient import TestClient

    from api.server import build_api
    from api.service import ApiSettings, session_id
    from api.schema import parse_chat_request

    api_app = build_api(embedded_engine, ApiSettings(max_conversations=2), api_key=None)
    bodies = [{"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": f"Count to {n}."}],
               "max_tokens": 1, "user": "cap-test"} for n in (3, 4, 5)]
    with TestClient(api_app) as http:
        for body in bodies:
            assert http.post("/chat/completions", json=body).status_code == 200
    ids = [session_id("smollm2-135m-instruct", parse_chat_request(b)) for b in bodies]
    held = set(embedded_engine._sessions.sessions())
    assert ids[0] not in held and ids[1] in held and ids[2] in held


def test_a_second_app_uses_this_apps_api_as_its_remote_engine(web_api, embedded_engine, catalog, monkeypatch):
    """Instance B (another Engine, as a second `app.py` would have) loads `openai:<A's /v1>` and chats
    through A's API with a key taken from the environment: streaming, the final stats, and Stop."""
    from models.engine import Engine
    from models.generation import SamplingSettings
    from models.loading import LoadSettings

    monkeypatch.setenv("SMALLCHAT_REMOTE_API_KEY", "unused")  # A is on 127.0.0.1: any key passes
    second = Engine(catalog)
    report = second.load(f"openai:{web_api[0]}/v1", LoadSettings())
    assert report.loaded.weights_bytes == 0 and "smollm2" in report.loaded.ref.label.lower()
    updates = list(second.chat(FRANCE, SamplingSettings(max_new_tokens=32, temperature=0), threading.Event()))
    final = updates[-1]
    assert final.done and final.text == PARIS
    assert final.stats.finish_reason == "eos" and final.stats.new_tokens > 0 and final.stats.ttft_s is not None

    stop = threading.Event()
    seen = []
    for update in second.chat(LONG_ANSWER, SamplingSettings(max_new_tokens=400, temperature=0), stop):
        seen.append(update)
        if len(update.text) > 20:
            stop.set()
    assert seen[-1].done and seen[-1].stats.finish_reason == "stopped"
    assert seen[-1].stats.new_tokens < 400
    # Closing B's stream is a client leaving A's API mid-stream: A stops computing that answer.
    assert _engine_lock_free(embedded_engine, within_s=10)
