"""Chat generation with transformers' generate(): sampling settings, chat templating, and the plain decoder.

generate() runs as the computation of the shared answer shell (models/answer_stream.py); a
streamer (put() + end(), as in transformers' own streamers) hands each token to the shell, and
a stopping criterion polls a threading.Event, so pressing Stop ends the GPU/CPU work at the next
token rather than just hiding the rest of the answer. The stream types (GenerationStats,
StreamUpdate, IncrementalDecoder) live with the shell and are re-exported here.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

# GenerationStats and StreamUpdate are re-exported: the stream types live with the shell.
from .answer_stream import AnswerJob, GenerationStats, StreamUpdate, TokenSink, eos_token_ids, stream_answer  # noqa: F401
from .memory import PREFILL_CHUNK
from .messages import UserFacingError

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


class StopOnEvent(StoppingCriteria):
    """Stops generate() at the next token once `event` is set (the Stop button)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


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


def _device_peak(device: torch.device, model=None, cache=None) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_reserved(device)
    from .model_memory import model_ram_bytes

    # The cache only grows during an answer, so its size at the end is its peak.
    return model_ram_bytes(model, cache) if model is not None else 0


class _SinkStreamer(BaseStreamer):
    """A generate() streamer that hands each new token to the answer shell's sink (not the prompt)."""

    def __init__(self, sink: TokenSink):
        self.sink = sink
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first hands over the prompt
            self.prompt_seen = True
            return
        self.sink.tokens(value.reshape(-1).tolist())

    def end(self) -> None:
        pass


def stream_generate(
    model,
    tokenizer,
    input_ids: list[int],
    sampling: SamplingSettings,
    stop_event: threading.Event,
    past_key_values=None,
    on_worker_done: Callable[[], None] | None = None,
) -> Iterator[StreamUpdate]:
    """Generate an answer to `input_ids` with transformers' generate(), through the shared answer shell.

    Closing the iterator early (the caller went away) also stops the computation.
    `on_worker_done` runs in the worker thread once the computation has ended: the
    engine releases its GPU lock there, so an abandoned iterator can't hold it.
    """
    device = model.get_input_embeddings().weight.device

    def produce(sink: TokenSink) -> None:
        ids = torch.tensor([input_ids], dtype=torch.long, device=device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        try:
            with torch.inference_mode():
                model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    streamer=_SinkStreamer(sink),
                    stopping_criteria=StoppingCriteriaList([StopOnEvent(stop_event)]),
                    past_key_values=past_key_values,
                    # Long prompts are prefilled in chunks, so the activation workspace stays
                    # bounded (and predictable by models/memory.py) at any context length.
                    prefill_chunk_size=PREFILL_CHUNK if past_key_values is not None else None,
                    **sampling.generate_kwargs(),
                )
        finally:
            # Measured before the engine's lock is released: afterwards it may be another answer's.
            sink.note(peak_bytes=_device_peak(device, model, past_key_values))

    job = AnswerJob(produce=produce, device=device, prompt_tokens=len(input_ids),
                    max_new_tokens=sampling.max_new_tokens, eos_ids=eos_token_ids(model), name="generate")
    return stream_answer(job, tokenizer, stop_event, on_worker_done)
