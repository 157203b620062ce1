"""The decode step as an explicit loop over the decoder layers, so torch.compile compiles one layer for all.

Why: compiling the model's whole forward unrolls its N layers into one graph, so Inductor's time
grows with depth (a 7B's 32 layers: most of the ~45 s background compile on an H200 host,
BENCHMARKS.md). The layers differ only in their weights, which a compiled graph takes as inputs,
so one compiled layer serves them all. Compiling transformers' layers one by one did not help
(133 s, ../shared/FACTS.md): the attention passes its `layer_idx` to the cache, and the trace
specialized on it, once per layer. Here each layer is handed a one-layer view of the static cache
that ignores the index, so the trace never depends on it and the first layer's code is reused.

Only models whose forward is embed -> rotary -> layers -> norm -> lm_head (Llama, Qwen2, Mistral
and their checkpoints, InternLM2 once converted) take this path; others compile the whole forward.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch

# transformers model classes whose forward is exactly: embed, rotary, the layers in order, norm, lm_head.
LAYER_LOOP_MODELS = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM", "Qwen3ForCausalLM")


class LayerCache:
    """One layer of a StaticCache, seen by that layer's attention as a whole cache (the index is ignored)."""

    def __init__(self, layer):
        self.layer = layer

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx=None, cache_kwargs=None):
        """Write this token's keys/values into the layer; the whole layer's keys/values back."""
        return self.layer.update(key_states, value_states)


def run_layer(layer, hidden: torch.Tensor, mask: torch.Tensor, position_ids: torch.Tensor, cache: LayerCache,
              cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """One decoder layer on one token: the function torch.compile compiles once for every layer."""
    return layer(hidden, attention_mask=mask, position_ids=position_ids, past_key_values=cache, use_cache=True,
                 position_embeddings=(cos, sin))


def supports_layer_loop(model) -> bool:
    """Whether `model`'s forward is the plain embed / layers / norm / lm_head loop this module runs."""
    base = getattr(model, "model", None)
    return (type(model).__name__ in LAYER_LOOP_MODELS and hasattr(model, "lm_head")
            and all(hasattr(base, name) for name in ("embed_tokens", "layers", "norm", "rotary_emb")))


class LayerLoop:
    """The one-token forward of a model, layer by layer, over a StaticCache."""

    def __init__(self, model, cache):
        self.model = model
        self.caches = [LayerCache(layer) for layer in cache.layers]

    def scratch_caches(self, slot: int) -> list[LayerCache]:
        """Views of the same cache whose next write goes to `slot`, with write counters of their own.

        The compile's first run writes there, beside a running answer, without touching the
        counters that answer's step advances."""
        caches = []
        for layer in (c.layer for c in self.caches):
            scratch = copy.copy(layer)  # shares keys/values; the counter is replaced below
            scratch.cumulative_length = torch.full_like(layer.cumulative_length, slot)
            torch._dynamo.mark_static_address(scratch.cumulative_length)
            caches.append(LayerCache(scratch))
        return caches

    def logits(self, token: torch.Tensor, pos: torch.Tensor, positions: torch.Tensor,
               layer_fn: Callable = run_layer, caches: list[LayerCache] | None = None,
               dynamic_window: bool = False) -> torch.Tensor:
        """Logits [1, V] (fp32) of one token at `pos`, attending over the cache `positions` (a window).

        `layer_fn` runs each layer (run_layer, or its compiled form). `dynamic_window` marks the
        window's length as a symbol for the compile (one compiled layer for every window)."""
        base = self.model.model
        hidden = base.embed_tokens(token)
        position_ids = pos.view(1, 1)
        cos, sin = base.rotary_emb(hidden, position_ids)
        mask = (positions <= pos).view(1, 1, 1, -1)  # stale entries past `pos` are invisible
        if dynamic_window:
            # maybe_: a hint, not a constraint. On an H200 the trace guarded on windows of 129+
            # positions, and mark_dynamic's promise of 2+ failed the compile (every window is 512+).
            torch._dynamo.maybe_mark_dynamic(mask, 3)
        for layer, cache in zip(base.layers, caches or self.caches):
            hidden = layer_fn(layer, hidden, mask, position_ids, cache, cos, sin)
        return self.model.lm_head(base.norm(hidden)[:, -1]).float()
