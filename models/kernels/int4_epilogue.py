"""What the int4 GEMV does with its finished rows (int4_triton._gemv_body's EPILOGUE): store them, or one of
the two halves of an RMSNorm folded into the GEMVs around it.

Why: a decode step of a Llama-style layer runs "residual add + RMSNorm" twice a layer as kernels of
their own (Inductor fuses each pair into one reduction): 64 kernels of a 7B step, 0.15 of its 2.54 ms
on an H200, plus a gap between kernels each time (bench/results/store_profile_h200_s26.md). The norm
is g * h * rsqrt(mean(h^2) + eps), and its rsqrt is one number per token, so it splits in two:
- RESIDUAL_NORM, the GEMV before the norm (o_proj, down_proj): adds its rows y to the residual r and
  writes h = r + y (the next residual), h * g (the norm's input, unscaled) and, per program column,
  the sum of h^2 over its rows.
- SCALED, the GEMV after it (qkv, gate/up, lm_head): reads h * g as its x and applies the norm's scale
  rsqrt(sum of those sums / K + eps) (norm_scale): W (g h rsqrt(..)) = rsqrt(..) W (g h). The fp32 loop
  multiplies its finished rows by it; the packed-fp16 loop (int4_half2.py) multiplies x by its power
  of two as it loads x, which it scales anyway (exact: x stays what it was, in fp16), and the rows
  by the rest: h is not normalized, and a model's large activations (1e4 and more in some residual
  streams) would otherwise overflow its fp16 sums.
- SCALED_SILU_MUL, for a fused gate/up GEMV whose rows alternate gate, up (fused_projections.py): the
  same scale, then SiLU(gate) * up, written as N / 2 rows: the MLP's activation kernel goes too.
All run in the program that finishes a column of rows (the only one, or the last of a split K), on
a few values per row; the GEMV's loop is untouched (the scale of x aside). Rounding: h is rounded to the activations' dtype
as the model's add does; the norm's output is not rounded before the matmul (the model rounds it to
bf16 first), a difference of bf16 rounding (tests/test_int4_folded_norms.py).
"""

from __future__ import annotations

import triton
import triton.language as tl

STORE, SCALED, RESIDUAL_NORM, SCALED_SILU_MUL = 0, 1, 2, 3
SUMS_BLOCK = tl.constexpr(64)  # sums of squares read per step by a SCALED epilogue (a constexpr: read in the kernel)


@triton.jit
def norm_scale(sq_ptr, n_sq, K, eps):
    """rsqrt(mean of h^2 + eps) of the folded RMSNorm: the n_sq sums of squares at sq_ptr, over K values."""
    sums = tl.zeros([SUMS_BLOCK], dtype=tl.float32)
    for start in range(0, n_sq, SUMS_BLOCK):
        i = start + tl.arange(0, SUMS_BLOCK)
        sums += tl.load(sq_ptr + i, mask=i < n_sq, other=0.0)
    return tl.rsqrt(tl.sum(sums, axis=0) / K + eps)


@triton.jit
def finish_rows(total, rn, nmask, y_ptr, res_ptr, gamma_ptr, h_ptr, sq_ptr, n_sq, K, eps, row_scale, column,
                EPILOGUE: tl.constexpr, SCALE_ROWS: tl.constexpr):
    """Write the finished fp32 rows `total` (rows rn of this program column) as EPILOGUE says. A SCALED
    epilogue multiplies them by the norm's scale (SCALE_ROWS) or by `row_scale`, what the loop left of it."""
    out_ty = y_ptr.dtype.element_ty
    if EPILOGUE == 1 or EPILOGUE == 3:  # SCALED, SCALED_SILU_MUL
        scale = row_scale
        if SCALE_ROWS:
            scale = norm_scale(sq_ptr, n_sq, K, eps)
        if EPILOGUE == 1:
            tl.store(y_ptr + rn, (total * scale).to(out_ty), mask=nmask)
        else:
            _store_silu_mul(total * scale, y_ptr, column, nmask)
    elif EPILOGUE == 2:  # RESIDUAL_NORM
        y = total.to(out_ty).to(tl.float32)  # the model adds its o/down output as rounded to bf16
        h = (tl.load(res_ptr + rn, mask=nmask, other=0.0).to(tl.float32) + y).to(out_ty)
        tl.store(h_ptr + rn, h, mask=nmask)
        hf = tl.where(nmask, h.to(tl.float32), 0.0)
        g = tl.load(gamma_ptr + rn, mask=nmask, other=0.0).to(tl.float32)
        tl.store(y_ptr + rn, (hf * g).to(out_ty), mask=nmask)
        tl.store(sq_ptr + column, tl.sum(hf * hf, axis=0))
    else:
        tl.store(y_ptr + rn, total.to(out_ty), mask=nmask)


@triton.jit
def _store_silu_mul(rows, y_ptr, column, nmask):
    """SiLU(gate) * up of interleaved rows (gate, up, gate, up, ...) into half as many outputs. Each value
    is rounded to the output's dtype where the model's own forward rounds it: the gate and up outputs,
    SiLU's output, the product."""
    out_ty = y_ptr.dtype.element_ty
    half: tl.constexpr = rows.shape[0] // 2
    gate, up = tl.split(tl.reshape(rows.to(out_ty).to(tl.float32), (half, 2)))
    silu = (gate / (1.0 + tl.exp(-gate))).to(out_ty).to(tl.float32)
    ro = column * half + tl.arange(0, half)
    keep = tl.max(tl.reshape(nmask.to(tl.int32), (half, 2)), axis=1) > 0  # a pair is whole or masked whole
    tl.store(y_ptr + ro, (silu * up).to(out_ty), mask=keep)
