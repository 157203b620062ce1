"""One API answer through the shared engine: which model, which KV-cache session, stop strings, usage.

Blocking code, run in a worker thread per request (api/bridge.py); it knows nothing of HTTP
except the ApiErrors it raises for a model it cannot use.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterator

from models.facade import Engine, KVPrecision, LoadSettings, OverflowPolicy, SamplingSettings

from .errors import ApiError
from .schema import ChatRequest
from .stops import StopScanner
from .waiting import Ticket, WaitQueue


@dataclass(frozen=True)
class ApiSettings:
    """How the API serves: from the command line."""

    allow_load: bool = False  # may a request switch the shared model (for every UI user too)?
    max_waiting: int = 8  # requests that may wait behind the running one before 503
    default_max_tokens: int = 512  # when a request gives no max_tokens
    load_settings: LoadSettings = LoadSettings()  # quantization, budget, context for loads by the API
    kv: KVPrecision = KVPrecision.FULL
    # KV caches kept for API conversations; the least recently used beyond this are dropped, so
    # thousands of one-off requests never pile up caches (the engine's KV budget is the other bound).
    max_conversations: int = 16


@dataclass(frozen=True)
class Delta:
    """New answer text to send."""

    text: str


@dataclass(frozen=True)
class Done:
    """The end of an answer: why it ended, what it cost, and how long it took (the figures the UI shows)."""

    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens whose KV cache came from this conversation's previous turn
    waited_s: float = 0.0  # in the GPU's queue, behind other users' work (browser tabs and API alike)
    ttft_s: float | None = None  # from the request reaching the engine to the first token, the wait included
    turn_ttft_s: float | None = None  # the part of ttft_s after its turn came
    tokens_per_s: float | None = None  # decode speed after the first token


def session_id(model: str, request: ChatRequest) -> str:
    """The engine's KV-cache session for a conversation: its opening messages (and `user`) identify it.

    The next turn of the same chat repeats those messages, so it lands on the same cache and
    only prefills what is new; another conversation gets another cache. A hash, so no text
    of the chat is kept in the id.
    """
    first_user = next((i for i, m in enumerate(request.messages) if m["role"] == "user"), len(request.messages) - 1)
    opening = [model, request.user or "", request.messages[:first_user + 1]]
    return "api-" + hashlib.sha256(json.dumps(opening, sort_keys=True).encode()).hexdigest()[:32]


class ApiService:
    """The API's view of the engine: model names, the wait queue, and answering one request."""

    def __init__(self, engine: Engine, settings: ApiSettings = ApiSettings()):
        self.engine = engine
        self.settings = settings
        self.queue = WaitQueue(settings.max_waiting)
        self._loading = threading.Lock()  # API requests that switch the model do it one at a time
        self._conversations: OrderedDict[str, None] = OrderedDict()  # API session ids, least recent first
        self._conversations_lock = threading.Lock()

    def loaded_model(self) -> str | None:
        """The id of the model the app has loaded (what /v1/models lists first), if any."""
        loaded = self.engine.loaded
        return loaded.ref.label if loaded is not None else None

    def model_ids(self) -> list[str]:
        """Model ids a request may name: the loaded one, plus the catalog's when loads are allowed."""
        loaded = self.loaded_model()
        ids = [loaded] if loaded else []
        if self.settings.allow_load:
            ids += [i for i in self.engine.catalog.ids() if i != loaded]
        return ids

    def check_model(self, name: str | None) -> str:
        """The model a request will use, or a 404 (unknown) / 409 (not loaded, loads off) / 503 (none loaded)."""
        loaded = self.loaded_model()
        if name is None or name == loaded:
            if loaded is None:
                raise ApiError(503, "No model is loaded in the app yet; load one in the web UI (or start the app "
                                    "with --model).", code="no_model_loaded", headers={"Retry-After": "10"})
            return loaded
        # Only catalog ids: a request must never make the server read an arbitrary path or hub id.
        if name not in self.engine.catalog.entries:
            known = ", ".join(self.model_ids() or ["(none loaded)"])
            raise ApiError(404, f"The model {name!r} does not exist here. Available: {known}.", param="model",
                           code="model_not_found")
        if not self.settings.allow_load:
            raise ApiError(409, f"The model {name!r} is not loaded (the app has {loaded or 'no model'} loaded) and "
                                "this server does not load models for API requests: that would switch the model "
                                "for every user. Load it in the web UI, or start the app with --api-allow-load.",
                           param="model", code="model_not_loaded")
        return name

    def answer(self, request: ChatRequest, ticket: Ticket, stop_event: threading.Event) -> Iterator[Delta | Done]:
        """Stream the request's answer (it waits for its turn in the engine's queue, with the UI's answers);
        setting `stop_event` ends it early, or leaves the line.

        Runs in a worker thread. The ticket is released however this ends.
        """
        try:
            model = self._ensure_model(request.model)
            yield from self._generate(model, request, stop_event)
        finally:
            ticket.release()

    def _ensure_model(self, name: str | None) -> str:
        """Re-checked at the request's turn (the UI may have switched models meanwhile); loads if allowed."""
        wanted = self.check_model(name)
        if wanted != self.loaded_model():
            with self._loading:  # two requests for the same model load it once
                if wanted != self.loaded_model():
                    self.engine.load(wanted, self.settings.load_settings)
        return wanted

    def _remember(self, session: str) -> str:
        """Mark a conversation as used now; drop the KV cache of the least recent one beyond the limit."""
        with self._conversations_lock:
            self._conversations[session] = None
            self._conversations.move_to_end(session)
            stale = []
            while len(self._conversations) > self.settings.max_conversations:
                stale.append(self._conversations.popitem(last=False)[0])
        for old in stale:
            self.engine.drop_session(old)  # never waits: queued if an answer holds the engine
        return session

    def _generate(self, model: str, request: ChatRequest, stop_event: threading.Event) -> Iterator[Delta | Done]:
        loaded = self.engine.loaded
        if loaded is None or loaded.ref.label != model:
            raise ApiError(409, "The app's model changed before this answer could start; send the request again.",
                           param="model", code="model_changed")
        # Pin the answer to this exact model: if the UI switches meanwhile, the engine refuses
        # (ModelEvictedError -> 409) instead of answering from another model under this name.
        key = loaded.key
        sampling = SamplingSettings(
            max_new_tokens=request.max_tokens or self.settings.default_max_tokens,
            temperature=request.temperature, top_p=request.top_p, seed=request.seed,
        )
        scanner = StopScanner(request.stop)
        session = self._remember(session_id(model, request))
        updates = self.engine.chat(
            request.messages, sampling, stop_event, model=key, session=session,
            kv=self.settings.kv, policy=OverflowPolicy.REFUSE,  # an API client gets a 400, not a silently cut chat
        )
        try:
            for update in updates:
                if update.waiting is not None:
                    continue  # in the engine's line: nothing to send yet (Done says how long it waited)
                delta = scanner.feed(update.text, final=update.done)
                if delta:
                    yield Delta(delta)
                if scanner.hit:
                    stop_event.set()  # ends the computation at the next token
                if update.done:
                    stats = update.stats
                    length = stats.finish_reason == "length" and not scanner.hit
                    yield Done("length" if length else "stop", stats.prompt_tokens, stats.new_tokens,
                               stats.reused_tokens, stats.waited_s, stats.ttft_s, stats.turn_ttft_s,
                               stats.decode_tokens_per_s)
        finally:
            updates.close()  # if our caller stopped early: the engine stops and frees its lock

