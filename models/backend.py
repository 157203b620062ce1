"""What the engine asks of a backend that answers chats, whichever it is: a resident local transformers
model (LocalBackend, models/local_answer.py) or a remote OpenAI-compatible engine (RemoteModel,
models/remote.py). The engine picks one per answer; the front ends never know which."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Iterator, Protocol

from .generation import SamplingSettings, StreamUpdate
from .kv_cache import KVPrecision, OverflowPolicy


@dataclass(frozen=True)
class AnswerRequest:
    """One answer to stream: the chat, how to sample, its Stop switch, and the local-only options."""

    messages: list[dict]  # [{role, content}], the last one the user's
    sampling: SamplingSettings
    stop_event: threading.Event
    session: str | None = None  # whose KV cache to reuse and keep (a local model's; a server keeps its own)
    kv: KVPrecision = KVPrecision.FULL
    policy: OverflowPolicy = OverflowPolicy.DROP_OLDEST  # when the chat outgrows the context
    sent_at: float | None = None  # time.perf_counter() when the request entered the engine: TTFT counts from it


class Backend(Protocol):
    """Answers chats. Its updates carry the growing text; the last one (done) carries the final stats."""

    def answer(self, request: AnswerRequest) -> Iterator[StreamUpdate]:
        """Stream the answer to `request`; closing the iterator early stops the computation."""
        ...
