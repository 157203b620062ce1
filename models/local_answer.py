"""The local backend's answer: a chat fitted into the context, streamed from a resident
transformers model in its turn on the GPU, reusing and keeping the session's KV cache.

The answer waits for its turn in the engine's fair queue (models/gpu_queue.py) in the caller's
thread, saying where it stands every WAIT_UPDATE_S; Stop (or a client gone) leaves the line. The
turn is given back by the worker thread that computes, when the computation ends: an answer whose
iterator the caller abandons without closing it (a browser gone mid-stream) must not keep the GPU
from every other user.
"""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Callable, Iterator

import torch

from .backend import AnswerRequest
from .generation import GenerationStats, SamplingSettings, StreamUpdate, chat_input_ids, stream_generate
from .gpu_queue import Ticket, Work
from .kv_cache import ContextOverflowError, KVPrecision, OverflowPolicy, SessionCache, fit_messages, new_cache
from .loading import LoadedModel, free_cuda_memory
from .memory import kv_bytes_per_token
from .residency import ModelSpec, resident_for_answer
from .settings import ModelKey, ModelLoadError

if TYPE_CHECKING:
    from .engine import Engine

# Tokens kept free for the answer when the context is full and max_new_tokens is larger.
MIN_ANSWER_TOKENS = 64
WAIT_UPDATE_S = 0.5  # how often an answer waiting for the GPU says where it stands


class ModelEvictedError(ModelLoadError):
    """The model an answer was asked of is no longer resident (evicted to make room for another)."""


def kv_token_bytes(loaded: LoadedModel, kv: KVPrecision) -> int:
    """KV bytes per token of context for a loaded model at a cache precision."""
    if kv is KVPrecision.FP8:
        return kv_bytes_per_token(loaded.shape, 1)
    return kv_bytes_per_token(loaded.shape, torch.empty(0, dtype=loaded.model.dtype).element_size())


class _Turn:
    """One answer's turn on the GPU (its ticket, granted): released exactly once, by whichever thread gets there first."""

    def __init__(self, engine: "Engine", ticket: Ticket):
        self.engine = engine
        self.ticket = ticket
        self._released = False
        self._guard = threading.Lock()
        engine._drop_pending_locked()

    def release(self) -> None:
        """Give the GPU back (and drop the sessions of tabs closed meanwhile); later calls do nothing."""
        with self._guard:
            if self._released:
                return
            self._released = True
            self.engine._live_cache = None
            self.engine._drop_pending_locked()
            self.ticket.release()


class LocalBackend:
    """The Backend of a local model (`pinned`: the caller named the model, so an evicted one is an error;
    `spec`: the session's own choice, made resident when its turn comes)."""

    def __init__(self, engine: "Engine", key: ModelKey | None, pinned: bool, spec: ModelSpec | None = None):
        self.engine, self.key, self.pinned, self.spec = engine, key, pinned, spec

    def answer(self, request: AnswerRequest) -> Iterator[StreamUpdate]:
        """Wait for the GPU in turn (saying where it stands), then stream the answer over the session's KV cache."""
        r = request
        sent_at = time.perf_counter() if r.sent_at is None else r.sent_at
        ticket = self.engine._lock.ticket(Work("answer"), give_up=r.stop_event)
        try:
            while not ticket.wait(WAIT_UPDATE_S):
                if ticket.state == "left":  # Stop pressed (or the client left) while waiting: nothing was computed
                    gave_up = GenerationStats(0, finish_reason="stopped", waited_s=time.perf_counter() - sent_at)
                    yield StreamUpdate(text="", stats=gave_up, done=True)
                    return
                waited = GenerationStats(0, waited_s=time.perf_counter() - sent_at)
                yield StreamUpdate(text="", stats=waited, waiting=ticket.waiting())
        except BaseException:  # the caller closed us while we waited: leave the line, holding nothing
            ticket.release()
            raise
        waited_s = time.perf_counter() - sent_at
        updates = answer_local(self.engine, _Turn(self.engine, ticket), self.key, self.pinned, r.messages,
                               r.sampling, r.stop_event, r.session, r.kv, r.policy, sent_at, self.spec)
        try:
            for update in updates:
                update.stats.waited_s = waited_s
                yield update
        finally:
            updates.close()  # a caller gone mid-answer stops the computation, which gives the turn back


def answer_local(engine: "Engine", turn: _Turn, key: ModelKey | None, pinned: bool, messages: list[dict],
                 sampling: SamplingSettings, stop_event: threading.Event, session: str | None,
                 kv: KVPrecision, policy: OverflowPolicy, sent_at: float | None = None,
                 spec: ModelSpec | None = None) -> Iterator[StreamUpdate]:
    """Stream a local model's answer in its `turn`; the steps are make `spec` resident (if given), fit, then
    generate (or the fast decoder)."""
    out_of_memory = False
    updates = None
    try:
        # The session's own model is loaded in its own turn, so no answer in flight loses its model.
        # (Those waiting behind it read that this turn is loading a model, and how far.)
        loaded = ((yield from resident_for_answer(engine, key, spec, turn.ticket)) if spec is not None
                  else _resident(engine, key, pinned))
        if kv is KVPrecision.OFFLOAD and loaded.device != "cuda":
            kv = KVPrecision.FULL  # offloading the cache only means something on a GPU
        ids, dropped, prompt_limit = fit_chat(engine, loaded, messages, sampling, kv, policy)
        if loaded.fast is not None:
            updates = _fast_updates(engine, loaded, ids, sampling, stop_event, turn.release, sent_at)
        else:
            updates = _generate_updates(engine, loaded, key, ids, sampling, stop_event, session, kv, turn.release,
                                        sent_at)
        for update in updates:
            update.stats.dropped_messages = len(dropped)
            update.stats.prompt_limit = prompt_limit
            yield update
    except torch.OutOfMemoryError as e:
        e.__traceback__ = None  # its frames hold the activations and cache we must free
        out_of_memory = True
    except GeneratorExit:  # the caller went away; the cache is consistent with token_ids
        if updates is not None:
            updates.close()  # stops and joins the computation before the lock is given back
        raise
    except BaseException:
        if session is not None:  # a cache in an unknown state is never reused
            engine._sessions.drop(session)
        raise
    finally:
        turn.release()  # no-op if the worker already released; else it never started
    if out_of_memory:
        with engine._lock:
            if session is not None:
                engine._sessions.drop(session)
            free_cuda_memory()
        raise ModelLoadError("oom_answer")


def _resident(engine: "Engine", key: ModelKey | None, pinned: bool) -> LoadedModel:
    loaded = engine._residents.get(key) if key else None
    if loaded is None and pinned:
        raise ModelEvictedError("evicted", model=key.location)
    if loaded is None:
        raise ModelLoadError("no_model")
    engine._residents.move_to_end(key)
    return loaded


def _generate_updates(engine: "Engine", loaded: LoadedModel, key: ModelKey, ids: list[int], sampling: SamplingSettings,
                      stop_event: threading.Event, session: str | None, kv: KVPrecision,
                      release: Callable[[], None], sent_at: float | None) -> Iterator[StreamUpdate]:
    """Plain generate() over the session's cache, cropped to what it shares with this chat."""
    entry = engine._sessions.get(session, key, kv) if session is not None else None
    reused = entry.reuse_for(ids) if entry is not None else 0
    if reused == 0:
        entry = SessionCache(model_key=key, precision=kv, cache=new_cache(loaded.model.config, kv))
    room = engine.context_limit(loaded, kv) - len(ids)
    sampling = replace(sampling, max_new_tokens=max(1, min(sampling.max_new_tokens, room)))
    if session is not None:
        engine._sessions.put(session, entry)
        # Room for this answer's whole context: older sessions' caches go first.
        need = kv_token_bytes(loaded, kv) * (len(ids) + sampling.max_new_tokens) - entry.nbytes
        engine._sessions.evict_until(max(0, engine.kv_budget_bytes(loaded) - need), keep=session)
    else:
        engine._live_cache = entry.cache
    entry.token_ids = ids[:reused]  # until the answer is done the cache is only known to hold the reused prefix
    for update in stream_generate(loaded.model, loaded.tokenizer, ids, sampling, stop_event, entry.cache,
                                  on_worker_done=release, sent_at=sent_at):
        update.stats.reused_tokens = reused
        if update.done:
            entry.token_ids = ids + update.token_ids
        yield update


def _fast_updates(engine: "Engine", loaded: LoadedModel, ids: list[int], sampling: SamplingSettings,
                  stop_event: threading.Event, release: Callable[[], None], sent_at: float | None) -> Iterator[StreamUpdate]:
    """Answer through the model's FastDecoder (Quant.INT4).

    It owns one static cache per model, sized to the context at load, and reuses the longest
    common prefix with whatever it answered last: a session's next turn reuses its history
    unless another session answered in between (then it is prefilled again, never mixed).
    """
    room = min(loaded.fast.max_context, engine.context_limit(loaded)) - len(ids)
    sampling = replace(sampling, max_new_tokens=max(1, min(sampling.max_new_tokens, room)))
    yield from loaded.fast.stream(loaded.tokenizer, ids, sampling, stop_event, on_worker_done=release, sent_at=sent_at)


def fit_chat(engine: "Engine", loaded: LoadedModel, messages: list[dict], sampling: SamplingSettings, kv: KVPrecision,
             policy: OverflowPolicy) -> tuple[list[int], list[dict], int]:
    """Token ids of the chat after the overflow policy, the messages it dropped, and the prompt's limit.

    The limit is the one an overflow error names, so a later "context full" notice can say the same number."""
    limit = engine.context_limit(loaded, kv)
    answer_room = min(sampling.max_new_tokens, max(MIN_ANSWER_TOKENS, limit // 4))
    max_prompt = limit - answer_room
    if max_prompt <= 0:
        raise ContextOverflowError("no_context_room", limit=limit)
    ids = chat_input_ids(loaded.tokenizer, messages)
    if len(ids) <= max_prompt:  # the usual case: template the chat once
        return ids, [], max_prompt

    def count(msgs: list[dict]) -> int:
        return len(chat_input_ids(loaded.tokenizer, msgs))

    kept, dropped = fit_messages(messages, count, max_prompt, policy)
    return chat_input_ids(loaded.tokenizer, kept), dropped, max_prompt
