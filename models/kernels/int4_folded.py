"""int4 GEMVs with an RMSNorm folded into them (int4_epilogue.py says why), as custom ops for a decode step.

- int4_linear_residual_norm (o_proj, down_proj): h = residual + x W^T; returns (h, h * gamma, sums of h^2
  per program column of rows).
- int4_linear_scaled (qkv, gate/up, lm_head): x W^T * rsqrt(sum(sums) / K + eps) for x = h * gamma; for
  gate/up, SiLU(gate) * up of that.
Together: the layer's "residual add, RMSNorm, next projection" without a norm kernel between them.

On CUDA both run the Triton GEMV with its epilogue; elsewhere (CPU tests) plain PyTorch with the same
math, where the sums are one number. The tile is the layer's (gemv_tiles.choose_tiles) or, if none was
chosen, the first that fits: the sums' count depends on the tile's rows, so Triton's autotuner, which
picks a tile per call, cannot run these.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .int4 import Int4Linear, _triton_ready, dequantize_reference


def _tile(tile: int, out_features: int) -> dict:
    """The launch config of `tile`, or of the first tile whose split fits when none was chosen (-1)."""
    from . import int4_triton
    from .split_k import split_fits

    if tile < 0:
        tile = next(i for i, c in enumerate(int4_triton._GEMV_CONFIGS) if split_fits(c.kwargs["SPLIT"], out_features))
    return int4_triton.tile_config(tile)


def sums_count(x: torch.Tensor, out_features: int, tile: int) -> int:
    """How many sums of squares int4_linear_residual_norm returns for an output of `out_features` rows."""
    if not _triton_ready(x):
        return 1
    return _columns(out_features, _tile(tile, out_features))


def _columns(out_features: int, config: dict) -> int:
    """Program columns of a GEMV over `out_features` rows with tile `config`: one sum of squares each."""
    return -(-out_features // config["BLOCK_N"])


def gate_and_up(fused_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The gate and up outputs of a fused gate/up projection, whose rows alternate gate, up
    (fused_projections.fuse_projections).

    Why interleaved, not gate then up: the decode step's GEMV then finishes each gate next to its up in
    the same program and applies SiLU(gate) * up there (int4_epilogue.SCALED_SILU_MUL)."""
    pairs = fused_output.unflatten(-1, (-1, 2))
    return pairs[..., 0], pairs[..., 1]


@torch.library.custom_op("smallchat::int4_linear_scaled", mutates_args=())
def int4_linear_scaled(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor,
                       in_features: int, partials: torch.Tensor, counters: torch.Tensor, tile: int,
                       sums: torch.Tensor, eps: float, silu_mul: bool = False) -> torch.Tensor:
    """[1, N] = (x [1, K] @ W.T) * rsqrt(sum(sums) / K + eps): the GEMV after an RMSNorm whose input times
    its weight is x (int4_linear_residual_norm wrote both). `silu_mul`: W is a fused gate/up whose rows
    alternate gate, up (fused_projections.py), and the result is SiLU(gate) * up, [1, N / 2]."""
    rows = x.reshape(1, in_features)
    n = qweight.shape[1]
    if _triton_ready(x):
        from . import int4_epilogue, int4_triton

        y = torch.empty(1, n // 2 if silu_mul else n, dtype=x.dtype, device=x.device)
        epilogue = int4_epilogue.SCALED_SILU_MUL if silu_mul else int4_epilogue.SCALED
        int4_triton.launch(rows, qweight, scales, offsets, in_features, y, (partials, counters),
                           _tile(tile, n), (y, y, y, sums, sums.numel(), eps), epilogue)
        return y
    scale = torch.rsqrt(sums.float().sum() / in_features + eps)
    y = F.linear(rows.float(), dequantize_reference(qweight, scales, offsets, in_features, torch.float32))
    y = (y * scale).to(x.dtype)
    if silu_mul:
        gate, up = gate_and_up(y)
        return F.silu(gate) * up
    return y


@int4_linear_scaled.register_fake
def _(x, qweight, scales, offsets, in_features, partials, counters, tile, sums, eps, silu_mul=False):
    return x.new_empty(1, qweight.shape[1] // 2 if silu_mul else qweight.shape[1])


@torch.library.custom_op("smallchat::int4_linear_residual_norm", mutates_args=())
def int4_linear_residual_norm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor,
                              in_features: int, partials: torch.Tensor, counters: torch.Tensor, tile: int,
                              residual: torch.Tensor, gamma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(h, h * gamma, sums of h^2 [C] fp32) for h = residual [1, N] + x [1, K] @ W.T, in the residual's dtype:
    the GEMV before an RMSNorm with weight `gamma`, and that norm's input for int4_linear_scaled."""
    rows = x.reshape(1, in_features)
    n = qweight.shape[1]
    if _triton_ready(x):
        from . import int4_epilogue, int4_triton

        normed = torch.empty(1, n, dtype=residual.dtype, device=x.device)
        h = torch.empty_like(normed)
        config = _tile(tile, n)
        sums = torch.empty(_columns(n, config), dtype=torch.float32, device=x.device)
        int4_triton.launch(rows, qweight, scales, offsets, in_features, normed, (partials, counters), config,
                           (residual.reshape(1, n), gamma, h, sums, sums.numel(), 0.0), int4_epilogue.RESIDUAL_NORM)
        return h, normed, sums
    y = F.linear(rows.float(), dequantize_reference(qweight, scales, offsets, in_features, torch.float32))
    h = (residual.reshape(1, n).float() + y.to(residual.dtype).float()).to(residual.dtype)
    hf = h.float()
    return h, (hf * gamma.float()).to(residual.dtype), hf.square().sum().reshape(1)


@int4_linear_residual_norm.register_fake
def _(x, qweight, scales, offsets, in_features, partials, counters, tile, residual, gamma):
    n = qweight.shape[1]
    h = residual.new_empty(1, n)
    return h, residual.new_empty(1, n), x.new_empty(sums_count(x, n, tile), dtype=torch.float32)


def scaled(linear: Int4Linear, x: torch.Tensor, sums: torch.Tensor, eps: float, silu_mul: bool = False) -> torch.Tensor:
    """`linear` (without its bias) on x = h * gamma, scaled as the RMSNorm of h with `sums` (its h^2 sums);
    `silu_mul`: then SiLU(gate) * up of a fused gate/up projection."""
    return torch.ops.smallchat.int4_linear_scaled(x, linear.qweight, linear.scales, linear.offsets, linear.in_features,
                                                  *linear.split_workspace(), linear.tile, sums, eps, silu_mul)


def residual_norm(linear: Int4Linear, x: torch.Tensor, residual: torch.Tensor, gamma: torch.Tensor):
    """(h, h * gamma, sums of h^2) for h = residual + `linear`(x) (a linear without bias)."""
    return torch.ops.smallchat.int4_linear_residual_norm(x, linear.qweight, linear.scales, linear.offsets,
                                                         linear.in_features, *linear.split_workspace(), linear.tile,
                                                         residual, gamma)


def epilogue_call(linear: Int4Linear, x: torch.Tensor, config: dict):
    """A call of `linear`'s GEMV on x [1, K] with tile `config` and its epilogue (Int4Linear.epilogue), on inputs
    made once here: what gemv_tiles times. The norm's sums give a scale of about 1."""
    from . import int4_epilogue, int4_triton

    n, k = linear.out_features, linear.in_features
    workspace = int4_triton.workspace_for(n, x.device, linear.workspace)
    if linear.epilogue == int4_epilogue.STORE:
        return lambda: int4_triton.gemv(x, linear.qweight, linear.scales, linear.offsets, k, workspace, config)
    epilogue = linear.epilogue
    if epilogue == int4_epilogue.RESIDUAL_NORM:
        y = torch.empty(1, n, dtype=x.dtype, device=x.device)
        residual, gamma, h = torch.zeros_like(y), torch.ones(n, dtype=x.dtype, device=x.device), torch.empty_like(y)
        sums = torch.empty(_columns(n, config), dtype=torch.float32, device=x.device)
        args = (residual, gamma, h, sums, sums.numel(), 0.0)
    else:
        y = torch.empty(1, n // 2 if epilogue == int4_epilogue.SCALED_SILU_MUL else n, dtype=x.dtype, device=x.device)
        sums = torch.full((1,), float(k), device=x.device)
        args = (y, y, y, sums, 1, 1e-6)
    return lambda: int4_triton.launch(x, linear.qweight, linear.scales, linear.offsets, k, y, workspace, config, args,
                                      epilogue)
