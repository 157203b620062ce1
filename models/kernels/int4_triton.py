"""Triton kernels for the int4 format of int4.py: a batch-1 GEMV (decode) and a dequantize (prefill).

Both are checked against int4.dequantize_reference over many shapes (tests/test_int4_kernels.py;
on the CPU through Triton's interpreter, on a GPU for real) and timed by bench/int4_kernels.py.

Why a GEMV of our own: at batch 1 a decode step is a string of matrix-vector products whose cost
is reading the weights. torch's tinygemm int4 kernel and gemlite's reached ~35 % of the copy rate
on an H200 (../shared FACTS). The inner loop here does, per 4-bit weight, one AND + OR (one LOP3)
that puts the nibble into the mantissa of a float whose exponent is ORed in with it (1 + q/2**7 or
16 + q/2**7), and one FMA; the 1s and 16s come out once per group through the sum of x. No
int-to-float conversion instruction, which runs at a quarter rate and made simpler kernels
compute-bound. The scale and offset are applied once per 16 words
(sum_k (q*s + o) x = s * sum_k q x + o * sum_k x).

Tuning: a handful of tile shapes per (N, K), timed once for ~12 ms each (time_config); Triton keeps
the winner on disk (cache_results; TRITON_CACHE_DIR points into the app's cache), so a later load
does not re-tune.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
    import triton.testing
except ImportError:  # the CPU build of torch does not bring Triton; int4.py falls back to PyTorch
    triton = None

if triton is not None:
    from .int4_epilogue import STORE, finish_rows, norm_scale
    from .int4_half2 import H2_X_SCALE_, ONE_TO_H2_ONE, group_dot_h2
    from .pdl import PREFETCH_GROUPS, prefetch_l2, start_early, wait_for_earlier

from . import pdl


def available() -> bool:
    """Triton is importable (on CUDA it then runs the kernels; on the CPU only its interpreter can)."""
    return triton is not None


# float32 bits of 1.0, ORed around a nibble in the mantissa. Passed to the GEMV as a run-time argument,
# not a constant: with two constants per OR (the exponent and the nibble's mask) ptxas materialised
# the mask again before almost every OR (0.8 of 4.7 instructions per weight in the sm_90 loop); as
# an argument 1.0 sits in one register for the whole kernel and each mask is the OR's immediate
# (3.9 per weight; bench/int4_sass.py counts them without a GPU).
ONE_BITS = 0x3F800000
# Multiply-adds as FMAs, asked for explicitly: the loops are written for one FFMA per weight, and
# Triton announces that its default will turn fusion off (3.10).
FP_FUSION = True

if triton is not None:
    # (BLOCK_N output rows, SPLIT of K across programs, warps). Triton gives a thread 4 adjacent
    # output rows (16-byte loads along N) and the group's 16 words, or half of them where BLOCK_N
    # < 128 x warps puts warps or threads on the words, so each x value it loads and converts
    # serves 4 rows. (An earlier [words x rows] tile spread a group's words over threads; every
    # thread then loaded and scaled x for fewer rows and the s/o pair per word, 9.3 SASS
    # instructions per weight: instruction issue, not DRAM, was the limit. bench/int4_sass.py reads
    # today's loop without a GPU: 3.6-3.7 per weight on sm_90 with Triton 3.9, 3.05 for the 8-row
    # tiles; bench/results/int4_sass_sm90_triton39_s24.md.) SPLIT > 1 gives a
    # narrow or deep matrix enough programs to fill the GPU.
    # These 5 tiles (BLOCK_N, SPLIT, warps, PREFETCH, HALF2) are the 5 that together give the least
    # GEMV time per decode step over the 7B, 1.8B and Qwen2.5-7B shapes (bench/pick_tiles.py), chosen
    # from the packed-fp16 tiles (HALF2: int4_half2.py, 2.6 SASS instructions per weight against 3.05)
    # and the 5 fp32 tiles tuned before, timed in one run (H200, weights rotated past L2, back to back
    # in a CUDA graph: bench/int4_gemv_sweep.py ... app half2; bench/results/int4_gemv_half2_h200_s26.*):
    # 4,234 us of GEMVs over the three models' steps against 4,374 for the fp32 set (-3.2 %), within
    # 0.1 % of every shape at its own best tile. HALF2 won the 7B's and Qwen's q/k/v (-9 %), o and
    # gate/up (-4.5 %) and the 1.8B's gate/up (-10 %); the deep down projections (K 8-19k) keep the
    # fp32 prefetching 128-row tile and the 1.8B's small q/k/v and o the fp32 256-row one. The fp32 set itself came from a 165-tile sweep (BLOCK_N 64-1024,
    # SPLIT 2-64, 1-4 warps, prefetch or 3-4 pipeline stages; bench/results/int4_gemv_sweep_h200_s21.json),
    # where pipelined tiles (LOOP_STAGES) won nowhere; a tensor-core version (bench/int4_mma_probe.py)
    # was slower. Five, not more: each tile costs compile and tuning time at a model's first load.
    _GEMV_CONFIGS = [
        triton.Config({"BLOCK_N": bn, "SPLIT": sp, "PREFETCH": pf, **({"HALF2": True} if h2 else {})},
                      num_warps=w, num_stages=1)
        for bn, sp, w, pf, h2 in [(128, 64, 2, True, False), (256, 16, 4, True, False), (256, 8, 2, False, True),
                                  (256, 32, 2, False, True), (512, 16, 4, False, True)]
    ]
    if os.environ.get("TRITON_INTERPRET") == "1":  # the interpreter (CPU tests) cannot time configs: one
        _GEMV_CONFIGS = [triton.Config({"BLOCK_N": 16, "SPLIT": 2}, num_warps=1, num_stages=1)]

    # Triton's autotuner: what a GEMV of a layer without a chosen tile runs (Int4Linear.tile -1; a
    # model's load chooses tiles in a CUDA graph instead, gemv_tiles.py). Triton's default warms each config up
    # for 25 ms and times it for 100 ms on every (N, K): on a fresh H200 that was ~0.22 s per config
    # and shape, 5 configs x 5 shapes, the most of a cold 7B warm-up's excess over a warm one
    # (decode graphs 7.8 s against 1.6 s, first forward 4.8 against 1.1: BENCHMARKS.md, session 18).
    # A GEMV takes 5-100 us, so 10 ms still times dozens to hundreds of runs per config, each from a
    # cleared L2 as in decode (a model's weights never fit in L2), and the median is what is
    # compared. bench/int4_kernels.py (tuning) measures what this costs and what it picks against
    # the default. Tuning stays bounded: at most configs x shapes x (TUNE_WARMUP_MS + TUNE_REP_MS)
    # of GEMV time, once per shape and GPU (cache_results keeps the winner on disk).
    TUNE_WARMUP_MS, TUNE_REP_MS = 2, 10

    def time_config(kernel_call, quantiles):
        """Triton's do_bench (L2 cleared before each run) over TUNE_REP_MS ms instead of its default 100."""
        return triton.testing.do_bench(kernel_call, warmup=TUNE_WARMUP_MS, rep=TUNE_REP_MS, quantiles=quantiles)

    @triton.jit
    def _nibble_as_float(words, j: tl.constexpr, one_bits):
        """1 + q/2**11 or 1 + q/2**7 as float32 for nibble j of each word: no conversion, no subtraction.

        The nibble is moved to mantissa bits 12-15 (odd j) or 16-19 (even j) and the exponent of 16.0
        or 1.0 ORed in (`one_bits`: ONE_BITS): 16 + q/2**7 or 1 + q/2**7, the same step of q, so x
        needs no scaling per nibble position. Two nibbles share each of three
        shifts: w << 8 (nibbles 1, 2), w (3, 4), w >> 8 (5, 6) and w turned by 16 bits (7, 0: one funnel
        shift, SHF.L.W, for the two end nibbles that a plain shift would take two for). The constant 1
        is taken out once per group from the sum of x (see _gemv_body); because q sits high in the
        mantissa, that subtraction loses ~8 of float32's 24 bits, far below the bf16 output's rounding.
        """
        if j == 1 or j == 2:
            v = words << 8
        elif j == 3 or j == 4:
            v = words
        elif j == 5 or j == 6:
            v = words >> 8
        else:
            u = words.to(tl.uint32, bitcast=True)
            v = ((u << 16) | (u >> 16)).to(tl.int32, bitcast=True)
        if j % 2 == 1:  # at bit 12, with 16.0's exponent: 16 (1 + q/2**11) = 16 + q/2**7, bit 16's step
            bits = (v & 0xF000) | (one_bits + 0x02000000)  # 4 more in the exponent
        else:
            bits = (v & 0xF0000) | one_bits
        return bits.to(tl.float32, bitcast=True)

    @triton.jit
    def _load_group(w_ptr, g, rw, rn, nmask, stride, EVEN: tl.constexpr):
        """Group g's 16 words for columns rn: a [16, BLOCK_N] tile (masked only at the N edge)."""
        ptrs = w_ptr + (g * 16 + rw)[:, None] * stride + rn[None, :]
        if EVEN:  # the usual case: no mask instructions per element
            return tl.load(ptrs)
        return tl.load(ptrs, mask=nmask[None, :], other=0)

    # res_ptr ... eps: the EPILOGUE's (int4_epilogue.py); a plain GEMV passes y and zeros. n_sq is not
    # specialized on: it is a model's hidden size over a tile's BLOCK_N, which precompile cannot know.
    @triton.heuristics({"EVEN": lambda a: a["N"] % a["BLOCK_N"] == 0 and a["K"] % 128 == 0})
    @triton.jit(do_not_specialize=["n_sq"])
    def _gemv_body(x_ptr, w_ptr, s_ptr, o_ptr, y_ptr, ws_ptr, lock_ptr, N, K, G_COUNT, stride_w, stride_s, one_bits,
                   res_ptr, gamma_ptr, h_ptr, sq_ptr, n_sq, eps,
                   BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, EVEN: tl.constexpr, PREFETCH: tl.constexpr = True,
                   LOOP_STAGES: tl.constexpr = 1, HALF2: tl.constexpr = False, H2_ASM: tl.constexpr = True,
                   EPILOGUE: tl.constexpr = STORE, PDL: tl.constexpr = 0):
        start_early(PDL)  # programmatic dependent launch (pdl.py): the next kernel may start now
        pid_n = tl.program_id(0)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = rn < N
        rw = tl.arange(0, 16)
        # This program's share of the groups.
        g_per = tl.cdiv(G_COUNT, SPLIT)
        g_lo = tl.program_id(1) * g_per
        g_hi = tl.minimum(g_lo + g_per, G_COUNT)
        # PDL level 2 asks the L2 for the first groups before the wait: weights are constant in decode (pdl.py).
        # (Asking it for a later group inside the loop as well, 2 or 4 ahead, was timed on the H200 in session
        # 29: 8-27 % slower on every GEMV of 9 MB and more; BENCHMARKS.md. Removed.)
        if PDL == 2:
            _prefetch_share(w_ptr, s_ptr, o_ptr, g_lo, tl.minimum(g_hi, g_lo + PREFETCH_GROUPS),
                            pid_n, N, stride_w, stride_s, BLOCK_N)
        # PREFETCH: the next group's words are loaded before this one's arithmetic, two groups in
        # flight per thread. (A program whose share is empty, when SPLIT does not divide G_COUNT,
        # loads a real group unused.) Without it a thread holds one group's words: on the tiles
        # that give a thread all 16 words (BLOCK_N = 128 x warps) that is 72-96 registers instead
        # of 255, so more warps fit and keep loads in flight instead (bench/int4_sass.py).
        if PREFETCH:
            nxt = _load_group(w_ptr, tl.minimum(g_lo, G_COUNT - 1), rw, rn, nmask, stride_w, EVEN)
        wait_for_earlier(PDL)  # x, the norm's sums, the residual and the workspace: written by earlier kernels
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        # A folded RMSNorm's scale (int4_epilogue.py): the packed-fp16 loop applies it to x as it loads x
        # (it scales x anyway), which keeps x in fp16's range whatever the size of the unnormalized h;
        # the fp32 loop to the finished rows, in the program that finishes them (computed before the
        # loop, the scale took a 128-row tile from 168 to 254 registers on sm_90).
        # Its power of two goes into x's scale (x * 2**e is as exact in fp16 as x: no rounding added), the
        # rest (1 to 2) onto the finished rows (row_scale).
        x_scale = H2_X_SCALE_
        row_scale = 1.0
        if HALF2 and (EPILOGUE == 1 or EPILOGUE == 3):
            rms_scale = norm_scale(sq_ptr, n_sq, K, eps)
            power = tl.exp2(tl.floor(tl.log2(rms_scale)))
            x_scale = H2_X_SCALE_ * power
            row_scale = rms_scale / power
        # HALF2 (models/kernels/int4_half2.py): fp16 pairs of 1.0 made from the run-time one_bits, so
        # that they sit in a register as one_bits does (see ONE_BITS)
        h2_one = one_bits - ONE_TO_H2_ONE
        # LOOP_STAGES > 1 (without PREFETCH): Triton's pipeliner copies the words of the next
        # LOOP_STAGES - 1 groups into shared memory asynchronously (cp.async, LDGSTS), so bytes stay
        # in flight without holding registers: ~95 registers and 36 KB of shared memory for a
        # 256-row, 4-warp tile at 3 stages. Only an explicit tl.range(num_stages=...) does this; the
        # launch option num_stages alone left this loop unpipelined (same SASS at 1 and 3 stages:
        # the earlier sweeps' "stages" timed the same kernel twice).
        for g in tl.range(g_lo, g_hi, num_stages=LOOP_STAGES):
            if PREFETCH:
                words = nxt
                if g + 1 < g_hi:
                    nxt = _load_group(w_ptr, g + 1, rw, rn, nmask, stride_w, EVEN)
            else:
                words = _load_group(w_ptr, g, rw, rn, nmask, stride_w, EVEN)
            if EVEN:
                s = tl.load(s_ptr + g * stride_s + rn).to(tl.float32)
                o = tl.load(o_ptr + g * stride_s + rn).to(tl.float32)
            else:
                s = tl.load(s_ptr + g * stride_s + rn, mask=nmask, other=0.0).to(tl.float32)
                o = tl.load(o_ptr + g * stride_s + rn, mask=nmask, other=0.0).to(tl.float32)
            if HALF2:
                dot, sx = group_dot_h2(words, x_ptr, g, rw, K, h2_one, EVEN, H2_ASM, x_scale)
                # sum_k q x = 64 (16 dot + 8 sum x'), sum_k x = 64 sum x'
                acc += (16.0 / H2_X_SCALE_) * s * dot + (8.0 * s + o) * (sx / H2_X_SCALE_)
            else:
                part = tl.zeros([16, BLOCK_N], dtype=tl.float32)
                x12 = tl.zeros([16], dtype=tl.float32)  # sum of x over the nibbles at bit 12, per word
                x16 = tl.zeros([16], dtype=tl.float32)  # ... at bit 16
                for j in tl.static_range(8):
                    kk = g * 128 + j * 16 + rw  # k of nibble j of each of the group's words
                    if EVEN:
                        xj = tl.load(x_ptr + kk).to(tl.float32)
                    else:
                        xj = tl.load(x_ptr + kk, mask=kk < K, other=0.0).to(tl.float32)
                    if j % 2 == 1:  # at bit 12: (16 + q/2**7) x
                        x12 += xj
                    else:  # at bit 16: (1 + q/2**7) x
                        x16 += xj
                    part += _nibble_as_float(words, j, one_bits) * xj[:, None]
                # part = sum(x at 16) + 16 sum(x at 12) + sum(q x) / 2**7, so
                # sum_k (q*s + o) x = s * sum_k q x + o * sum_k x = 128 s (part - that) + o * sum_k x.
                s12 = tl.sum(x12, axis=0)
                s16 = tl.sum(x16, axis=0)
                acc += (128.0 * s) * (tl.sum(part, axis=0) - (s16 + 16.0 * s12)) + o * (s12 + s16)
        partial = acc
        if SPLIT == 1:
            finish_rows(partial, rn, nmask, y_ptr, res_ptr, gamma_ptr, h_ptr, sq_ptr, n_sq, K, eps, row_scale,
                        pid_n, EPILOGUE, not HALF2)
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
                finish_rows(total, rn, nmask, y_ptr, res_ptr, gamma_ptr, h_ptr, sq_ptr, n_sq, K, eps, row_scale,
                            pid_n, EPILOGUE, not HALF2)
                tl.atomic_xchg(lock_ptr + pid_n, 0)

    @triton.jit
    def _prefetch_group(w_ptr, s_ptr, o_ptr, g, pid_n, N, stride_w, stride_s, BLOCK_N: tl.constexpr):
        """Ask the L2 for group g of this program's columns: its words (one pointer per 128-byte line,
        clamped inside the row) and scales and offsets (a line holds 64 of each)."""
        word_lines = tl.minimum(pid_n * BLOCK_N + tl.arange(0, max(BLOCK_N // 32, 1)) * 32, N - 1)
        pair_lines = tl.minimum(pid_n * BLOCK_N + tl.arange(0, max(BLOCK_N // 64, 1)) * 64, N - 1)
        prefetch_l2(w_ptr + (g * 16 + tl.arange(0, 16))[:, None] * stride_w + word_lines[None, :])
        prefetch_l2(s_ptr + g * stride_s + pair_lines)
        prefetch_l2(o_ptr + g * stride_s + pair_lines)

    @triton.jit
    def _prefetch_share(w_ptr, s_ptr, o_ptr, g_lo, g_hi, pid_n, N, stride_w, stride_s, BLOCK_N: tl.constexpr):
        """Ask the L2 for groups g_lo..g_hi-1 of this program's columns (_prefetch_group)."""
        for g in range(g_lo, g_hi):
            _prefetch_group(w_ptr, s_ptr, o_ptr, g, pid_n, N, stride_w, stride_s, BLOCK_N)

    def _fitting_splits(configs, named_args, **kwargs):
        """The configs whose split-K partial sums fit the workspace (int4.new_workspace) for this N."""
        from .split_k import split_fits

        return [c for c in configs if split_fits(c.kwargs["SPLIT"], named_args["N"])]

    # The timing run must not leave a counter behind: reset them before each timed config.
    _gemv_kernel = triton.autotune(configs=_GEMV_CONFIGS, key=["N", "K"], cache_results=True,
                                   reset_to_zero=["lock_ptr"], do_bench=time_config,
                                   prune_configs_by={"early_config_prune": _fitting_splits})(_gemv_body)

    @triton.jit
    def _dequant_t_kernel(w_ptr, s_ptr, o_ptr, out_ptr, N, K, G_COUNT, stride_w, stride_s, stride_out,
                          BLOCK_N: tl.constexpr):
        """W.T [K, N]: each program unpacks one group (128 rows of W.T) x BLOCK_N columns; stores run along N.

        The scale and offset are loaded once per column (not once per word), and each thread writes
        8 contiguous bf16 (16 bytes) per row: a prompt's dequantize is bound by these writes.
        """
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rw = tl.arange(0, 16)
        g = tl.program_id(1)
        nmask = rn < N
        words = tl.load(w_ptr + (g * 16 + rw)[:, None] * stride_w + rn[None, :], mask=nmask[None, :], other=0)
        s = tl.load(s_ptr + g * stride_s + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
        o = tl.load(o_ptr + g * stride_s + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
        for j in tl.static_range(8):
            q = ((words >> (4 * j)) & 0xF).to(tl.float32)
            k = g * 128 + j * 16 + rw
            tl.store(out_ptr + k[:, None] * stride_out + rn[None, :], (q * s + o).to(out_ptr.dtype.element_ty),
                     mask=(k < K)[:, None] & nmask[None, :])


def gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor,
         in_features: int, workspace: tuple[torch.Tensor, torch.Tensor] | None = None,
         config: dict | None = None) -> torch.Tensor:
    """y [1, N] = x [1, K] @ W.T, reading the int4 weight once (batch 1 only).

    `workspace` is int4.new_workspace()'s pair (a temporary one is made if None: not inside a
    CUDA graph). `config` (BLOCK_N, SPLIT, num_warps) runs one tile shape instead of the tuned one.
    """
    y = torch.empty(1, scales.shape[1], dtype=x.dtype, device=x.device)
    workspace = workspace_for(y.shape[1], x.device, workspace)
    # no epilogue: its pointers are y's, the sums' the fp32 partials' (the types precompile compiled for)
    launch(x, qweight, scales, offsets, in_features, y, workspace, config, (y, y, y, workspace[0], 0, 0.0))
    return y


def workspace_for(n: int, device: torch.device, workspace: tuple | None) -> tuple[torch.Tensor, torch.Tensor]:
    """`workspace` if it serves N outputs, else a new one (a temporary: not inside a CUDA graph)."""
    if workspace is None or workspace[1].numel() < n:
        from .int4 import new_workspace

        workspace = new_workspace(n, device)
    return workspace


def launch(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, in_features: int,
           y: torch.Tensor, workspace: tuple[torch.Tensor, torch.Tensor], config: dict | None,
           epilogue_args: tuple, epilogue: int = 0) -> None:
    """Run the GEMV of x [1, K] into y [1, N] with int4_epilogue's `epilogue` and its arguments
    (residual, gamma, h, sums of squares, their count, eps); `config` None: Triton's autotuner."""
    groups, n = scales.shape
    x = x.contiguous()
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT"])  # noqa: E731
    args = (x, qweight, scales, offsets, y, workspace[0], workspace[1], n, in_features, groups, qweight.stride(0),
            scales.stride(0), ONE_BITS, *epilogue_args)
    if config is not None and "MMA" in config:  # a tile of the tensor-core GEMV (int4_mma.py)
        from . import int4_mma

        int4_mma.launch(x, qweight, scales, offsets, in_features, y, workspace, config["MMA"], epilogue_args, epilogue)
        return
    options = pdl.launch_options(pdl.level(x.device))
    if config is None:
        _gemv_kernel[grid](*args, EPILOGUE=epilogue, enable_fp_fusion=FP_FUSION, **options)
    else:
        if config.get("HALF2"):  # the interpreter runs no PTX: the same fp16 math in plain Triton there
            config = {"H2_ASM": os.environ.get("TRITON_INTERPRET") != "1", **config}
        _gemv_body[grid](*args, **config, EPILOGUE=epilogue, enable_fp_fusion=FP_FUSION, **options)


def tile_count() -> int:
    """How many tiles a GEMV may be given: _GEMV_CONFIGS's, then the tensor-core GEMV's (int4_mma.TILES)."""
    from . import int4_mma

    return len(_GEMV_CONFIGS) + len(int4_mma.TILES)


def tile_config(index: int) -> dict:
    """Tile `index` as gemv()'s `config`: _GEMV_CONFIGS[index]'s constexprs and launch options, or past them
    int4_mma.TILES[index - 5] (int4_mma.config)."""
    if index >= len(_GEMV_CONFIGS):
        from . import int4_mma

        return int4_mma.config(int4_mma.TILES[index - len(_GEMV_CONFIGS)])
    tile = _GEMV_CONFIGS[index]
    return {**tile.kwargs, "num_warps": tile.num_warps, "num_stages": tile.num_stages}


def dequantize_t(qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, in_features: int,
                 dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """W.T [K, N] in `dtype`, unpacked on the device: a temporary for a prefill's cuBLAS matmul."""
    groups, n = scales.shape
    out = torch.empty(in_features, n, dtype=dtype, device=qweight.device)
    block_n = 256
    grid = (triton.cdiv(n, block_n), groups)
    _dequant_t_kernel[grid](qweight, scales, offsets, out, n, in_features, groups, qweight.stride(0),
                            scales.stride(0), out.stride(0), BLOCK_N=block_n, num_warps=4, enable_fp_fusion=FP_FUSION)
    return out
