"""Decode attention (one query token over a window of the static KV cache) as one Triton kernel.

Why: the plain form is a matmul for the scores, a softmax and a matmul for the output, with
masking and casts between them: three or four kernels a layer, each a few microseconds at the
start of a kernel in a CUDA graph (a 7B step spent ~0.3 ms of its 2.9 in them; BENCHMARKS.md,
session 21). Here one program takes one KV head's query heads (grouped-query attention: each key
is read once for all of them) over one chunk of the window, keeps an online softmax, and leaves
its partial result in a workspace; the last program of a head to finish (counted with an atomic,
as the int4 GEMV's split-K does) merges the chunks and writes the output. One kernel, and enough
programs to read a long window at the memory system's speed.

`decode_attention` is a custom op so torch.compile and CUDA graphs see one node. Without CUDA (or
Triton) it runs `reference`, the plain form, which is also what the tests compare the kernel with.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU build of torch does not bring Triton: the reference runs
    triton = None

from .split_k import ATTENTION_MAX_SPLITS as MAX_SPLITS, attention_partial_floats, attention_rows

# The tile, from a sweep of chunk 64/128/256, block 32/64/128, 2/4/8 warps and 1/2 stages over the 7B,
# 1.8B and Qwen2.5-7B head layouts at windows of 512 and 4,096 (H200, a graph of one step's layers,
# bench/decode_attention.py --sweep; bench/results/decode_attention_sweep_h200_s22.json): 128-key
# blocks over 4 warps, 2 stages, won at every layout and window; chunks of 128 keys at 512 positions
# (7.0-7.7 us a layer, against 7.8-8.8 at 256) and of 256 at 4,096 (16.0-17.9 us, against 20.0-24.2
# at 128: the last program's merge reads the chunks' partials one after another). A merge that loads
# them together (the maxima and sums as one tile, the outputs four chunks at a time) was timed in
# session 23 and was not faster (7B: 7.98 against 7.54 us at 512 positions, 17.87 against 17.69 at
# 4,096; bench/results/decode_attention_h200_s23_batched_merge.txt): the merge is not what limits it.
BLOCK_L = 128  # keys per inner step
CHUNK, LONG_CHUNK, LONG_WINDOW = 128, 256, 1024  # keys per program: CHUNK up to LONG_WINDOW positions
NUM_WARPS, NUM_STAGES = 4, 2


def reference(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
              scaling: float) -> torch.Tensor:
    """The plain form: query [1, Hq, D]; key/value [1, Hkv, >=W, D]; mask bool [W] (True = attend) -> [1, Hq, D]."""
    window = mask.shape[-1]
    key, value = key[:, :, :window], value[:, :, :window]
    b, hq, d = query.shape
    hkv = key.shape[1]
    q = query.view(b, hkv, hq // hkv, d)  # [B, Hkv, G, D]: the query heads that share a KV head
    scores = torch.matmul(q, key.transpose(-1, -2)).float() * scaling  # [B, Hkv, G, W]
    scores = scores.masked_fill(~mask.view(1, 1, 1, -1), float("-inf"))
    probs = scores.softmax(-1).to(value.dtype)
    return torch.matmul(probs, value).reshape(b, hq, d)


def splits_for(window: int) -> tuple[int, int]:
    """(chunks per head, keys per chunk) for a window: CHUNK- or LONG_CHUNK-key chunks, at most MAX_SPLITS."""
    per_split = -(-window // MAX_SPLITS)
    chunk = max(CHUNK if window <= LONG_WINDOW else LONG_CHUNK, -(-per_split // BLOCK_L) * BLOCK_L)
    return -(-window // chunk), chunk


def new_workspace(query_heads: int, kv_heads: int, head_dim: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Partial results (fp32: per chunk, each row's output, running max and sum) and zeroed per-head counters."""
    return (torch.empty(attention_partial_floats(query_heads, kv_heads, head_dim), dtype=torch.float32, device=device),
            torch.zeros(kv_heads, dtype=torch.int32, device=device))


def _triton_ready(query: torch.Tensor) -> bool:
    return triton is not None and query.is_cuda


# mutates_args is empty although the kernel writes its workspace: the counters are left at zero and
# the partials are dead scratch (the same reasoning as kernels/int4.py's int4_linear).
@torch.library.custom_op("smallchat::decode_attention", mutates_args=())
def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
                     scaling: float, partials: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """Attention of one token: query [1, Hq, D] over the first W = mask.shape[-1] positions of key/value
    [1, Hkv, L, D] where mask [W] (bool) is True -> [1, Hq, D]. `partials`/`counters`: new_workspace's."""
    if not _triton_ready(query):
        return reference(query, key, value, mask, scaling)
    return _run_kernel(query, key, value, mask, scaling, partials, counters)


@decode_attention.register_fake
def _(query, key, value, mask, scaling, partials, counters):
    return torch.empty_like(query)


def _run_kernel(query, key, value, mask, scaling, partials, counters, chunk: int | None = None,
                block_l: int = BLOCK_L, num_warps: int = NUM_WARPS, num_stages: int = NUM_STAGES) -> torch.Tensor:
    """The kernel's launch (`chunk` overrides splits_for's chunk length, the rest the tile: tests and bench)."""
    _, hq, d = query.shape
    hkv, window = key.shape[1], mask.shape[-1]
    if key.stride(-1) != 1 or value.stride(-1) != 1 or d & (d - 1) or hq % hkv:
        return reference(query, key, value, mask, scaling)  # layouts the kernel does not take: still right
    splits, keys_per_chunk = splits_for(window)
    if chunk is not None:
        keys_per_chunk = chunk
        splits = -(-window // chunk)
    if splits > MAX_SPLITS or partials.numel() < attention_partial_floats(hq, hkv, d) or counters.numel() < hkv:
        raise ValueError(f"decode attention: workspace too small for {hkv} heads x {splits} chunks")
    query = query.contiguous()
    out = torch.empty_like(query)
    _decode_attention_kernel[(hkv, splits)](
        query, key, value, mask.reshape(-1), out, partials, counters, window, keys_per_chunk, splits,
        key.stride(1), key.stride(2), value.stride(1), value.stride(2), float(scaling),
        GROUP=hq // hkv, ROWS=attention_rows(hq, hkv), HEAD_DIM=d, BLOCK_L=block_l,
        DOT_FP32=os.environ.get("TRITON_INTERPRET") == "1", num_warps=num_warps, num_stages=num_stages)
    return out


if triton is not None:
    @triton.jit
    def _decode_attention_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr, ws_ptr, lock_ptr, W, CHUNK_KEYS, SPLITS,
                                 stride_kh, stride_kl, stride_vh, stride_vl, scaling,
                                 GROUP: tl.constexpr, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
                                 BLOCK_L: tl.constexpr, DOT_FP32: tl.constexpr):
        head = tl.program_id(0)
        split = tl.program_id(1)
        rg = tl.arange(0, ROWS)  # query head head * GROUP + rg; rows past GROUP are padding
        rd = tl.arange(0, HEAD_DIM)
        rl = tl.arange(0, BLOCK_L)
        grow = rg < GROUP
        q = tl.load(q_ptr + (head * GROUP + rg)[:, None] * HEAD_DIM + rd[None, :], mask=grow[:, None], other=0.0)
        # Masked scores are a large negative number, not -inf: a chunk whose keys are all masked then
        # keeps finite sums (no inf - inf), and the merge below weighs it by exp(-1e30 - max) = 0.
        m_i = tl.full([ROWS], -1e30, dtype=tl.float32)
        l_i = tl.zeros([ROWS], dtype=tl.float32)
        acc = tl.zeros([ROWS, HEAD_DIM], dtype=tl.float32)
        lo = split * CHUNK_KEYS
        hi = tl.minimum(lo + CHUNK_KEYS, W)
        if DOT_FP32:  # Triton's interpreter (CPU tests) multiplies in float32
            q = q.to(tl.float32)
        for start in range(lo, hi, BLOCK_L):
            pos = start + rl
            inside = pos < hi
            attend = tl.load(mask_ptr + pos, mask=inside, other=0).to(tl.int1)
            k = tl.load(k_ptr + head * stride_kh + pos[:, None] * stride_kl + rd[None, :], mask=inside[:, None],
                        other=0.0)
            v = tl.load(v_ptr + head * stride_vh + pos[:, None] * stride_vl + rd[None, :], mask=inside[:, None],
                        other=0.0)
            if DOT_FP32:
                k = k.to(tl.float32)
            s = tl.dot(q, tl.trans(k)) * scaling  # [ROWS, BLOCK_L]
            s = tl.where(attend[None, :], s, -1e30)
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            if DOT_FP32:
                acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32))
            else:  # the probabilities in the values' dtype, as the plain form's softmax(...).to(value.dtype)
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        # This chunk's partial: rows x (output, max, sum), then the hand-off to the last program of the head.
        part = (head * SPLITS + split) * ROWS + rg
        tl.store(ws_ptr + part[:, None] * (HEAD_DIM + 2) + rd[None, :], acc)
        tl.store(ws_ptr + part * (HEAD_DIM + 2) + HEAD_DIM, m_i)
        tl.store(ws_ptr + part * (HEAD_DIM + 2) + HEAD_DIM + 1, l_i)
        tl.debug_barrier()  # every thread's partial is written before the release below
        count = tl.atomic_add(lock_ptr + head, 1, sem="acq_rel", scope="gpu")
        if count == SPLITS - 1:
            m_all = tl.full([ROWS], -1e30, dtype=tl.float32)
            for s_no in range(0, SPLITS):
                row = ((head * SPLITS + s_no) * ROWS + rg) * (HEAD_DIM + 2)
                m_all = tl.maximum(m_all, tl.load(ws_ptr + row + HEAD_DIM, cache_modifier=".cg"))
            total = tl.zeros([ROWS, HEAD_DIM], dtype=tl.float32)
            l_all = tl.zeros([ROWS], dtype=tl.float32)
            for s_no in range(0, SPLITS):
                row = ((head * SPLITS + s_no) * ROWS + rg) * (HEAD_DIM + 2)
                weight = tl.exp(tl.load(ws_ptr + row + HEAD_DIM, cache_modifier=".cg") - m_all)
                l_all += weight * tl.load(ws_ptr + row + HEAD_DIM + 1, cache_modifier=".cg")
                total += weight[:, None] * tl.load(ws_ptr + row[:, None] + rd[None, :], cache_modifier=".cg")
            result = total / l_all[:, None]
            tl.store(out_ptr + (head * GROUP + rg)[:, None] * HEAD_DIM + rd[None, :],
                     result.to(out_ptr.dtype.element_ty), mask=grow[:, None])
            tl.atomic_xchg(lock_ptr + head, 0)
