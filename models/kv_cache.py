"""Per-session KV caches: prefix reuse across turns, fitting a chat into the context, LRU eviction.

Each chat session keeps the KV cache of its last turn and the token ids it covers. The
next turn only prefills what changed: the cache is cropped to the longest common token
prefix with the new prompt and generate() continues from there (regenerate, undo and
edits simply crop further back). Greedy output is identical to a fresh full-prompt run.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from enum import Enum
from typing import Callable

import torch

from .messages import UserFacingError


class KVPrecision(str, Enum):
    """How the KV cache is held."""

    FULL = "full"  # the model's compute dtype (fp16 on GPU)
    FP8 = "fp8"  # transformers QuantizedCache, fp8 backend: half of fp16, needs no extra package
    OFFLOAD = "offload"  # CUDA only: layers' KV kept in CPU RAM, prefetched per layer


class OverflowPolicy(str, Enum):
    """What to do when the next turn would not fit the context."""

    DROP_OLDEST = "drop_oldest"  # drop the oldest turns, keep the system prompt
    REFUSE = "refuse"  # tell the user and change nothing


class ContextOverflowError(UserFacingError):
    """The chat does not fit the context and the policy (or a too-long message) forbids cutting it."""


def kv_precision_options(device: str) -> list[KVPrecision]:
    """KV precisions that work on this device (offloading needs CUDA)."""
    return [KVPrecision.FULL, KVPrecision.FP8] + ([KVPrecision.OFFLOAD] if device == "cuda" else [])


def new_cache(config, precision: KVPrecision):
    """An empty transformers Cache of the chosen precision."""
    from transformers import DynamicCache, QuantizedCache

    if precision is KVPrecision.FP8:
        return QuantizedCache(backend="fp8", config=config)
    if precision is KVPrecision.OFFLOAD:
        return DynamicCache(config=config, offloading=True)
    return DynamicCache(config=config)


def cache_bytes(cache) -> int:
    """Bytes held by a cache's key/value tensors (quantized ones included)."""
    if cache is None:
        return 0
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values", "_quantized_keys", "_quantized_values"):
            value = getattr(layer, name, None)
            if isinstance(value, tuple):  # quantized: (tensor, scale)
                value = value[0]
            if isinstance(value, torch.Tensor) and value.numel() > 1:
                total += value.numel() * value.element_size()
    return total


def cache_length(cache) -> int:
    """Tokens held by a cache."""
    return int(cache.get_seq_length()) if cache is not None else 0


def _fp8_layers(cache) -> list:
    """The cache's layers if they are all transformers' fp8 layers, else []."""
    try:
        from transformers.cache_utils import Fp8QuantizedLayer
    except ImportError:  # an older transformers: its quantized caches are not cropped here
        return []
    layers = list(getattr(cache, "layers", []))
    return layers if layers and all(isinstance(layer, Fp8QuantizedLayer) for layer in layers) else []


def crop_cache(cache, keep: int) -> None:
    """Cut a cache back to its first `keep` tokens (a no-op if it holds no more)."""
    length = cache_length(cache)
    if length <= keep:
        return
    fp8 = _fp8_layers(cache)
    if not fp8:
        # A negative count removes that many tokens from the end. Counted from the cache's own
        # length: after a stopped answer it may hold tokens the session's token list does not.
        cache.crop(keep - length)
        return
    # transformers' fp8 layer cannot crop (DynamicLayer.crop cuts the unused full-precision
    # tensors and leaves the length). Its states are append-only with a per-tensor scale fixed
    # at the first update, so cutting the stored fp8 tensors along the sequence leaves exactly
    # the state a run that stopped at `keep` tokens would have (when `keep` covers that first
    # update; else only the scale differs, calibrated on a few more tokens).
    for layer in fp8:
        if not layer.is_initialized:
            continue
        for name in ("_quantized_keys", "_quantized_values"):
            states, scale = getattr(layer, name)
            setattr(layer, name, (states[..., :keep, :].contiguous(), scale))
        layer.cumulative_length = keep


def common_prefix_length(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


@dataclass
class SessionCache:
    """One chat session's cache and the tokens whose keys/values it holds."""

    model_key: str
    precision: KVPrecision
    cache: object
    token_ids: list[int] = field(default_factory=list)
    last_used: float = field(default_factory=time.monotonic)

    @property
    def nbytes(self) -> int:
        """Bytes of KV held."""
        return cache_bytes(self.cache)

    def reuse_for(self, prompt_ids: list[int]) -> int:
        """Crop the cache to what `prompt_ids` shares with it; return how many tokens are reused.

        At least one prompt token is always left to prefill: generate() needs an input.
        Returns 0 (and the caller starts afresh) if the cache cannot be cropped.
        """
        held = min(cache_length(self.cache), len(self.token_ids))
        keep = min(common_prefix_length(self.token_ids[:held], prompt_ids), len(prompt_ids) - 1)
        if keep <= 0:
            return 0
        try:
            crop_cache(self.cache, keep)
        except (ValueError, RuntimeError, NotImplementedError, AttributeError, IndexError):
            return 0  # e.g. a quantized cache that can't be cut back: rebuild
        if cache_length(self.cache) != keep:
            return 0
        self.token_ids = self.token_ids[:keep]
        return keep


class SessionCacheStore:
    """Caches of all chat sessions, least recently used first out when memory is short."""

    def __init__(self) -> None:
        self._entries: OrderedDict[str, SessionCache] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, session_id: str, model_key: str, precision: KVPrecision) -> SessionCache | None:
        """The session's cache if it belongs to this model and precision (else it is dropped)."""
        entry = self._entries.get(session_id)
        if entry is None:
            return None
        if entry.model_key != model_key or entry.precision is not precision:
            self.drop(session_id)
            return None
        self._entries.move_to_end(session_id)
        entry.last_used = time.monotonic()
        return entry

    def put(self, session_id: str, entry: SessionCache) -> None:
        """Store (or replace) a session's cache as the most recently used."""
        self._entries[session_id] = entry
        self._entries.move_to_end(session_id)
        entry.last_used = time.monotonic()

    def drop(self, session_id: str) -> bool:
        """Forget a session's cache (tab closed, OOM, model gone)."""
        return self._entries.pop(session_id, None) is not None

    def drop_model(self, model_key: str) -> int:
        """Forget every cache built by a model that is being unloaded."""
        ids = [s for s, e in list(self._entries.items()) if e.model_key == model_key]
        for session_id in ids:
            del self._entries[session_id]
        return len(ids)

    def total_bytes(self, exclude: str | None = None) -> int:
        """KV bytes held by all sessions (optionally not counting one)."""
        # A copy: the VRAM panel's timer reads this from another thread while answers run.
        return sum(e.nbytes for s, e in list(self._entries.items()) if s != exclude)

    def model_bytes(self, model_key: str) -> int:
        """KV bytes held by the sessions of one model."""
        return sum(e.nbytes for e in list(self._entries.values()) if e.model_key == model_key)

    def evict_until(self, budget_bytes: int, keep: str | None = None) -> list[str]:
        """Drop least recently used caches (never `keep`) until the rest fit `budget_bytes`."""
        evicted = []
        for session_id in list(self._entries):
            if self.total_bytes() <= budget_bytes:
                break
            if session_id != keep:
                del self._entries[session_id]
                evicted.append(session_id)
        return evicted

    def sessions(self) -> list[str]:
        """Session ids, least recently used first."""
        return list(self._entries)


def fit_messages(
    messages: list[dict],
    count_tokens: Callable[[list[dict]], int],
    max_prompt_tokens: int,
    policy: OverflowPolicy = OverflowPolicy.DROP_OLDEST,
) -> tuple[list[dict], list[dict]]:
    """Make a chat fit `max_prompt_tokens`: return (messages to send, messages dropped).

    The system prompt and the last user message are always kept; older turns go first,
    a user message together with the answers that follow it.
    """
    if count_tokens(messages) <= max_prompt_tokens:
        return messages, []
    if policy is OverflowPolicy.REFUSE:
        needed = count_tokens(messages)
        raise ContextOverflowError("overflow_refused", needed=needed, allowed=max_prompt_tokens)
    head = [m for m in messages[:1] if m["role"] == "system"]
    body = messages[len(head):]
    dropped: list[dict] = []
    while len(body) > 1 and count_tokens(head + body) > max_prompt_tokens:
        # Drop one whole turn: the first message and any non-user messages after it.
        cut = 1
        while cut < len(body) - 1 and body[cut]["role"] != "user":
            cut += 1
        dropped.extend(body[:cut])
        body = body[cut:]
    kept = head + body
    if count_tokens(kept) > max_prompt_tokens:
        needed = count_tokens(kept)
        raise ContextOverflowError("message_too_long", needed=needed, allowed=max_prompt_tokens)
    return kept, dropped
