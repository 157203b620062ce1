"""The fast decoder's attention, registered with transformers' attention interface.

- One query token (a decode step) over a window of the static cache: one fused kernel
  (kernels/decode_attention.py) on CUDA, the plain matmul-softmax-matmul form elsewhere. Both
  group the query heads per KV head: SDPA's masked kernel runs one thread block per head for a
  single query, which reads a long cache at a fraction of the memory bandwidth.
- A decode step of the layer loop (models/layer_step.py) on a fused q/k/v projection: rotation, the
  cache write and attention as one kernel (decode_step_attention), two or three kernels fewer a layer.
- A prompt chunk with a boolean mask: SDPA without repeating keys for grouped-query heads.
- Anything else: transformers' SDPA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .kernels import decode_attention as fused
from .layer_step import LayerCache

ATTENTION_NAME = "fast_decode"
WORKSPACE_ATTR = "decode_attention_workspace"  # set on each attention module by attach_decode_workspace


def _decode_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention for one query token over a window of the static cache; a prompt chunk with a boolean
    mask goes to _prompt_attention, anything else to transformers' SDPA.

    query [B, Hq, 1, D]; key/value [B, Hkv, L, D]; attention_mask bool [B, 1, 1, W] (True = attend),
    W <= L: the first W cache positions are the window. Returns [B, 1, Hq, D] like transformers'
    attention functions.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if query.shape[2] != 1 or attention_mask is None or attention_mask.dtype != torch.bool:
        if (attention_mask is not None and attention_mask.dtype == torch.bool and attention_mask.shape[1] == 1
                and query.shape[1] % key.shape[1] == 0 and not dropout):
            return _prompt_attention(query, key, value, attention_mask, scaling)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    b, hq, _, d = query.shape
    scaling = d**-0.5 if scaling is None else scaling
    workspace = getattr(module, WORKSPACE_ATTR, None)
    if b == 1 and workspace is not None:
        out = torch.ops.smallchat.decode_attention(query.view(1, hq, d), key, value, attention_mask.reshape(-1),
                                                   scaling, *workspace)
        return out.view(1, 1, hq, d), None
    out = torch.stack([fused.reference(query[i].view(1, hq, d), key[i:i + 1], value[i:i + 1],
                                       attention_mask[i].view(-1), scaling) for i in range(b)])
    return out.view(b, 1, hq, d), None


def _prompt_attention(query, key, value, attention_mask, scaling=None):
    """SDPA for a prompt chunk of T tokens over the first W cache positions, without repeating keys.

    query [B, Hq, T, D]; key/value [B, Hkv, L >= W, D], Hq a multiple of Hkv; attention_mask bool
    [B, 1, T, W] (True = attend). With a mask, transformers' SDPA path copies every KV head once
    per query head that shares it (GQA): on a 7B 512-token chunk over a 4k cache, two 35 MB
    copies a layer, 2.5 of its 27 ms (bench/results/decode_speed_h200_s18_*.md). Instead the G
    query heads of a KV head are laid end to end as G*T queries of one head (the mask repeated
    for each), which SDPA runs as plain multi-head attention over the keys as they are.
    Returns [B, T, Hq, D].
    """
    b, hq, t, d = query.shape
    hkv, window = key.shape[1], attention_mask.shape[-1]
    g = hq // hkv
    q = query.reshape(b, hkv, g * t, d)  # head h = kv head h // g, so a KV head's queries are contiguous
    mask = attention_mask.expand(b, g, t, window).reshape(b, 1, g * t, window)
    out = F.scaled_dot_product_attention(q, key[:, :, :window], value[:, :, :window], attn_mask=mask, scale=scaling)
    return out.view(b, hq, t, d).transpose(1, 2).contiguous(), None


def decode_step_attention(module, hidden_states: torch.Tensor, position_embeddings, attention_mask,
                          cache) -> torch.Tensor | None:
    """The attention output [1, 1, Hq * D] of one decode step of a fused Llama/Qwen2 attention module
    (fused_projections.py) through decode_attention_qkv; None where that path does not apply.

    It applies to one token with a bool window mask, written at the step's position through a
    layer_step.LayerCache, on a module given the decode workspace, with a full-width rotary embedding and
    no sliding window. Everything else takes transformers' forward.
    """
    position = cache.position if isinstance(cache, LayerCache) else None
    cos, _ = position_embeddings
    if (position is None or not decode_step_applies(module) or hidden_states.shape[:2] != (1, 1)
            or attention_mask is None or attention_mask.dtype != torch.bool or attention_mask.shape[2] != 1
            or cos.shape[-1] != module.head_dim):
        return None
    qkv, bias = without_bias(module.qkv_proj, hidden_states)
    return attend_qkv(module, qkv, bias, position_embeddings, attention_mask, cache)


def decode_step_applies(module) -> bool:
    """Whether `module` can run a decode step through decode_attention_qkv (its own parts; the step's
    inputs are checked by decode_step_attention)."""
    return (getattr(module, WORKSPACE_ATTR, None) is not None and hasattr(module, "qkv_proj")
            and module.config._attn_implementation == ATTENTION_NAME and not getattr(module, "sliding_window", None))


def attend_qkv(module, qkv: torch.Tensor, bias: torch.Tensor | None, position_embeddings, attention_mask,
               cache: LayerCache) -> torch.Tensor:
    """decode_step_attention from the token's q/k/v (without their bias, which is added in the kernel)."""
    cos, sin = position_embeddings
    query_heads = module.config.num_attention_heads
    out = torch.ops.smallchat.decode_attention_qkv(qkv.reshape(-1), bias, cos.reshape(-1), sin.reshape(-1),
                                                   cache.position, cache.layer.keys, cache.layer.values,
                                                   attention_mask.reshape(-1), module.scaling, query_heads,
                                                   *getattr(module, WORKSPACE_ATTR))
    return out.view(1, 1, query_heads * module.head_dim)


def without_bias(linear, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(x W^T, the bias) of a Linear or Int4Linear: the kernel adds the bias in fp32 where it rotates, as
    Inductor fused it there, instead of a bias-add kernel of its own before the opaque op."""
    bias = getattr(linear, "bias", None)
    if bias is None:
        return linear(x), None
    if isinstance(linear, torch.nn.Linear):
        return F.linear(x, linear.weight), bias
    return linear.forward_unbiased(x), bias


def use_fast_attention(model) -> None:
    """Route the model's attention through `_decode_attention` (SDPA for every other case)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, _decode_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)  # masks for the plain generate() path
    model.config._attn_implementation = ATTENTION_NAME


def attach_decode_workspace(model, device) -> int:
    """Give every attention module of `model` one shared workspace for the fused decode attention
    (layers run one after another); its bytes. Modules without one take the plain form."""
    config = model.config
    hq, hkv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // hq
    workspace = fused.new_workspace(hq, hkv, head_dim, device)
    for module in model.modules():
        # transformers' attention modules (Llama, Qwen2, Mistral, ...) carry their layer index and GQA group
        if hasattr(module, "layer_idx") and hasattr(module, "num_key_value_groups"):
            setattr(module, WORKSPACE_ATTR, workspace)
    return sum(t.numel() * t.element_size() for t in workspace)
