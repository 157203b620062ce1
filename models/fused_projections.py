"""q/k/v as one linear layer and gate/up as one, for the int4 fast path (fewer, larger GEMVs).

Why: a batch-1 decode step is a string of matrix-vector products, and on an H200 each one costs at
least ~5 us whatever its size (bench/int4_gemv_sweep.py: a 2.2 MB k_proj takes as long as a
matrix four times larger). A Llama layer runs 7 of them; with q/k/v and gate/up concatenated it
runs 4, so a 7B step launches 128 GEMVs instead of 224. Prompts gain too: one dequantize and one
larger cuBLAS matmul instead of three or two. Serving engines do the same (vLLM's
QKVParallelLinear / MergedColumnParallelLinear); transformers' Llama and Qwen2 keep them apart.

How: the full-precision weights are concatenated along the output dimension *before* they are
quantized, so the int4 weight of the fused layer holds, row for row, exactly what the separate
ones would (int4 groups run along the input dimension, one output row at a time). q/k/v are laid
end to end; gate and up alternate row by row (gate_and_up), so that the decode step's GEMV finishes
each gate beside its up and applies the activation there (kernels/int4_epilogue.py). The attention
and MLP modules get a forward that calls the fused layer and splits its output; otherwise it is
transformers' own forward, line for line (rotary, cache update, the attention interface).
"""

from __future__ import annotations

import functools
import sys

import torch

from .attention import decode_step_attention
from .kernels.int4_folded import gate_and_up

# transformers modules whose forward the fused one reproduces (checked against transformers 5.x).
# Qwen3 (q/k norms) and InternLM2's remote code are not among them: they keep their own forward.
FUSABLE_ATTENTION = ("LlamaAttention", "Qwen2Attention")
FUSABLE_MLP = ("LlamaMLP", "Qwen2MLP")


def _concatenated(linears: list[torch.nn.Linear], interleave: bool = False) -> torch.nn.Linear:
    """One Linear whose output is the outputs of `linears`, in order (weights and biases concatenated); with
    `interleave` (equal widths), row by row instead: output 2i is the first's output i, 2i + 1 the second's."""
    first = linears[0]
    has_bias = any(m.bias is not None for m in linears)
    out = sum(m.out_features for m in linears)
    fused = torch.nn.Linear(first.in_features, out, bias=has_bias, device="meta")
    join = (lambda parts: torch.stack(parts, dim=1).flatten(0, 1)) if interleave else torch.cat
    fused.weight = torch.nn.Parameter(join([m.weight.detach() for m in linears]), requires_grad=False)
    if has_bias:
        biases = [m.bias.detach() if m.bias is not None else first.weight.new_zeros(m.out_features) for m in linears]
        fused.bias = torch.nn.Parameter(join(biases), requires_grad=False)
    return fused


def _fused_attention_forward(self, hidden_states, position_embeddings, attention_mask, past_key_values=None, **kwargs):
    """transformers' Llama/Qwen2 attention forward, with q/k/v from one fused projection (a decode step of
    the layer loop: rotation, cache write and attention in one kernel, attention.decode_step_attention)."""
    fused = decode_step_attention(self, hidden_states, position_embeddings, attention_mask, past_key_values)
    if fused is not None:
        return self.o_proj(fused), None
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    query, key, value = self.qkv_proj(hidden_states).split(self.qkv_sizes, dim=-1)
    query_states = query.reshape(hidden_shape).transpose(1, 2)
    key_states = key.reshape(hidden_shape).transpose(1, 2)
    value_states = value.reshape(hidden_shape).transpose(1, 2)
    cos, sin = position_embeddings
    query_states, key_states = self.apply_rotary(query_states, key_states, cos, sin)
    if past_key_values is not None:
        key_states, value_states = past_key_values.update(key_states, value_states, self.layer_idx)
    attention_interface = self.attention_functions.get_interface(self.config._attn_implementation,
                                                                self.eager_attention)
    if hasattr(self, "sliding_window"):  # Qwen2 passes its window (None on full-attention layers)
        kwargs["sliding_window"] = self.sliding_window
    attn_output, attn_weights = attention_interface(
        self, query_states, key_states, value_states, attention_mask,
        dropout=0.0 if not self.training else self.attention_dropout, scaling=self.scaling, **kwargs)
    attn_output = attn_output.reshape(*input_shape, -1).contiguous()
    return self.o_proj(attn_output), attn_weights


def _fused_mlp_forward(self, x):
    """transformers' gated MLP forward, with gate and up from one fused projection (interleaved rows:
    gate_and_up says why)."""
    gate, up = gate_and_up(self.gate_up_proj(x))
    return self.down_proj(self.act_fn(gate) * up)


@functools.cache
def _fused_class(cls: type) -> type:
    """A subclass of transformers' attention or MLP class whose forward uses the fused projection."""
    if cls.__name__ in FUSABLE_MLP:
        return type(f"Fused{cls.__name__}", (cls,), {"forward": _fused_mlp_forward})
    home = sys.modules[cls.__module__]  # the model's own rotary and eager attention functions
    return type(f"Fused{cls.__name__}", (cls,), {
        "forward": _fused_attention_forward,
        "apply_rotary": staticmethod(home.apply_rotary_pos_emb),
        "eager_attention": staticmethod(home.eager_attention_forward),
        "attention_functions": home.ALL_ATTENTION_FUNCTIONS,
    })


def fuse_projections(model: torch.nn.Module) -> int:
    """Concatenate each layer's q/k/v and gate/up Linears (full precision, before quantizing); modules fused.

    Only transformers' Llama and Qwen2 attention and MLP modules are touched; anything else (or a
    module whose projections are not plain Linears with one input width) is left as it is.
    """
    fused = 0
    for module in list(model.modules()):
        name = type(module).__name__
        if name in FUSABLE_ATTENTION:
            parts = [getattr(module, p, None) for p in ("q_proj", "k_proj", "v_proj")]
            if not _plain_linears(parts):
                continue
            module.qkv_proj = _concatenated(parts)
            module.qkv_sizes = [p.out_features for p in parts]
            del module.q_proj, module.k_proj, module.v_proj
        elif name in FUSABLE_MLP:
            parts = [getattr(module, p, None) for p in ("gate_proj", "up_proj")]
            if not _plain_linears(parts) or parts[0].out_features != parts[1].out_features:
                continue
            module.gate_up_proj = _concatenated(parts, interleave=True)
            module.intermediate_size = parts[0].out_features
            del module.gate_proj, module.up_proj
        else:
            continue
        module.__class__ = _fused_class(type(module))
        fused += 1
    return fused


def _plain_linears(parts: list) -> bool:
    return (all(type(p) is torch.nn.Linear for p in parts)
            and len({p.in_features for p in parts}) == 1
            and len({p.weight.dtype for p in parts}) == 1 and len({p.weight.device for p in parts}) == 1)
