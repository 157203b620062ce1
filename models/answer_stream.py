"""One streaming shell for every local decoder: plain generate() and the fast int4 decoder.

A decoder supplies the computation: `produce(sink)` runs in a worker thread and hands over token
ids (sink.tokens) and facts only it knows (sink.note: reused prompt tokens, peak memory) as they
become known. The shell owns everything else, the same for both decoders: the worker and its
queue, Stop (the caller going away stops and joins the worker), the GPU lock handed back from the
worker (`on_worker_done`), incremental detokenizing, coalesced text updates, and the final stats
(TTFT, decode rate, finish reason, memory). TTFT counts from the user's send (`AnswerJob.sent_at`:
the wait for the GPU included) when given, else from the shell's start.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from .gpu_queue import Waiting
from .messages import Message


_DONE = object()
WAIT_SHOWN_S = 0.05  # a shorter wait for the GPU is not worth a word in the metrics line


@dataclass
class GenerationStats:
    """Metrics of one answer."""

    prompt_tokens: int
    new_tokens: int = 0
    # The user's send (the request entering the engine) to the first generated token: the wait for
    # the GPU included, as the user lives it. turn_ttft_s is the part after its turn came.
    ttft_s: float | None = None
    decode_tokens_per_s: float | None = None  # tokens after the first / time after the first
    total_s: float = 0.0
    finish_reason: str = ""  # "eos" | "length" | "stopped" | "error"
    # Peak during this answer: on a GPU the allocator's peak; on a CPU the model's own tensors plus this
    # answer's KV cache (models/model_memory.py), never the whole process.
    peak_bytes: int = 0
    process_rss_bytes: int = 0  # CPU only: the whole process's resident memory at the end (what RSS is)
    reused_tokens: int = 0  # prompt tokens whose KV came from the session's cache (not prefilled)
    dropped_messages: int = 0  # oldest messages left out to fit the context
    prompt_limit: int = 0  # tokens the prompt may use: the context minus the room kept for the answer
    waited_s: float = 0.0  # the send to its turn on the GPU: queued behind other users' work
    model: str = ""  # the model and quantization that wrote the answer, "smollm2-135m-instruct (4bit)"

    @property
    def turn_ttft_s(self) -> float | None:
        """Seconds from its turn on the GPU to the first token (templating, prefill)."""
        return None if self.ttft_s is None else max(0.0, self.ttft_s - self.waited_s)

    def summary(self) -> str:
        """'waited 3.2 s · TTFT 3.40 s (0.20 s after its turn) · 24.1 tok/s · 57 tokens' for the CLI."""
        parts = [f"waited {self.waited_s:.1f} s"] if self.waited_s >= WAIT_SHOWN_S else []
        if self.ttft_s is not None:
            turn = f" ({self.turn_ttft_s:.2f} s after its turn)" if parts else ""
            parts.append(f"TTFT {self.ttft_s:.2f} s{turn}")
        if self.decode_tokens_per_s is not None:
            parts.append(f"{self.decode_tokens_per_s:.1f} tok/s")
        parts.append(f"{self.new_tokens} tokens")
        if self.reused_tokens:
            parts.append(f"{self.reused_tokens}/{self.prompt_tokens} prompt tokens reused")
        if self.finish_reason == "stopped":
            parts.append("stopped")
        elif self.finish_reason == "length":
            parts.append("hit max new tokens")
        return " · ".join(parts)


@dataclass
class StreamUpdate:
    """The answer so far; `done` on the last update, when stats are final; `waiting` while it waits for the GPU."""

    text: str
    stats: GenerationStats
    done: bool = False
    token_ids: list[int] = field(default_factory=list)
    waiting: Waiting | None = None  # its place in line, how long, and who holds the GPU (no text yet)
    # A status line for this session only (its model being loaded for it), not answer text: shown, never sent.
    notice: Message | None = None


class IncrementalDecoder:
    """Turns a growing list of token ids into text deltas, token by token.

    Decodes a short window (from a few tokens back) instead of the whole answer each
    step, and holds text back while it ends in an incomplete UTF-8 sequence ("\ufffd"),
    so multi-byte characters (Chinese, emoji) never stream as garbage. The same
    prefix/read offsets scheme as text-generation-inference's detokenizer.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, new_ids: list[int]) -> str:
        """Add tokens; return the text they complete (may be empty)."""
        self.ids.extend(new_ids)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        text = self._decode(self.ids[self.prefix_offset:])
        if len(text) > len(prefix) and not text.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return text[len(prefix):]
        return ""

    def flush(self) -> str:
        """Text still held back at the end of an answer, less a dangling incomplete character.

        An answer cut off by max_new_tokens or Stop can end inside a multi-byte character;
        the complete characters before it are shown, the broken tail is not.
        """
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        text = self._decode(self.ids[self.prefix_offset:]).rstrip("\ufffd")
        self.prefix_offset = self.read_offset = len(self.ids)
        return text[len(prefix):] if len(text) > len(prefix) and text.startswith(prefix) else ""


class TokenSink:
    """What a decoder's worker reports through: new token ids, and stats fields only it knows."""

    def __init__(self, out: queue.Queue):
        self._out = out

    def tokens(self, ids: list[int]) -> None:
        """Hand over newly decoded token ids (timestamped now: TTFT and the decode rate come from these)."""
        if ids:
            self._out.put(("tokens", time.perf_counter(), list(ids)))

    def note(self, **fields) -> None:
        """Set GenerationStats fields (e.g. reused_tokens, peak_bytes), applied in order with the tokens."""
        self._out.put(("note", time.perf_counter(), fields))


@dataclass(frozen=True)
class AnswerJob:
    """One answer for the shell: the computation and what it needs to judge the result."""

    produce: Callable[[TokenSink], None]  # runs in the worker thread; returns when the answer has ended
    device: torch.device
    prompt_tokens: int
    max_new_tokens: int
    eos_ids: frozenset[int]
    context_limit: int | None = None  # the answer also ends ("length") when prompt + answer reach it
    min_interval_s: float = 0.0  # text updates at most this often (0: whenever the text grows)
    name: str = "answer"
    sent_at: float | None = None  # time.perf_counter() at the user's send: TTFT counts from it (else from the start)


def start_worker(run: Callable[[], None], name: str, on_worker_done: Callable[[], None] | None) -> threading.Thread:
    """Start the thread that computes an answer; if it cannot start, still run `on_worker_done`
    (the engine's lock is released there, so a failed start must not keep it)."""
    worker = threading.Thread(target=run, name=name, daemon=True)
    try:
        worker.start()
    except BaseException:
        if on_worker_done is not None:
            on_worker_done()
        raise
    return worker


def stream_answer(job: AnswerJob, tokenizer, stop_event: threading.Event,
                  on_worker_done: Callable[[], None] | None = None) -> Iterator[StreamUpdate]:
    """Run `job` in a worker and yield the growing text; the last update (done=True) has final stats.

    Closing the iterator early (the caller went away) sets `stop_event` and waits for the worker,
    so the computation never outlives its answer. `on_worker_done` runs in the worker thread once
    the computation has ended: the engine gives its GPU lock back there. TTFT counts from
    `job.sent_at` when given, else from here.
    """
    out: queue.Queue = queue.Queue()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            job.produce(TokenSink(out))
        except BaseException as e:  # surfaced to the caller below, in its own thread
            errors.append(e)
        finally:
            out.put(_DONE)
            if on_worker_done is not None:
                on_worker_done()

    stats = GenerationStats(prompt_tokens=job.prompt_tokens)
    started = time.perf_counter()
    origin = started if job.sent_at is None else job.sent_at  # TTFT from the user's send
    worker = start_worker(run, job.name, on_worker_done)
    decoder = IncrementalDecoder(tokenizer)
    text, shown, last_yield = "", 0, 0.0
    first_at = last_at = None
    new_ids: list[int] = []
    try:
        while True:
            item = out.get()
            if item is _DONE:
                break
            kind, at, payload = item
            if kind == "note":
                for name, value in payload.items():
                    setattr(stats, name, value)
                continue
            first_at = first_at or at
            last_at = at
            new_ids.extend(payload)
            text += decoder.push(payload)
            stats.new_tokens = len(new_ids)
            stats.ttft_s = first_at - origin
            now = time.perf_counter()
            if len(text) > shown and (shown == 0 or now - last_yield >= job.min_interval_s):
                shown, last_yield = len(text), now
                yield StreamUpdate(text=text, stats=stats)
    finally:
        # Runs on normal end, on error, and when the consumer closes us (browser gone, Stop
        # pressed in the UI): make sure the worker stops computing too.
        stop_event.set()
        worker.join()
    if errors:
        raise errors[0]
    text += decoder.flush()
    stats.total_s = time.perf_counter() - started
    stats.new_tokens = len(new_ids)
    if first_at is not None:
        stats.ttft_s = first_at - origin
        if stats.new_tokens > 1 and last_at > first_at:
            stats.decode_tokens_per_s = (stats.new_tokens - 1) / (last_at - first_at)
    stats.finish_reason = _finish_reason(job, new_ids)
    if job.device.type == "cpu":
        from .model_memory import process_rss_bytes

        stats.process_rss_bytes = process_rss_bytes()
    yield StreamUpdate(text=text, stats=stats, done=True, token_ids=new_ids)


def _finish_reason(job: AnswerJob, new_ids: list[int]) -> str:
    if new_ids and new_ids[-1] in job.eos_ids:
        return "eos"
    full = job.context_limit is not None and job.prompt_tokens + len(new_ids) >= job.context_limit
    if len(new_ids) >= job.max_new_tokens or full:
        return "length"
    return "stopped"


def eos_token_ids(model) -> frozenset[int]:
    """The ids that end an answer, from the model's generation config."""
    eos = model.generation_config.eos_token_id
    return frozenset(eos if isinstance(eos, list) else [eos] if eos is not None else [])
