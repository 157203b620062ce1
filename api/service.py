"""One API answer through the shared engine: which model, which KV-cache session, stop strings, usage.

Blocking code, run in a worker thread per request (api/bridge.py); it knows nothing of HTTP
except the ApiErrors it raises for a model it cannot use.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Iterator

from models.facade import (
    Engine, KVPrecision, LoadSettings, ModelKey, ModelSpec, OverflowPolicy, Quant, SamplingSettings,
)

from .errors import ApiError
from .schema import ChatRequest
from .stops import StopScanner
from .waiting import Ticket, WaitQueue


@dataclass(frozen=True)
class ApiSettings:
    """How the API serves: from the command line."""

    # May a request load a catalog model that is not in memory? Only callers with the API key (app.py refuses
    # --api-allow-load without one): a load takes memory and may unload other users' idle models.
    allow_load: bool = False
    max_waiting: int = 8  # requests that may wait behind the running one before 503
    default_max_tokens: int = 512  # when a request gives no max_tokens
    load_settings: LoadSettings = LoadSettings()  # quantization, budget, context for loads by the API
    kv: KVPrecision = KVPrecision.FULL
    # KV caches kept for API conversations; the least recently used beyond this are dropped, so
    # thousands of one-off requests never pile up caches (the engine's KV budget is the other bound).
    max_conversations: int = 16


@dataclass(frozen=True)
class Target:
    """The model a request will use: a resident one by key, or (loads allowed) a catalog model to load in its turn."""

    name: str  # what the response's `model` says
    key: ModelKey | None = None
    spec: ModelSpec | None = None


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

    def __init__(self, engine: Engine, settings: ApiSettings = ApiSettings(), keyed: bool = False):
        self.engine = engine
        self.settings = settings
        # Loads only for callers who showed the key: with no key every caller is anonymous.
        self.may_load = settings.allow_load and keyed
        self.queue = WaitQueue(settings.max_waiting)
        self._conversations: OrderedDict[str, None] = OrderedDict()  # API session ids, least recent first
        self._conversations_lock = threading.Lock()

    def resident_ids(self) -> dict[str, ModelKey]:
        """Every name a request may give for a model in memory: ID (the app's default first, else the most
        recently used of that id) and ID:QUANT for each quantization in memory."""
        residents = [self.engine.loaded] if self.engine.loaded is not None else []
        residents += [m for m in reversed(self.engine.residents()) if m is not self.engine.loaded]
        ids: dict[str, ModelKey] = {}
        for m in residents:
            ids.setdefault(m.ref.label, m.key)
            if m.key.quant is not None:
                ids.setdefault(f"{m.ref.label}:{m.key.quant.value}", m.key)
        return ids

    def model_entries(self) -> list[tuple[str, dict]]:
        """(id, fields) for /v1/models: what is in memory, then catalog models (loadable by this caller or not)."""
        entries = [(i, {"resident": True, "loadable": False}) for i in self.resident_ids()]
        resident = {i for i, _ in entries}
        entries += [(i, {"resident": False, "loadable": self.may_load}) for i in self.engine.catalog.ids()
                    if i not in resident]
        return entries

    def model_ids(self) -> list[str]:
        """Model ids a request may name: those in memory, plus the catalog's when this server loads for the API."""
        return [i for i, fields in self.model_entries() if fields["resident"] or fields["loadable"]]

    def check_model(self, name: str | None) -> Target:
        """The model a request will use, or a 404 (unknown) / 409 (not in memory, no loads) / 503 (none in memory)."""
        residents = self.resident_ids()
        if name is None:
            if not residents:
                raise ApiError(503, "No model is loaded in the app yet; load one in the web UI (or start the app "
                                    "with --model).", code="no_model_loaded", headers={"Retry-After": "10"})
            name = next(iter(residents))
        if name in residents:
            return Target(name, key=residents[name])
        # Only catalog ids: a request must never make the server read an arbitrary path or hub id.
        model_id, _, quant = name.partition(":")
        known_quant = quant in {q.value for q in Quant}
        if model_id not in self.engine.catalog.entries or (quant and not known_quant):
            known = ", ".join(self.model_ids() or ["(none loaded)"])
            raise ApiError(404, f"The model {name!r} does not exist here. Available: {known}.", param="model",
                           code="model_not_found")
        if not self.may_load:
            why = ("API requests do not load models on this server" if not self.settings.allow_load else
                   "only callers with the API key may load models, and this server has no key")
            raise ApiError(409, f"The model {name!r} is not in memory and {why}: a load takes memory other users' "
                                f"models use. In memory now: {', '.join(residents) or 'no model'}. Load it in the web "
                                "UI, or start the app with --api-allow-load and an --api-key.",
                           param="model", code="model_not_loaded")
        settings = self.settings.load_settings
        return Target(name, spec=ModelSpec(model_id, replace(settings, quant=Quant(quant)) if quant else settings))

    def answer(self, request: ChatRequest, ticket: Ticket, stop_event: threading.Event) -> Iterator[Delta | Done]:
        """Stream the request's answer (it waits for its turn in the engine's queue, with the UI's answers);
        setting `stop_event` ends it early, or leaves the line.

        Runs in a worker thread. The ticket is released however this ends.
        """
        try:
            # Re-checked when it runs (a UI load may have unloaded the model meanwhile); a load (allowed callers
            # only) happens in this request's own turn in the engine's queue.
            yield from self._generate(self.check_model(request.model), request, stop_event)
        finally:
            ticket.release()

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

    def _generate(self, target: Target, request: ChatRequest, stop_event: threading.Event) -> Iterator[Delta | Done]:
        model = target.name
        # A resident model is pinned by key: if another user's load unloads it meanwhile, the engine refuses
        # (ModelEvictedError -> 409) instead of answering from another model under this name. A load
        # (allowed callers only) happens in this request's own turn.
        sampling = SamplingSettings(
            max_new_tokens=request.max_tokens or self.settings.default_max_tokens,
            temperature=request.temperature, top_p=request.top_p, seed=request.seed,
        )
        scanner = StopScanner(request.stop)
        session = self._remember(session_id(model, request))
        updates = self.engine.chat(
            request.messages, sampling, stop_event, model=target.key, session=session, spec=target.spec,
            kv=self.settings.kv, policy=OverflowPolicy.REFUSE,  # an API client gets a 400, not a silently cut chat
        )
        try:
            for update in updates:
                if update.waiting is not None or update.notice is not None:
                    # In the engine's line, or "loading … for you": nothing to send yet (Done says how long it waited).
                    continue
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

