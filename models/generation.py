"""Streaming chat generation with a Stop that halts the computation itself, and per-answer metrics.

transformers' generate() runs in a worker thread; a streamer (put() + end(), as in
transformers' own streamers) decodes tokens as they arrive and timestamps them; a
stopping criterion polls a threading.Event, so pressing Stop ends the GPU/CPU work at
the next token rather than just hiding the rest of the answer.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from .memory import PREFILL_CHUNK
from .messages import Message, UserFacingError

_DONE = object()


@dataclass(frozen=True)
class SamplingSettings:
    """How to pick tokens. temperature 0 means greedy."""

    max_new_tokens: int = 512
    temperature: float = 0.7
    top_p: float = 0.9
    seed: int | None = None

    def generate_kwargs(self) -> dict:
        """The generate() arguments for these settings."""
        if self.temperature <= 0:
            return {"do_sample": False, "max_new_tokens": self.max_new_tokens, "temperature": None, "top_p": None, "top_k": None}
        return {
            "do_sample": True, "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature, "top_p": self.top_p, "top_k": None,
        }


# Used when neither the model's generation_config.json nor the catalog gives a value.
APP_TEMPERATURE, APP_TOP_P = 0.7, 0.9


@dataclass(frozen=True)
class SamplingDefaults:
    """The sampling values a model should start with, and where they came from."""

    temperature: float
    top_p: float
    source: str  # "generation_config" (the model's own file) | "catalog" (models/catalog.toml) | "app"


def sampling_defaults(generation_config, entry=None) -> SamplingDefaults:
    """The model's recommended sampling: its generation_config.json, else its catalog entry, else the app's.

    Small models answer much better with low-temperature settings (the embedded SmolLM2-135M gets
    "capital of France" right ~6 times in 10 at 0.7 / 0.9 (issue 12), 20 in 20 at its catalog's 0.2 / 0.5).
    transformers 5 leaves temperature/top_p None unless the model's file sets them: None is "not given"."""
    temperature = getattr(generation_config, "temperature", None)
    top_p = getattr(generation_config, "top_p", None)
    if getattr(generation_config, "do_sample", None) is False and (temperature is not None or top_p is not None):
        temperature = 0.0  # the file asks for greedy decoding
    if temperature is not None or top_p is not None:
        fallback = sampling_defaults(None, entry)
        return SamplingDefaults(fallback.temperature if temperature is None else float(temperature),
                                fallback.top_p if top_p is None else float(top_p), "generation_config")
    if entry is not None and (entry.temperature is not None or entry.top_p is not None):
        return SamplingDefaults(APP_TEMPERATURE if entry.temperature is None else entry.temperature,
                                APP_TOP_P if entry.top_p is None else entry.top_p, "catalog")
    return SamplingDefaults(APP_TEMPERATURE, APP_TOP_P, "app")


@dataclass
class GenerationStats:
    """Metrics of one answer."""

    prompt_tokens: int
    new_tokens: int = 0
    ttft_s: float | None = None  # request start to first generated token
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
    model: str = ""  # the model and quantization that wrote the answer, "smollm2-135m-instruct (4bit)"

    def summary(self) -> str:
        """'TTFT 0.12 s · 24.1 tok/s · 57 tokens' for the UI and CLI."""
        parts = []
        if self.ttft_s is not None:
            parts.append(f"TTFT {self.ttft_s:.2f} s")
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
    """The answer so far; `done` on the last update, when stats are final."""

    text: str
    stats: GenerationStats
    done: bool = False
    token_ids: list[int] = field(default_factory=list)
    # A status line for this session only (its model being loaded for it), not answer text: shown, never sent.
    notice: Message | None = None


class StopOnEvent(StoppingCriteria):
    """Stops generate() at the next token once `event` is set (the Stop button)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


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


class _TimedQueueStreamer(BaseStreamer):
    """A generate() streamer: queues text deltas and records when tokens arrived."""

    def __init__(self, tokenizer, out: queue.Queue):
        self.decoder = IncrementalDecoder(tokenizer)
        self.out = out
        self.prompt_seen = False
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.new_ids: list[int] = []

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first hands over the prompt
            self.prompt_seen = True
            return
        now = time.perf_counter()
        if self.first_token_at is None:
            self.first_token_at = now
        self.last_token_at = now
        ids = value.reshape(-1).tolist()
        self.new_ids.extend(ids)
        text = self.decoder.push(ids)
        if text:
            self.out.put(text)

    def end(self) -> None:
        pass


class ChatTemplateError(UserFacingError):
    """The model's chat template refused this chat (e.g. "System role not supported")."""


class InvalidTextError(UserFacingError, ValueError):
    """A chat message holds text that is not valid Unicode (a lone UTF-16 surrogate)."""


def invalid_text_at(text: str) -> int | None:
    """Index of the first character that is not valid Unicode text (a lone UTF-16 surrogate), else None.

    JSON and JavaScript strings can carry half of a surrogate pair ("\\ud800"); tokenizers fail on it
    with an unrelated TypeError, so callers refuse such text with a sentence first."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return e.start
    return None


def chat_input_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a chat, formatted by the tokenizer's own chat template (ChatTemplateError if it refuses)."""
    from jinja2 import TemplateError

    for message in messages:
        at = invalid_text_at(message.get("content") or "")
        if at is not None:
            raise InvalidTextError("invalid_text", role=message.get("role"), char=ascii(message["content"][at]), at=at + 1)
    try:
        encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    except TemplateError as e:
        # Templates raise for chats they do not accept, e.g. "System role not supported".
        raise ChatTemplateError("template_rejected", detail=str(e)) from None
    return list(encoded["input_ids"])


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


def _device_peak(device: torch.device, model=None, cache=None) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_reserved(device)
    from .model_memory import model_ram_bytes

    # The cache only grows during an answer, so its size at the end is its peak.
    return model_ram_bytes(model, cache) if model is not None else 0


def stream_generate(
    model,
    tokenizer,
    input_ids: list[int],
    sampling: SamplingSettings,
    stop_event: threading.Event,
    past_key_values=None,
    on_worker_done: Callable[[], None] | None = None,
) -> Iterator[StreamUpdate]:
    """Generate an answer to `input_ids`, yielding the growing text; the last update has final stats.

    Closing the iterator early (the caller went away) also stops the computation.
    `on_worker_done` runs in the worker thread once the computation has ended: the
    engine releases its GPU lock there, so an abandoned iterator can't hold it.
    """
    device = model.get_input_embeddings().weight.device
    ids = torch.tensor([input_ids], dtype=torch.long, device=device)
    out: queue.Queue = queue.Queue()
    streamer = _TimedQueueStreamer(tokenizer, out)
    stats = GenerationStats(prompt_tokens=len(input_ids))
    errors: list[BaseException] = []
    peak: list[int] = []
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)

    def run() -> None:
        try:
            with torch.inference_mode():
                model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    streamer=streamer,
                    stopping_criteria=StoppingCriteriaList([StopOnEvent(stop_event)]),
                    past_key_values=past_key_values,
                    # Long prompts are prefilled in chunks, so the activation workspace stays
                    # bounded (and predictable by models/memory.py) at any context length.
                    prefill_chunk_size=PREFILL_CHUNK if past_key_values is not None else None,
                    **sampling.generate_kwargs(),
                )
        except BaseException as e:  # surfaced to the caller below, in its own thread
            errors.append(e)
        finally:
            # Measured before the engine's lock is released: afterwards it may be another answer's.
            peak.append(_device_peak(device, model, past_key_values))
            out.put(_DONE)
            if on_worker_done is not None:
                on_worker_done()

    started = time.perf_counter()
    worker = start_worker(run, "generate", on_worker_done)
    text = ""
    try:
        while True:
            item = out.get()
            if item is _DONE:
                break
            text += item
            stats.new_tokens = len(streamer.new_ids)
            if streamer.first_token_at is not None:
                stats.ttft_s = streamer.first_token_at - started
            yield StreamUpdate(text=text, stats=stats)
    finally:
        # Runs on normal end, on error, and when the consumer closes us (browser gone,
        # Stop pressed in the UI): make sure the worker stops computing too.
        stop_event.set()
        worker.join()
    if errors:
        raise errors[0]
    text += streamer.decoder.flush()
    stats.total_s = time.perf_counter() - started
    stats.new_tokens = len(streamer.new_ids)
    if streamer.first_token_at is not None:
        stats.ttft_s = streamer.first_token_at - started
        if stats.new_tokens > 1 and streamer.last_token_at > streamer.first_token_at:
            stats.decode_tokens_per_s = (stats.new_tokens - 1) / (streamer.last_token_at - streamer.first_token_at)
    if streamer.new_ids and streamer.new_ids[-1] in eos_ids:
        stats.finish_reason = "eos"
    elif stats.new_tokens >= sampling.max_new_tokens:
        stats.finish_reason = "length"
    else:
        stats.finish_reason = "stopped"
    stats.peak_bytes = peak[0] if peak else _device_peak(device, model, past_key_values)
    if device.type == "cpu":
        from .model_memory import process_rss_bytes

        stats.process_rss_bytes = process_rss_bytes()
    yield StreamUpdate(text=text, stats=stats, done=True, token_ids=list(streamer.new_ids))
