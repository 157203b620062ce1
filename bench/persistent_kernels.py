"""A decoder layer's one-token step as one persistent Triton kernel, in the app's weight layout: measured slower.

Why: the int4 decode step is five kernels a layer (q/k/v GEMV, attention, o, gate/up, down), and each
carries a fixed cost no tile removes: the small GEMVs take 8-10 us for 2-3 us of bytes, every boundary
drains one kernel before the next starts, and each kernel waits a DRAM latency for its first weights
(BENCHMARKS.md, session 29's profile: the 1.8B runs at 21 % of its roofline). Here every program of
the grid stays resident for the whole layer, the five phases run in turn, and the programs meet at a
barrier over the grid between them:

  0 q/k/v   x = the residual h, normalised as it is loaded (each program takes h's RMS from the L2)
  1 attn    items (KV head, chunk) as decode_attention_qkv's programs (rotation, the token's cache
            write, the chunk, the last chunk's merge); also copies h into h_mid
  2 o       x = the attention's output; fp32 atomics add W_o x into h_mid (the residual add)
  3 gate/up x = h_mid normalised; the last K slice of a row tile to arrive writes SiLU(gate) * up
            (rows alternate gate, up: fused_projections.py); also copies h_mid into the next h
  4 down    x = SiLU(gate) * up; atomics add W_d x into the next h

The norms' weights are applied as x is loaded (int4_half2.group_dot_h2's gamma); the residual stream
stays fp32. Each phase writes a buffer of its own, zeroed before the launch, so no program reads a line
written earlier in the launch at the same address.

Measured on an NVIDIA H100 (BENCHMARKS.md, session 32): slower than the app's five kernels a layer at every
tile, grid and launch mode (the 1.8B's layer 0.97x at best in bench/persistent_layer.py, 0.86x as the app's
step), so the app does not run it. Session 32's commits b11cd75..b016163 (models/persistent_step.py,
git history) ran it as the app's decode step, captured in CUDA graphs, as a cooperative grid.
"""

from __future__ import annotations

import triton
import triton.language as tl

from models.kernels.decode_attention import attend_chunk, rotated_rows, write_token
from models.kernels.int4_half2 import H2_X_SCALE_, ONE_TO_H2_ONE, group_dot_h2
from models.kernels.int4_triton import _prefetch_group

PHASES = 5  # per layer; the kernel writes the number out (a global constexpr breaks Triton's interpreter)
# Keys per step of the attention's inner loop: 64, not the app kernel's 128. In one kernel with the GEMVs
# (4 warps) a 128-key step spilled 328 bytes on sm_90; 64 spills 8-32 bytes at most (255 registers: 2 programs an SM).
BLOCK_L = 64
# (rows, warps) of the GEMV phases: the app's 512- and 256-row tiles at the 4 warps the attention needs
# (at 2 warps its key and value tiles spill 2.6 KB).
TILES = ((512, 4), (256, 4))
# Weights the idle programs ask the L2 for while the DRAM idles (prefetch_idle): o's and gate/up's in the
# attention phase, then down's in o's. All of a 1.8B layer's (29 MB), a part of a 7B's (gate/up's first
# groups), within the 50 MB L2 of an H100 or H200.
PREFETCH_MB = 32


def units_in(megabytes: float, block_n: int) -> int:
    """The (group, row tile) units of weights (16 rows of words, a scale and an offset per row) in `megabytes`."""
    return int(megabytes * 2**20) // (68 * block_n)


@triton.jit
def grid_sync(bar_ptr, target):
    """Wait until the grid's arrivals at bar_ptr reach `target` (this barrier's number times the grid's size).

    The pattern of CUDA's cooperative grid sync: the program's threads meet, one arrival is counted with
    release semantics (a scalar atomic: Triton issues it from one thread), the program spins on acquiring
    loads of the count, and its threads meet again. The count only grows within a launch (no reset race);
    it is zeroed before each launch."""
    tl.debug_barrier()
    tl.atomic_add(bar_ptr, 1, sem="release", scope="gpu")
    arrived = tl.atomic_add(bar_ptr, 0, sem="acquire", scope="gpu")
    while arrived < target:
        arrived = tl.atomic_add(bar_ptr, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()


@triton.jit
def pick(p, a0, a1, a2, a3):
    """a_p for a run-time p in 0..3 (one loop over phases, not the phases written out: each written-out
    phase kept registers of its own live, 253 a thread against 128 on sm_90)."""
    if p == 0:
        v = a0
    elif p == 1:
        v = a1
    elif p == 2:
        v = a2
    else:
        v = a3
    return v


@triton.jit
def gemv_items(x_ptr, x_scale, gamma_ptr, w_ptr, s_ptr, o_ptr, y_ptr, N, K, split, h2_one, silu, act_ptr,
               tile_lock_ptr, BLOCK_N: tl.constexpr, ASM: tl.constexpr, GAMMA: tl.constexpr):
    """y += W (x * gamma * x_scale / H2_X_SCALE) for this program's items of the phase: (row tile, K slice)
    pairs dealt round-robin over the grid, fp32 atomics into y (zeroed before). K must be a multiple of 128 and
    N of BLOCK_N (every app shape's is of 512: masks on the rows spilled 224 bytes on sm_90). With `silu`, the
    last slice of a tile to arrive (an acq_rel counter per tile, reset by it) writes act[i] = SiLU(y[2i]) *
    y[2i + 1] for the tile's rows (gate and up alternate)."""
    groups = K // 128
    tiles = N // BLOCK_N
    g_per = tl.cdiv(groups, split)
    rw = tl.arange(0, 16)
    for item in range(tl.program_id(0), tiles * split, tl.num_programs(0)):
        tile = item % tiles
        rn = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        g_lo = (item // tiles) * g_per
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for g in range(g_lo, tl.minimum(g_lo + g_per, groups)):
            words = tl.load(w_ptr + (g * 16 + rw)[:, None] * N + rn[None, :])
            s = tl.load(s_ptr + g * N + rn).to(tl.float32)
            o = tl.load(o_ptr + g * N + rn).to(tl.float32)
            dot, sx = group_dot_h2(words, x_ptr, g, rw, K, h2_one, True, ASM, x_scale, gamma_ptr, GAMMA)
            acc += (16.0 / H2_X_SCALE_) * s * dot + (8.0 * s + o) * (sx / H2_X_SCALE_)
        tl.atomic_add(y_ptr + rn, acc, sem="relaxed", scope="gpu")
        if silu:
            tl.debug_barrier()  # every thread's adds are issued before the release below
            count = tl.atomic_add(tile_lock_ptr + tile, 1, sem="acq_rel", scope="gpu")
            if count == split - 1:
                j = tile * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
                gate = tl.load(y_ptr + 2 * j, cache_modifier=".cg")
                up = tl.load(y_ptr + 2 * j + 1, cache_modifier=".cg")
                tl.store(act_ptr + j, gate / (1.0 + tl.exp(-gate)) * up)
                tl.atomic_xchg(tile_lock_ptr + tile, 0)


@triton.jit
def _units(K, N, split, max_units, BLOCK_N: tl.constexpr):
    """The units prefetch_idle asks for of a GEMV (N x K, K split `split`) within `max_units` (0 if negative)."""
    return tl.maximum(tl.minimum(max_units, tl.cdiv(K // 128, split) * split * (N // BLOCK_N)), 0)


@triton.jit
def prefetch_idle(busy, w_ptr, s_ptr, o_ptr, N, K, split, max_units, BLOCK_N: tl.constexpr):
    """Programs from `busy` on (idle in this phase) ask the L2 for a later GEMV phase's weights, shared out over
    them: up to `max_units` (group, row tile) units, taken as the first groups of every item of that phase (its
    K split `split`), so that a partial prefetch shortens every item alike, and so the phase. Why: the
    attention phase is a latency chain that leaves the DRAM idle and most programs without an item."""
    idle = tl.num_programs(0) - busy
    tiles = N // BLOCK_N
    groups = K // 128
    g_per = tl.cdiv(groups, split)
    items = tiles * split
    units = _units(K, N, split, max_units, BLOCK_N)
    for unit in range(tl.program_id(0) - busy, units, idle):
        rest = unit % items
        g = (rest // tiles) * g_per + unit // items
        if g < groups:
            _prefetch_group(w_ptr, s_ptr, o_ptr, g, rest % tiles, N, N, N, BLOCK_N)


@triton.jit
def inverse_rms(h_ptr, H, eps, BLOCK: tl.constexpr):
    """1 / RMS(h[0:H]): every program reads h (a few KB, from the L2) after the barrier that completed it."""
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, H, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        v = tl.load(h_ptr + offs, mask=offs < H, other=0.0)
        total += v * v
    return 1.0 / tl.sqrt(tl.sum(total, axis=0) / H + eps)


@triton.jit
def copy_share(src_ptr, dst_ptr, n, BLOCK: tl.constexpr):
    """dst[0:n] = src[0:n], shared out over the grid."""
    for start in range(tl.program_id(0) * BLOCK, n, tl.num_programs(0) * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        tl.store(dst_ptr + offs, tl.load(src_ptr + offs, mask=offs < n), mask=offs < n)


@triton.jit
def _attention_items(qkv_ptr, bias_ptr, k_ptr, v_ptr, mask_ptr, out_ptr, ws_ptr, lock_ptr, cos_ptr, sin_ptr, pos,
                     W, CHUNK_KEYS, SPLITS, stride_kh, stride_kl, scaling, Q_HEADS: tl.constexpr,
                     KV_HEADS: tl.constexpr, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_L: tl.constexpr,
                     DOT_FP32: tl.constexpr, HAS_BIAS: tl.constexpr):
    """decode_attention_qkv's programs as items (KV head, chunk) of this program: the group's queries rotated,
    the token's key and value written by the item whose chunk holds the position, the chunk attended, and
    the last chunk of a head to finish merging them into out."""
    GROUP: tl.constexpr = Q_HEADS // KV_HEADS
    rg = tl.arange(0, ROWS)
    rd = tl.arange(0, HEAD_DIM)
    cos = tl.load(cos_ptr + rd).to(tl.float32)
    sin = tl.load(sin_ptr + rd).to(tl.float32)
    for item in range(tl.program_id(0), KV_HEADS * SPLITS, tl.num_programs(0)):
        head = item % KV_HEADS
        split = item // KV_HEADS
        q = rotated_rows(qkv_ptr, bias_ptr, head * GROUP + rg, rg < GROUP, cos, sin, HEAD_DIM, HAS_BIAS)
        q = q.to(k_ptr.dtype.element_ty)
        if split == pos // CHUNK_KEYS:
            write_token(qkv_ptr, bias_ptr, k_ptr, v_ptr, head, pos, cos, sin, stride_kh, stride_kl, stride_kh,
                        stride_kl, Q_HEADS, KV_HEADS, HEAD_DIM, HAS_BIAS)
        attend_chunk(q, head, split, k_ptr, v_ptr, mask_ptr, out_ptr, ws_ptr, lock_ptr, W, pos + 1, CHUNK_KEYS,
                     SPLITS, stride_kh, stride_kl, stride_kh, stride_kl, scaling, GROUP, ROWS, HEAD_DIM, BLOCK_L,
                     DOT_FP32)


@triton.jit
def layer_kernel(h_ptr, hmid_ptr, qkv_ptr, attn_ptr, gu_ptr, act_ptr, bar_ptr, ws_ptr, lock_ptr, tile_lock_ptr,
                 k_ptr, v_ptr, mask_ptr, cos_ptr, sin_ptr, pos_ptr, bias_ptr, gamma_in_ptr, gamma_post_ptr, ones_ptr,
                 first_layer, layers, wq, sq, oq, wo, so, oo, wg, sg, og, wd, sd, od, H, I,
                 split_q, split_o, split_g, split_d, W, CHUNK_KEYS, SPLITS, cache_len, scaling, one_bits, eps,
                 prefetch_units, Q_HEADS: tl.constexpr, KV_HEADS: tl.constexpr, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
                 BLOCK_L: tl.constexpr, DOT_FP32: tl.constexpr, BLOCK_N: tl.constexpr, ASM: tl.constexpr,
                 HAS_BIAS: tl.constexpr):
    """Layers first_layer .. first_layer + layers - 1, five phases each (the module's docstring), barriers between.

    Per layer l: h[l] in, h[l + 1] out (h: fp32 [L + 1, H]); hmid, qkv, attn, gu, act fp32 [L, ...], zeroed.
    The caches [L, KV_HEADS, cache_len, HEAD_DIM], the weights, the q/k/v bias and the norms' weights are
    stacked by layer (session 32's app step, whose layers own separate tensors, launched a layer at a time
    with first_layer 0, or read the layers' addresses from a table: git history).
    pos_ptr holds the token's position; the window is the first W cache positions, in chunks of CHUNK_KEYS."""
    programs = tl.num_programs(0)
    h2_one = one_bits - ONE_TO_H2_ONE
    QKV_N: tl.constexpr = (Q_HEADS + 2 * KV_HEADS) * HEAD_DIM
    ATTN_K: tl.constexpr = Q_HEADS * HEAD_DIM
    stride_kh = cache_len * HEAD_DIM
    pos = tl.load(pos_ptr)
    for step in range(first_layer * 5, (first_layer + layers) * 5):  # 5 phases a layer
        layer = step // 5
        p = step % 5
        h_in = h_ptr + layer * H
        h_mid = hmid_ptr + layer * H
        qkv = qkv_ptr + layer * QKV_N
        attn = attn_ptr + layer * ATTN_K
        if p == 1:
            cache = layer * KV_HEADS * stride_kh
            _attention_items(qkv, bias_ptr + layer * QKV_N, k_ptr + cache, v_ptr + cache, mask_ptr, attn, ws_ptr,
                             lock_ptr, cos_ptr, sin_ptr, pos, W, CHUNK_KEYS, SPLITS, stride_kh, HEAD_DIM, scaling,
                             Q_HEADS, KV_HEADS, ROWS, HEAD_DIM, BLOCK_L, DOT_FP32, HAS_BIAS)
            copy_share(h_in, h_mid, H, 1024)
            # The programs without an attention item ask the L2 for o's weights and then gate/up's, within
            # prefetch_units (group, tile) units in all (0: none), while the attention leaves the DRAM idle;
            # o's idle programs ask for down's with what is left.
            items = KV_HEADS * SPLITS
            if tl.program_id(0) >= items:
                o_units = _units(ATTN_K, H, split_o, prefetch_units, BLOCK_N)  # what o's prefetch takes
                prefetch_idle(items, wo + layer * (ATTN_K // 8) * H, so + layer * (ATTN_K // 128) * H,
                              oo + layer * (ATTN_K // 128) * H, H, ATTN_K, split_o, prefetch_units, BLOCK_N)
                prefetch_idle(items, wg + layer * (H // 8) * 2 * I, sg + layer * (H // 128) * 2 * I,
                              og + layer * (H // 128) * 2 * I, 2 * I, H, split_g, prefetch_units - o_units, BLOCK_N)
        else:
            slot = tl.where(p > 1, p - 1, p)  # phases 0, 2, 3, 4: GEMV slots 0, 1, 2, 3
            n = pick(slot, QKV_N, H, 2 * I, H)
            k = pick(slot, H, ATTN_K, H, I)
            words = layer * (k // 8) * n
            pairs = layer * (k // 128) * n
            x = pick(slot, h_in, attn, h_mid, act_ptr + layer * I)
            x_scale = tl.full([], H2_X_SCALE_, tl.float32)
            gamma = ones_ptr
            if slot == 0:  # the RMSNorms before q/k/v and before gate/up, on load
                x_scale = H2_X_SCALE_ * inverse_rms(x, H, eps, 1024)
                gamma = gamma_in_ptr + layer * H
            elif slot == 2:
                x_scale = H2_X_SCALE_ * inverse_rms(x, H, eps, 1024)
                gamma = gamma_post_ptr + layer * H
            gemv_items(x, x_scale, gamma, pick(slot, wq, wo, wg, wd) + words, pick(slot, sq, so, sg, sd) + pairs,
                       pick(slot, oq, oo, og, od) + pairs,
                       pick(slot, qkv, h_mid, gu_ptr + layer * 2 * I, h_ptr + (layer + 1) * H),
                       n, k, pick(slot, split_q, split_o, split_g, split_d), h2_one, slot == 2,
                       act_ptr + layer * I, tile_lock_ptr, BLOCK_N, ASM, True)
            if slot == 2:
                copy_share(h_mid, h_ptr + (layer + 1) * H, H, 1024)
            elif slot == 1 and tl.program_id(0) >= (H // BLOCK_N) * split_o:
                # o's idle programs: down's weights, within what the attention phase's prefetch left of the units
                taken = _units(ATTN_K, H, split_o, prefetch_units, BLOCK_N)
                taken += _units(H, 2 * I, split_g, prefetch_units - taken, BLOCK_N)
                prefetch_idle((H // BLOCK_N) * split_o, wd + layer * (I // 8) * H, sd + layer * (I // 128) * H,
                              od + layer * (I // 128) * H, H, I, split_d, prefetch_units - taken, BLOCK_N)
        if step + 1 < (first_layer + layers) * 5:
            grid_sync(bar_ptr, (step + 1 - first_layer * 5) * programs)


def split_for(n: int, k: int, programs: int, block_n: int) -> int:
    """K slices per row tile: as many as keep a phase's items within one per program (at most one per group).

    Rounded down, not up: items are dealt round-robin, so more items than programs make some program run
    two (the 7B's gate/up, 112 tiles over 264 programs: 2 slices of 16 groups, against 3 slices of 11
    groups whose 336 items give some programs 22 groups)."""
    return max(1, min(k // 128, programs // (n // block_n)))


def programs_that_fit(kernel, warps: int, device) -> tuple[int, dict]:
    """How many programs of a compiled (not launched) kernel the GPU holds at once, and its registers,
    spills and shared memory (a grid barrier over more programs than fit would never end)."""
    import torch

    kernel._init_handles()  # loaded: Triton reads the registers and spills as it loads the binary
    props = torch.cuda.get_device_properties(device)
    registers = getattr(props, "regs_per_multiprocessor", 65536)
    shared = getattr(props, "shared_memory_per_multiprocessor", 228 * 1024)
    per_sm = min(registers // (-(-kernel.n_regs // 8) * 8 * 32 * warps),
                 shared // kernel.metadata.shared if kernel.metadata.shared else 32, 32)
    usage = {"registers": kernel.n_regs, "spills": kernel.n_spills, "shared": kernel.metadata.shared}
    return per_sm * props.multi_processor_count, usage
