"""The decode step's layers with their RMSNorms folded into the int4 GEMVs around them.

Why: each residual add + RMSNorm of a decode step was a kernel of its own, two a layer
(kernels/int4_epilogue.py has the figures). Here the GEMV before a norm (o_proj, down_proj) adds its
output to the residual and writes the norm's input times its weight and the sums of squares; the GEMV
after it (q/k/v, gate/up, lm_head) applies the norm's scale to its finished rows. A layer of the
one-token step is then: q/k/v GEMV, attention, o GEMV, gate/up GEMV (with SiLU(gate) * up), down GEMV.

Between layers the step carries (h, normed, sums): the residual stream h, h times the next norm's
weight, and the sums of h^2 that give that norm's scale (layer_step.step_inputs makes the first). The layer's output feeds the next layer's
input norm (or the model's final norm), so each layer is handed that norm's weight: a tensor input,
so that one compiled layer still serves every layer (layer_step.py).

Only for models whose every layer has the fused int4 projections (fused_projections.py,
kernels/int4.py), the fused decode attention, and Llama-style RMSNorms (weight * h * rsqrt(...)).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .attention import attend_qkv, decode_step_applies
from .kernels.int4 import Int4Linear
from .kernels.int4_folded import gate_and_up, residual_norm, scaled
from .layer_step import LayerCache

# RMSNorm classes whose forward is weight * (h * rsqrt(mean(h^2) + variance_epsilon)) (transformers 5.x).
FOLDABLE_NORMS = ("LlamaRMSNorm", "Qwen2RMSNorm", "MistralRMSNorm")
SILU = ("silu", "swish")  # transformers' names of the activation the gate/up epilogue applies


def _unbiased_int4(linear) -> bool:
    return isinstance(linear, Int4Linear) and linear.bias is None


def folds_norms(model) -> bool:
    """Whether `model`'s one-token step can run with its norms folded (run_layer_folded)."""
    base = getattr(model, "model", None)
    layers = list(getattr(base, "layers", None) or [])
    if not layers or getattr(model.config, "partial_rotary_factor", 1.0) != 1.0:
        return False
    norms = [base.norm] + [n for layer in layers for n in (layer.input_layernorm, layer.post_attention_layernorm)]
    if not all(type(n).__name__ in FOLDABLE_NORMS for n in norms):
        return False
    for layer in layers:
        attention, mlp = layer.self_attn, layer.mlp
        if not (decode_step_applies(attention) and isinstance(attention.qkv_proj, Int4Linear)
                and _unbiased_int4(getattr(attention, "o_proj", None))
                and isinstance(getattr(mlp, "gate_up_proj", None), Int4Linear)
                and _unbiased_int4(getattr(mlp, "down_proj", None))):
            return False
    return True


def mark_epilogues(model) -> None:
    """Tell each int4 linear the epilogue run_layer_folded runs it with (Int4Linear.epilogue): its tile is timed
    with it (kernels/gemv_tiles.py)."""
    from .kernels.int4_epilogue import RESIDUAL_NORM, SCALED, SCALED_SILU_MUL

    for layer in model.model.layers:
        attention, mlp = layer.self_attn, layer.mlp
        attention.qkv_proj.epilogue = SCALED
        attention.o_proj.epilogue = mlp.down_proj.epilogue = RESIDUAL_NORM
        mlp.gate_up_proj.epilogue = SCALED_SILU_MUL if mlp.config.hidden_act in SILU else SCALED
    if isinstance(model.lm_head, Int4Linear):
        model.lm_head.epilogue = SCALED


def run_layer_folded(layer, h: torch.Tensor, normed: torch.Tensor, sums: torch.Tensor, mask: torch.Tensor,
                     position_ids: torch.Tensor, cache: LayerCache, cos: torch.Tensor, sin: torch.Tensor,
                     next_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One decoder layer on one token, norms folded: (h, normed, sums) in, the same for the next norm out.

    `next_weight` is the weight of the norm that reads this layer's output (the next layer's input norm,
    or the model's final norm). The operations are run_layer's, in its order."""
    attention, mlp = layer.self_attn, layer.mlp
    qkv = scaled(attention.qkv_proj, normed, sums, layer.input_layernorm.variance_epsilon)
    out = attend_qkv(attention, qkv, attention.qkv_proj.bias, (cos, sin), mask, cache)
    h, normed, sums = residual_norm(attention.o_proj, out.view(1, -1), h, layer.post_attention_layernorm.weight)
    eps = layer.post_attention_layernorm.variance_epsilon
    if mlp.config.hidden_act in SILU:  # SiLU(gate) * up in the GEMV's epilogue too
        activated = scaled(mlp.gate_up_proj, normed, sums, eps, silu_mul=True)
    else:
        gate, up = gate_and_up(scaled(mlp.gate_up_proj, normed, sums, eps))
        activated = mlp.act_fn(gate) * up
    return residual_norm(mlp.down_proj, activated, h, next_weight)


def final_logits(model, normed: torch.Tensor, sums: torch.Tensor) -> torch.Tensor:
    """Logits [1, V] (fp32) from the last layer's output, the model's final norm folded into lm_head."""
    norm, head = model.model.norm, model.lm_head
    if isinstance(head, Int4Linear):
        logits = scaled(head, normed, sums, norm.variance_epsilon)
        return (logits if head.bias is None else logits + head.bias.to(logits.dtype)).float()
    scale = torch.rsqrt(sums.float().sum() / normed.shape[-1] + norm.variance_epsilon)
    return F.linear((normed.float() * scale).to(head.weight.dtype), head.weight, head.bias).float()
