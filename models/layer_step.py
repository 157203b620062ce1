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

from typing import Callable

import torch

# transformers model classes whose forward is exactly: embed, rotary, the layers in order, norm, lm_head.
LAYER_LOOP_MODELS = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM", "Qwen3ForCausalLM")


class LayerCache:
    """One layer of a StaticCache, seen by that layer's attention as a whole cache (the index is ignored).

    With `position` ([1], the token's position) the write goes there and the layer's write counter
    is left alone: transformers' StaticLayer advances a counter per layer, a one-element kernel in
    every layer of every step (`..._add_copy_` in an H200 profile), while the decode step already
    holds the position every layer writes at. (FastDecoder sets the counters before each prompt.)
    """

    def __init__(self, layer, position: torch.Tensor | None = None):
        self.layer = layer
        self.position = position

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx=None, cache_kwargs=None):
        """Write this token's keys/values into the layer; the whole layer's keys/values back."""
        if self.position is None:
            return self.layer.update(key_states, value_states)
        self.layer.keys.index_copy_(2, self.position, key_states)
        self.layer.values.index_copy_(2, self.position, value_states)
        return self.layer.keys, self.layer.values


def run_layer(layer, residual: torch.Tensor, delta: torch.Tensor, mask: torch.Tensor, position_ids: torch.Tensor,
              cache: LayerCache, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoder layer on one token, the function torch.compile compiles once for every layer.

    The layer's input is residual + delta and its output the pair (residual, MLP output), whose sum
    is the layer's output: the last residual add then runs in the next layer's compiled code, fused
    into its input norm, instead of as a kernel of its own at the end of every layer. The order of
    the operations is the decoder layer's own (pre-norm Llama / Qwen2 / Mistral / Qwen3 layers).
    """
    hidden = residual + delta
    attn, _ = layer.self_attn(hidden_states=layer.input_layernorm(hidden), attention_mask=mask,
                              position_ids=position_ids, past_key_values=cache, use_cache=True,
                              position_embeddings=(cos, sin))
    hidden = hidden + attn
    return hidden, layer.mlp(layer.post_attention_layernorm(hidden))


def supports_layer_loop(model) -> bool:
    """Whether `model`'s forward is the plain embed / layers / norm / lm_head loop this module runs."""
    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None) or []
    return (type(model).__name__ in LAYER_LOOP_MODELS and hasattr(model, "lm_head")
            and all(hasattr(base, name) for name in ("embed_tokens", "layers", "norm", "rotary_emb"))
            and all(all(hasattr(layer, name) for name in ("input_layernorm", "self_attn", "post_attention_layernorm",
                                                          "mlp")) for layer in layers))


class LayerLoop:
    """The one-token forward of a model, layer by layer, over a StaticCache.

    With `fold_norms` (default: where folded_norms.folds_norms allows it) its layers run with their
    RMSNorms folded into the int4 GEMVs (folded_norms.run_layer_folded), else as run_layer."""

    def __init__(self, model, cache, fold_norms: bool | None = None):
        from .folded_norms import folds_norms, mark_epilogues, run_layer_folded  # it builds on this module

        self.model = model
        self.cache_layers = list(cache.layers)
        self.folded = folds_norms(model) if fold_norms is None else fold_norms
        if self.folded:
            mark_epilogues(model)
        self.layer_fn: Callable = run_layer_folded if self.folded else run_layer  # what a compile compiles
        base = model.model
        # the norm each layer's output goes into: the next layer's input norm, the final norm after the last
        self.next_norms = [layer.input_layernorm for layer in base.layers[1:]] + [base.norm]

    def logits(self, token: torch.Tensor, pos: torch.Tensor, positions: torch.Tensor,
               layer_fn: Callable | None = None, caches: list[LayerCache] | None = None,
               dynamic_window: bool = False, inputs_fn: Callable | None = None) -> torch.Tensor:
        """Logits [1, V] (fp32) of one token at `pos` ([1]), attending over the cache `positions` (a window).

        Each layer writes its keys/values at `pos` (the compile's first run passes a scratch
        position beyond every answer's context, so it can run beside an answer). `layer_fn` runs
        each layer (self.layer_fn, or its compiled form), `inputs_fn` makes the first layer's inputs
        (step_inputs, or its compiled form); `caches` replaces the layers' caches (tests).
        `dynamic_window` marks the window's length as a symbol for the compile (one compiled layer
        for every window)."""
        layer_fn = layer_fn or self.layer_fn
        base = self.model.model
        if dynamic_window:
            # maybe_: a hint, not a constraint. On an H200 the trace guarded on windows of 129+
            # positions, and mark_dynamic's promise of 2+ failed the compile (every window is 512+).
            torch._dynamo.maybe_mark_dynamic(positions, 0)
        first_norm = base.layers[0].input_layernorm if self.folded else None
        state, cos, sin, mask = (inputs_fn or step_inputs)(base, token, pos, positions, first_norm)
        if dynamic_window:
            torch._dynamo.maybe_mark_dynamic(mask, 3)
        position_ids = pos.view(1, 1)
        caches = caches or [LayerCache(layer, pos) for layer in self.cache_layers]
        if self.folded:
            from .folded_norms import final_logits

            for layer, cache, norm in zip(base.layers, caches, self.next_norms):
                state = layer_fn(layer, *state, mask, position_ids, cache, cos, sin, norm.weight)
            return final_logits(self.model, *state[1:])
        for layer, cache in zip(base.layers, caches):
            state = layer_fn(layer, *state, mask, position_ids, cache, cos, sin)
        residual, delta = state
        return self.model.lm_head(base.norm(residual + delta)[:, -1]).float()


def step_inputs(base, token: torch.Tensor, pos: torch.Tensor, positions: torch.Tensor, first_norm=None):
    """The first layer's inputs in a one-token step: (state, cos, sin, mask).

    The state is the embedded token as (residual, delta = 0), or with `first_norm` (the first layer's
    input norm, when the norms are folded: folded_norms.py) as (h, h * its weight, the sum of h^2).
    A function of its own so that the background compile compiles it beside the layer: run eagerly,
    the embedding, the rotary embedding's cos and sin, the mask and the first norm's sums were a
    dozen small kernels one after another in every step."""
    hidden = base.embed_tokens(token)
    cos, sin = base.rotary_emb(hidden, pos.view(1, 1))
    mask = (positions <= pos).view(1, 1, 1, -1)  # stale entries past `pos` are invisible
    if first_norm is None:
        return (hidden, torch.zeros_like(hidden)), cos, sin, mask
    h = hidden.reshape(1, -1)
    hf = h.float()
    return (h, (hf * first_norm.weight.float()).to(h.dtype), hf.square().sum().reshape(1)), cos, sin, mask
