"""The int4 GEMV's packed-fp16 inner loop (HALF2 tiles of int4_triton._gemv_body): two weights per instruction.

Why: the fp32 loop spends ~1 FFMA + 1 LOP3 + 0.5 shift per weight, 3.05 SASS instructions per weight
on its 8-row tiles, and the large decode GEMVs were found issue-bound on the H200 (BENCHMARKS.md,
sessions 17-21). Here each word's 8 nibbles become 4 fp16 pairs (a shift and a LOP3 each) weighed by
4 HFMA2 (inline PTX fma.rn.f16x2): 2.63 per weight on the same tile, 2.26 at 16 rows (bench/int4_sass.py;
bench/results/int4_sass_sm90_half2_s25.md). Tiles of 4 rows a thread gain nothing: preparing x (to
fp16 pairs) is shared by fewer weights there. Not yet among the tuned tiles: to be timed on the GPU
(bench/device_run.sh half2).

The numbers: a nibble at bits 6-9 of a half ORed with fp16's 1.0 is 1 + q/16, exact. x is scaled by
2**-6 into fp16 (exact for a bf16 x) so that the fp16 sums stay finite up to |x| ~ 1e5. Each word's
chain starts from -1.5 times its four x' per half, so it sums the centred (q - 8)/16 x', and the
words' chains are added as fp16 pairs; the starts' rounding is taken back in fp32. Against the fp32
loop's 0.3-0.45 % relative error (mostly the bf16 output's rounding), 0.4-0.7 % in Triton's
interpreter, which emulates the fp16 math with two roundings where the GPU's fma has one.
"""

from __future__ import annotations

import triton
import triton.language as tl

H2_ONE, H2_MASK, H2_X_SCALE = 0x3C003C00, 0x03C003C0, 1.0 / 64  # fp16 1.0 in both halves; bits 6-9 of each

# The same as constants a compiled kernel may read (Triton refuses plain globals there).
_H2_MASK, H2_X_SCALE_ = tl.constexpr(H2_MASK), tl.constexpr(H2_X_SCALE)
# float32 1.0's bits (int4_triton.ONE_BITS, a run-time argument there) minus H2_ONE: the GEMV makes H2_ONE
# from its argument, so that it sits in a register and each LOP3 keeps the mask as its one immediate
# (with both as constants ptxas materialised the mask before almost every LOP3: 3.53 instructions per
# weight instead of 2.63).
ONE_TO_H2_ONE = tl.constexpr(0x3F800000 - H2_ONE)


@triton.jit
def _half(pairs, hi: tl.constexpr):
    """The low (hi=False) or high fp16 of each int32 word of `pairs`."""
    if hi:
        pairs = pairs >> 16
    return pairs.to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def _pack_halves(lo, hi):
    """Two fp16 tensors as one int32 word each, lo in bits 0-15 (what fma.rn.f16x2 reads)."""
    lo_bits = lo.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    return lo_bits | (hi.to(tl.int16, bitcast=True).to(tl.int32) << 16)


@triton.jit
def _fma_h2(a, b, c, ASM: tl.constexpr):
    """a * b + c on int32 words of fp16 pairs: one HFMA2 per word. ASM=False computes the same in plain
    Triton (two fp16 multiply-adds): Triton's interpreter, which the CPU tests use, runs no PTX."""
    if ASM:
        return tl.inline_asm_elementwise("fma.rn.f16x2 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                         dtype=tl.int32, is_pure=True, pack=1)
    else:
        lo = _half(a, False) * _half(b, False) + _half(c, False)
        hi = _half(a, True) * _half(b, True) + _half(c, True)
        return _pack_halves(lo, hi)


@triton.jit
def _add_h2(a, b):
    return tl.inline_asm_elementwise("add.rn.f16x2 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.int32, is_pure=True,
                                     pack=1)


@triton.jit
def _x_h2(x_ptr, g, p: tl.constexpr, rw, K, EVEN: tl.constexpr, x_scale, gamma_ptr, GAMMA: tl.constexpr):
    """x' = x * x_scale (float32) at the k of nibbles p and p + 4 of the group's words. With x_scale =
    H2_X_SCALE it is the same number in fp16 (a bf16 scaled by a power of 2), so sums are taken of these;
    a GEMV after a folded RMSNorm passes H2_X_SCALE times the norm's scale (int4_epilogue.py). With GAMMA,
    x' is also multiplied by gamma[k] (a norm's weight, applied as x is loaded: bench/persistent_kernels.py)."""
    k_lo = g * 128 + p * 16 + rw
    if EVEN:
        lo = tl.load(x_ptr + k_lo)
        hi = tl.load(x_ptr + k_lo + 64)
    else:
        lo = tl.load(x_ptr + k_lo, mask=k_lo < K, other=0.0)
        hi = tl.load(x_ptr + k_lo + 64, mask=k_lo + 64 < K, other=0.0)
    lo = lo.to(tl.float32) * x_scale
    hi = hi.to(tl.float32) * x_scale
    if GAMMA:
        lo *= tl.load(gamma_ptr + k_lo, mask=k_lo < K, other=0.0).to(tl.float32)
        hi *= tl.load(gamma_ptr + k_lo + 64, mask=k_lo + 64 < K, other=0.0).to(tl.float32)
    return lo, hi


@triton.jit
def _pack_x(lo, hi):
    return _pack_halves(lo.to(tl.float16), hi.to(tl.float16))[:, None]


@triton.jit
def _pair_h2(words, p: tl.constexpr, h2_one):
    """Nibbles p and p + 4 of each word (bits 4p and 16 + 4p) as the fp16 pair (1 + q/16, 1 + q'/16)."""
    if p < 2:
        moved = words << (6 - 4 * p)
    else:
        moved = words >> (4 * p - 6)
    return (moved & _H2_MASK) | h2_one


@triton.jit
def group_dot_h2(words, x_ptr, g, rw, K, h2_one, EVEN: tl.constexpr, ASM: tl.constexpr, x_scale=H2_X_SCALE_,
                 gamma_ptr=None, GAMMA: tl.constexpr = False):
    """(sum over the group's k of (q - 8)/16 x', sum of x') per column; x' = x * x_scale (* gamma[k]) in fp16.

    Each word's chain of four HFMA2 starts from -1.5 times the sum of its four x' per half, so it adds
    up (1 + q/16 - 1.5) x' = (q - 8)/16 x': centred, small terms, what fp16 sums best. Those starts
    are shared by every column of the thread, and their fp16 rounding is taken back in fp32. The
    words' chains are then summed as fp16 pairs (a HADD2 each) and the two halves in fp32."""
    x0l, x0h = _x_h2(x_ptr, g, 0, rw, K, EVEN, x_scale, gamma_ptr, GAMMA)
    x1l, x1h = _x_h2(x_ptr, g, 1, rw, K, EVEN, x_scale, gamma_ptr, GAMMA)
    x2l, x2h = _x_h2(x_ptr, g, 2, rw, K, EVEN, x_scale, gamma_ptr, GAMMA)
    x3l, x3h = _x_h2(x_ptr, g, 3, rw, K, EVEN, x_scale, gamma_ptr, GAMMA)
    sum_lo = x0l + x1l + x2l + x3l
    sum_hi = x0h + x1h + x2h + x3h
    start_lo = (-1.5 * sum_lo).to(tl.float16)
    start_hi = (-1.5 * sum_hi).to(tl.float16)
    # what rounding the starts to fp16 added to the group's sum
    start_error = tl.sum(start_lo.to(tl.float32) + 1.5 * sum_lo + start_hi.to(tl.float32) + 1.5 * sum_hi, axis=0)
    acc = tl.broadcast_to(_pack_halves(start_lo, start_hi)[:, None], words.shape)
    acc = _fma_h2(_pair_h2(words, 0, h2_one), _pack_x(x0l, x0h), acc, ASM)
    acc = _fma_h2(_pair_h2(words, 1, h2_one), _pack_x(x1l, x1h), acc, ASM)
    acc = _fma_h2(_pair_h2(words, 2, h2_one), _pack_x(x2l, x2h), acc, ASM)
    acc = _fma_h2(_pair_h2(words, 3, h2_one), _pack_x(x3l, x3h), acc, ASM)
    if ASM:
        acc = tl.reduce(acc, 0, _add_h2)
        dot = _half(acc, False).to(tl.float32) + _half(acc, True).to(tl.float32)
    else:  # the interpreter runs a reduce with a combine function element by element (~20x slower): fp32 here
        dot = tl.sum(_half(acc, False).to(tl.float32) + _half(acc, True).to(tl.float32), axis=0)
    dot -= start_error
    return dot, tl.sum(sum_lo + sum_hi, axis=0)
