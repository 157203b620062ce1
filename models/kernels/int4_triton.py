"""Triton kernels for the int4 format of int4.py: a batch-1 GEMV (decode) and a dequantize (prefill).

Both are checked against int4.dequantize_reference over many shapes (tests/test_int4_kernels.py;
on the CPU through Triton's interpreter, on a GPU for real) and timed by bench/int4_kernels.py.

Why a GEMV of our own: at batch 1 a decode step is a string of matrix-vector products whose cost
is reading the weights. torch's tinygemm int4 kernel and gemlite's reached ~35 % of the copy rate
on an H200 (../shared FACTS). The inner loop here does, per 4-bit weight, one AND + OR that turns
the nibble into the mantissa of a float (0x4B000000 | q<<4j is 2**23 + q*2**4j), one exact float
subtraction and one FMA: no int-to-float conversion instruction, which runs at a quarter rate and
made simpler kernels compute-bound. The scale and offset are applied once per 16 words
(sum_k (q*s + o) x = s * sum_k q x + o * sum_k x).

Tuning: a handful of tile shapes per (N, K), timed once; Triton keeps the winner on disk
(cache_results; TRITON_CACHE_DIR points into the app's cache), so a later load does not re-tune.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU build of torch does not bring Triton; int4.py falls back to PyTorch
    triton = None



def available() -> bool:
    """Triton is importable (on CUDA it then runs the kernels; on the CPU only its interpreter can)."""
    return triton is not None


if triton is not None:
    MAGIC = tl.constexpr(0x4B000000)  # float32 bits of 2**23: OR a small integer into the mantissa: 2**23 + it
    TWO_23 = tl.constexpr(8388608.0)
    # (BLOCK_N output rows, GROUPS of 128 weights per loop iteration, SPLIT of K across programs, warps).
    # Triton gives each thread 16-byte loads along N (4 rows), so more rows per program share each x
    # value further; SPLIT > 1 gives a narrow or deep matrix enough programs to fill the GPU (measured
    # with ncu: 16-64 programs of a serial K loop left the memory system idle, bench/results/).
    _GEMV_CONFIGS = [
        triton.Config({"BLOCK_N": bn, "GROUPS": g, "SPLIT": sp}, num_warps=w, num_stages=2)
        for bn, g, sp, w in [(32, 2, 1, 2), (32, 4, 1, 4), (64, 2, 1, 4), (32, 2, 4, 2), (64, 2, 4, 4), (32, 4, 4, 4),
                             (64, 2, 8, 4), (32, 2, 8, 2), (128, 1, 8, 4), (64, 4, 2, 4), (16, 4, 4, 2), (64, 1, 4, 2),
                             (128, 2, 4, 8), (32, 4, 2, 4)]
    ]
    MAX_SPLIT = 8  # int4.MAX_SPLIT: the workspace holds this many partial rows
    if os.environ.get("TRITON_INTERPRET") == "1":  # the interpreter (CPU tests) cannot time configs: one
        _GEMV_CONFIGS = [triton.Config({"BLOCK_N": 16, "GROUPS": 2, "SPLIT": 2}, num_warps=1, num_stages=1)]

    @triton.jit
    def _nibble_as_float(words, j: tl.constexpr):
        """q * 2**(4j') as float32 for nibble j of each word, without an int-to-float conversion.

        Nibbles 0-4 are used in place (q << 4j stays below 2**23); nibbles 5-7 after a shift by 20.
        The caller scales x by 2**-4j' to cancel the power of two (exact).
        """
        if j < 5:
            bits = (words & (0xF << (4 * j))) | MAGIC
        else:
            bits = ((words >> 20) & (0xF << (4 * (j - 5)))) | MAGIC
        return bits.to(tl.float32, bitcast=True) - TWO_23

    @triton.jit
    def _load_tile(ptr, row0, rw, rn, nmask, n_rows, stride, EVEN: tl.constexpr, other):
        """A [len(rw), BLOCK_N] tile of a K-major tensor from row `row0` (masked only at the edges)."""
        ptrs = ptr + (row0 + rw)[:, None] * stride + rn[None, :]
        if EVEN:  # the usual case: no mask instructions per element
            return tl.load(ptrs)
        return tl.load(ptrs, mask=((row0 + rw) < n_rows)[:, None] & nmask[None, :], other=other)

    @triton.heuristics({"EVEN": lambda a: a["N"] % a["BLOCK_N"] == 0 and a["K"] % 128 == 0
                        and a["G_COUNT"] % (a["GROUPS"] * a["SPLIT"]) == 0})
    @triton.jit
    def _gemv_body(x_ptr, w_ptr, s_ptr, o_ptr, y_ptr, ws_ptr, lock_ptr, N, K, G_COUNT, stride_w, stride_s,
                   BLOCK_N: tl.constexpr, GROUPS: tl.constexpr, SPLIT: tl.constexpr, EVEN: tl.constexpr):
        WORDS: tl.constexpr = GROUPS * 16
        pid_n = tl.program_id(0)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = rn < N
        rw = tl.arange(0, WORDS)
        # This program's share of the groups: a whole number of iterations.
        g_per = tl.cdiv(tl.cdiv(G_COUNT, SPLIT), GROUPS) * GROUPS
        g_lo = tl.program_id(1) * g_per
        g_hi = tl.minimum(g_lo + g_per, G_COUNT)
        acc = tl.zeros([WORDS, BLOCK_N], dtype=tl.float32)  # reduced over words once, at the end
        # The next iteration's words are loaded before this one's arithmetic: two tiles in flight.
        nxt = _load_tile(w_ptr, g_lo * 16, rw, rn, nmask, G_COUNT * 16, stride_w, EVEN, 0)
        for g0 in range(g_lo, g_hi, GROUPS):
            words = nxt
            if g0 + GROUPS < g_hi:
                nxt = _load_tile(w_ptr, (g0 + GROUPS) * 16, rw, rn, nmask, G_COUNT * 16, stride_w, EVEN, 0)
            kbase = (g0 + rw // 16) * 128 + rw % 16  # k of nibble 0 of each word
            part = tl.zeros([WORDS, BLOCK_N], dtype=tl.float32)
            xsum = tl.zeros([WORDS], dtype=tl.float32)
            for j in tl.static_range(8):
                kk = kbase + j * 16
                if EVEN:
                    xj = tl.load(x_ptr + kk).to(tl.float32)
                else:
                    xj = tl.load(x_ptr + kk, mask=kk < K, other=0.0).to(tl.float32)
                xsum += xj
                if j < 5:
                    xj_scaled = xj * (1.0 / (1 << (4 * j)))
                else:
                    xj_scaled = xj * (1.0 / (1 << (4 * (j - 5))))
                part += _nibble_as_float(words, j) * xj_scaled[:, None]
            # sum_k (q*s + o) x = s * sum_k q x + o * sum_k x, per word (16 words share a group's s, o)
            g = g0 + rw // 16
            sptr = (g[:, None] * stride_s + rn[None, :])
            if EVEN:
                s = tl.load(s_ptr + sptr).to(tl.float32)
                o = tl.load(o_ptr + sptr).to(tl.float32)
            else:
                smask = (g < G_COUNT)[:, None] & nmask[None, :]
                s = tl.load(s_ptr + sptr, mask=smask, other=0.0).to(tl.float32)
                o = tl.load(o_ptr + sptr, mask=smask, other=0.0).to(tl.float32)
            acc += s * part + o * xsum[:, None]
        partial = tl.sum(acc, axis=0)  # [BLOCK_N]
        if SPLIT == 1:
            tl.store(y_ptr + rn, partial.to(y_ptr.dtype.element_ty), mask=nmask)
        else:
            # Split K: each program leaves its partial sums in the workspace; the last of the SPLIT
            # programs of these rows (counted with an atomic) adds them up and resets the counter,
            # so the same workspace serves the next call and a CUDA graph's replays (one kernel, no
            # zero-fill or cast kernels around it).
            tl.store(ws_ptr + tl.program_id(1) * N + rn, partial, mask=nmask)
            tl.debug_barrier()  # every thread's partial is written before the release below
            count = tl.atomic_add(lock_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
            if count == SPLIT - 1:
                total = tl.zeros([BLOCK_N], dtype=tl.float32)
                for part_no in tl.static_range(SPLIT):
                    total += tl.load(ws_ptr + part_no * N + rn, mask=nmask, other=0.0, cache_modifier=".cg")
                tl.store(y_ptr + rn, total.to(y_ptr.dtype.element_ty), mask=nmask)
                tl.atomic_xchg(lock_ptr + pid_n, 0)

    # The timing run must not leave a counter behind: reset them before each timed config.
    _gemv_kernel = triton.autotune(configs=_GEMV_CONFIGS, key=["N", "K"], cache_results=True,
                                   reset_to_zero=["lock_ptr"])(_gemv_body)

    @triton.jit
    def _dequant_t_kernel(w_ptr, s_ptr, o_ptr, out_ptr, N, K, G_COUNT, stride_w, stride_s, stride_out,
                          BLOCK_N: tl.constexpr, GROUPS: tl.constexpr):
        """W.T [K, N]: each program unpacks GROUPS groups x BLOCK_N columns; stores run along N."""
        WORDS: tl.constexpr = GROUPS * 16
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rw = tl.arange(0, WORDS)
        row0 = tl.program_id(1) * WORDS
        nmask = rn < N
        mask = ((row0 + rw) < G_COUNT * 16)[:, None] & nmask[None, :]
        words = tl.load(w_ptr + (row0 + rw)[:, None] * stride_w + rn[None, :], mask=mask, other=0)
        g = (row0 + rw) // 16
        sptr = g[:, None] * stride_s + rn[None, :]
        s = tl.load(s_ptr + sptr, mask=mask, other=0.0).to(tl.float32)
        o = tl.load(o_ptr + sptr, mask=mask, other=0.0).to(tl.float32)
        for j in tl.static_range(8):
            q = ((words >> (4 * j)) & 0xF).to(tl.float32)
            k = g * 128 + j * 16 + (row0 + rw) % 16
            tl.store(out_ptr + k[:, None] * stride_out + rn[None, :], (q * s + o).to(out_ptr.dtype.element_ty),
                     mask=(k < K)[:, None] & nmask[None, :])


def gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor,
         in_features: int, workspace: tuple[torch.Tensor, torch.Tensor] | None = None,
         config: dict | None = None) -> torch.Tensor:
    """y [1, N] = x [1, K] @ W.T, reading the int4 weight once (batch 1 only).

    `workspace` is int4.new_workspace()'s pair (a temporary one is made if None: not inside a
    CUDA graph). `config` (BLOCK_N, GROUPS, SPLIT, num_warps) runs one tile shape instead of the tuned one.
    """
    groups, n = scales.shape
    x = x.contiguous()
    if workspace is None or workspace[1].numel() < n:
        from .int4 import new_workspace

        workspace = new_workspace(n, x.device)
    y = torch.empty(1, n, dtype=x.dtype, device=x.device)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT"])  # noqa: E731
    args = (x, qweight, scales, offsets, y, workspace[0], workspace[1], n, in_features, groups, qweight.stride(0),
            scales.stride(0))
    if config is None:
        _gemv_kernel[grid](*args)
    else:
        _gemv_body[grid](*args, **config)
    return y


def dequantize_t(qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, in_features: int,
                 dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """W.T [K, N] in `dtype`, unpacked on the device: a temporary for a prefill's cuBLAS matmul."""
    groups, n = scales.shape
    out = torch.empty(in_features, n, dtype=dtype, device=qweight.device)
    block_n, per = 64, 2
    grid = (triton.cdiv(n, block_n), triton.cdiv(groups, per))
    _dequant_t_kernel[grid](qweight, scales, offsets, out, n, in_features, groups, qweight.stride(0),
                            scales.stride(0), out.stride(0), BLOCK_N=block_n, GROUPS=per, num_warps=4)
    return out
