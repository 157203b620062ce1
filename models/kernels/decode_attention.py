"""Decode attention (one query token over a window of the static KV cache) as one Triton kernel.

Why: the plain form is a matmul for the scores, a softmax and a matmul for the output, with
masking and casts between them: three or four kernels a layer, each a few microseconds at the
start of a kernel in a CUDA graph (a 7B step spent ~0.3 ms of its 2.9 in them; BENCHMARKS.md,
session 21). Here one program takes one KV head's query heads (grouped-query attention: each key
is read once for all of them) over one chunk of the window, keeps an online softmax, and leaves
its partial result in a workspace; the last program of a head to finish (counted with an atomic,
as the int4 GEMV's split-K does) merges the chunks and writes the output. One kernel, and enough
programs to read a long window at the memory system's speed.

`decode_attention_qkv` is the same kernel fed by the layer's fused q/k/v projection: its programs
also add the bias and rotate the query (and the key), and the program whose chunk holds the token's
position writes the key and value into the cache before reading its chunk, so the layer's rotation
and cache-write kernels go (the fast decoder's layer loop: models/attention.decode_step_attention).

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

from . import attention_cluster, pdl
from .split_k import ATTENTION_MAX_SPLITS as MAX_SPLITS, attention_partial_floats, attention_rows

if triton is not None:
    from .pdl import prefetch_l2, start_early, wait_for_earlier

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
CLUSTER_ENV = "SMALLCHAT_CLUSTER_ATTENTION"  # "0": Hopper runs this Triton kernel too (attention_cluster.py's A/B)


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


def _chunks(hq: int, hkv: int, d: int, window: int, partials, counters, chunk: int | None) -> tuple[int, int]:
    """(chunks per head, keys per chunk) of a launch (`chunk` overrides splits_for's), checked against the workspace."""
    splits, keys_per_chunk = splits_for(window)
    if chunk is not None:
        keys_per_chunk = chunk
        splits = -(-window // chunk)
    if splits > MAX_SPLITS or partials.numel() < attention_partial_floats(hq, hkv, d) or counters.numel() < hkv:
        raise ValueError(f"decode attention: workspace too small for {hkv} heads x {splits} chunks")
    return splits, keys_per_chunk


def _run_kernel(query, key, value, mask, scaling, partials, counters, chunk: int | None = None,
                block_l: int = BLOCK_L, num_warps: int = NUM_WARPS, num_stages: int = NUM_STAGES) -> torch.Tensor:
    """The kernel's launch (`chunk` overrides splits_for's chunk length, the rest the tile: tests and bench)."""
    _, hq, d = query.shape
    hkv, window = key.shape[1], mask.shape[-1]
    if key.stride(-1) != 1 or value.stride(-1) != 1 or d & (d - 1) or hq % hkv:
        return reference(query, key, value, mask, scaling)  # layouts the kernel does not take: still right
    splits, keys_per_chunk = _chunks(hq, hkv, d, window, partials, counters, chunk)
    query = query.contiguous()
    out = torch.empty_like(query)
    _decode_attention_kernel[(hkv, splits)](
        query, key, value, mask.reshape(-1), out, partials, counters, window, keys_per_chunk, splits,
        key.stride(1), key.stride(2), value.stride(1), value.stride(2), float(scaling),
        GROUP=hq // hkv, ROWS=attention_rows(hq, hkv), HEAD_DIM=d, BLOCK_L=block_l,
        DOT_FP32=os.environ.get("TRITON_INTERPRET") == "1", num_warps=num_warps, num_stages=num_stages,
        **pdl.launch_options(pdl.level(query.device)))
    return out


def qkv_reference(qkv: torch.Tensor, bias: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                  position: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, scaling: float,
                  query_heads: int) -> torch.Tensor:
    """decode_attention_qkv in plain PyTorch: the bias add and rotation in fp32, rounded once (as the kernel
    and Inductor's fused rotation do), k and v written at `position`, then `reference`."""
    hkv, d = key.shape[1], key.shape[-1]
    x = qkv.float().view(query_heads + 2 * hkv, d)
    if bias is not None:
        x = x + bias.float().view_as(x)
    q, k, v = x.split([query_heads, hkv, hkv])
    c, s = cos.float().view(d), sin.float().view(d)

    def turned(t):
        return t * c + torch.cat([-t[:, d // 2:], t[:, :d // 2]], dim=-1) * s
    key.index_copy_(2, position, turned(k).to(key.dtype).view(1, hkv, 1, d))
    value.index_copy_(2, position, v.to(value.dtype).view(1, hkv, 1, d))
    causal = mask & (torch.arange(mask.shape[-1], device=mask.device) <= position)  # nothing after the token
    return reference(turned(q).to(key.dtype).view(1, query_heads, d), key, value, causal, scaling)


# The cache's key and value are declared mutated (they are: this token's are written); the workspace is
# not, as for decode_attention. Inductor writes in place: no copy of the cache (tests/test_decode_attention.py).
@torch.library.custom_op("smallchat::decode_attention_qkv", mutates_args=("key", "value"))
def decode_attention_qkv(qkv: torch.Tensor, bias: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                         position: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
                         scaling: float, query_heads: int, partials: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """One token's attention from its q/k/v projection, in one kernel: q and k rotated, k and v written to
    the cache at `position`, attention over the window -> [1, Hq, D].

    qkv [(Hq + 2 Hkv) D] (the fused projection's output before its bias), bias like it or None, cos/sin
    [D], position [1]; key/value [1, Hkv, L, D] (the layer's cache), mask [W] as decode_attention's, where
    positions after `position` are never attended (causal: the kernel does not read their keys).
    Why one kernel: rotating q, rotating and writing k, and writing v were three kernels of ~1 us a layer
    (an H200 profile of the compiled 1.8B step, bench/results/decode_speed_h200_s23_fewer_kernels_1.8b.jsonl).
    """
    if not _triton_ready(qkv) or not _qkv_kernel_takes(qkv, cos, key, value, query_heads):
        return qkv_reference(qkv, bias, cos, sin, position, key, value, mask, scaling, query_heads)
    if os.environ.get(CLUSTER_ENV, "1") != "0" and attention_cluster.takes(qkv, bias, cos, position, key, value, mask,
                                                                          query_heads):
        return attention_cluster.attention_qkv(qkv, bias, cos, sin, position, key, value, mask, scaling, query_heads)
    return _run_qkv_kernel(qkv, bias, cos, sin, position, key, value, mask, scaling, query_heads, partials, counters)


@decode_attention_qkv.register_fake
def _(qkv, bias, cos, sin, position, key, value, mask, scaling, query_heads, partials, counters):
    return qkv.new_empty(1, query_heads, key.shape[-1])


def _qkv_kernel_takes(qkv, cos, key, value, query_heads: int) -> bool:
    hkv, d = key.shape[1], key.shape[-1]
    return (key.stride(-1) == 1 and value.stride(-1) == 1 and not d & (d - 1) and query_heads % hkv == 0
            and qkv.is_contiguous() and qkv.numel() == (query_heads + 2 * hkv) * d and cos.numel() == d)


def _run_qkv_kernel(qkv, bias, cos, sin, position, key, value, mask, scaling, query_heads, partials, counters,
                    chunk: int | None = None) -> torch.Tensor:
    """decode_attention_qkv's launch (`chunk` as _run_kernel's)."""
    hkv, d, window = key.shape[1], key.shape[-1], mask.shape[-1]
    splits, keys_per_chunk = _chunks(query_heads, hkv, d, window, partials, counters, chunk)
    out = qkv.new_empty(1, query_heads, d)
    _decode_attention_qkv_kernel[(hkv, splits)](
        qkv, qkv if bias is None else bias.contiguous(), cos.contiguous(), sin.contiguous(), position, key, value,
        mask.reshape(-1), out, partials, counters, window, keys_per_chunk, splits,
        key.stride(1), key.stride(2), value.stride(1), value.stride(2), float(scaling),
        Q_HEADS=query_heads, KV_HEADS=hkv, GROUP=query_heads // hkv, ROWS=attention_rows(query_heads, hkv),
        HEAD_DIM=d, BLOCK_L=BLOCK_L, DOT_FP32=os.environ.get("TRITON_INTERPRET") == "1", HAS_BIAS=bias is not None,
        num_warps=NUM_WARPS, num_stages=NUM_STAGES, **pdl.launch_options(pdl.level(qkv.device)))
    return out


def qkv_compile_jobs(query_heads: int, kv_heads: int, head_dim: int, has_bias: bool, dtype: torch.dtype,
                     pdl_level: int = pdl.OFF) -> list:
    """Warm-up calls that compile decode_attention_qkv's kernel as a model's decode step will launch it (no
    tensors: dtypes stand in for them), for int4_precompile to run in threads while the weights load.

    Triton compiles a kernel per specialization of its int arguments (1, a multiple of 16, or other): every
    window, chunk and stride the step uses is a multiple of 16 (windows of 512+, 128- or 256-key chunks,
    head_dim 64+), and the number of chunks is one of 4-8 (windows up to 2k) or 16+ (4k and more): two
    kernels. A wrong guess only leaves the compile to the first call."""
    if triton is None:
        return []
    kernel = _decode_attention_qkv_kernel
    cache_len = 4096 + 64  # any multiple of 64 specializes the strides alike
    jobs = []
    for window in (512, 4096):
        splits, keys_per_chunk = splits_for(window)
        args = (dtype, dtype, dtype, dtype, torch.int64, dtype, dtype, torch.bool, dtype, torch.float32, torch.int32,
                window, keys_per_chunk, splits, cache_len * head_dim, head_dim, cache_len * head_dim, head_dim,
                head_dim ** -0.5)
        constexprs = dict(Q_HEADS=query_heads, KV_HEADS=kv_heads, GROUP=query_heads // kv_heads,
                          ROWS=attention_rows(query_heads, kv_heads), HEAD_DIM=head_dim, BLOCK_L=BLOCK_L,
                          DOT_FP32=False, HAS_BIAS=has_bias, num_warps=NUM_WARPS, num_stages=NUM_STAGES,
                          **pdl.launch_options(pdl_level))
        jobs.append(lambda a=args, c=constexprs: kernel.warmup(*a, grid=(1,), **c))
    return jobs


if triton is not None:
    @triton.jit
    def _decode_attention_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr, ws_ptr, lock_ptr, W, CHUNK_KEYS, SPLITS,
                                 stride_kh, stride_kl, stride_vh, stride_vl, scaling,
                                 GROUP: tl.constexpr, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
                                 BLOCK_L: tl.constexpr, DOT_FP32: tl.constexpr, PDL: tl.constexpr = 0):
        _begin(k_ptr, v_ptr, W, CHUNK_KEYS, stride_kh, stride_kl, stride_vh, stride_vl, HEAD_DIM, BLOCK_L, PDL)
        rg = tl.arange(0, ROWS)  # query head head * GROUP + rg; rows past GROUP are padding
        rd = tl.arange(0, HEAD_DIM)
        rows = tl.program_id(0) * GROUP + rg
        q = tl.load(q_ptr + rows[:, None] * HEAD_DIM + rd[None, :], mask=(rg < GROUP)[:, None], other=0.0)
        attend_chunk(q, tl.program_id(0), tl.program_id(1), k_ptr, v_ptr, mask_ptr, out_ptr, ws_ptr, lock_ptr,
                     W, W, CHUNK_KEYS, SPLITS, stride_kh, stride_kl, stride_vh, stride_vl, scaling, GROUP, ROWS,
                     HEAD_DIM, BLOCK_L, DOT_FP32)

    @triton.jit
    def _begin(k_ptr, v_ptr, W, CHUNK_KEYS, stride_kh, stride_kl, stride_vh, stride_vl, HEAD_DIM: tl.constexpr,
               BLOCK_L: tl.constexpr, PDL: tl.constexpr):
        """A program's start under programmatic dependent launch (pdl.py): let the next kernel launch; at
        level 2 ask the L2 for this chunk's keys and values (earlier steps wrote them: constant now; the
        one this step writes is written through the L2 all the same); then wait for the kernels before."""
        start_early(PDL)
        if PDL == 2:
            lo = tl.program_id(1) * CHUNK_KEYS
            hi = tl.minimum(lo + CHUNK_KEYS, W)
            lines = tl.arange(0, max(HEAD_DIM // 64, 1)) * 64  # a 128-byte line holds 64 bf16 of a key
            head = tl.program_id(0)
            for start in range(lo, hi, BLOCK_L):
                pos = tl.minimum(start + tl.arange(0, BLOCK_L), hi - 1)
                prefetch_l2(k_ptr + head * stride_kh + pos[:, None] * stride_kl + lines[None, :])
                prefetch_l2(v_ptr + head * stride_vh + pos[:, None] * stride_vl + lines[None, :])
        wait_for_earlier(PDL)

    @triton.jit
    def rotated_rows(qkv_ptr, bias_ptr, rows, valid, cos, sin, HEAD_DIM: tl.constexpr, HAS_BIAS: tl.constexpr):
        """Rows `rows` of qkv seen as [heads, HEAD_DIM] (+ bias), turned by the rotary embedding, in fp32:
        x cos + rotate_half(x) sin, where rotate_half(x) = (-x[D/2:], x[:D/2]) (Llama's and Qwen2's form)."""
        rd = tl.arange(0, HEAD_DIM)
        partner = (rd + HEAD_DIM // 2) % HEAD_DIM
        at = rows[:, None] * HEAD_DIM + rd[None, :]
        turned = rows[:, None] * HEAD_DIM + partner[None, :]
        x = tl.load(qkv_ptr + at, mask=valid[:, None], other=0.0).to(tl.float32)
        y = tl.load(qkv_ptr + turned, mask=valid[:, None], other=0.0).to(tl.float32)
        if HAS_BIAS:  # added in fp32, unrounded, as Inductor fuses the projection's bias add into the rotation
            x += tl.load(bias_ptr + at, mask=valid[:, None], other=0.0).to(tl.float32)
            y += tl.load(bias_ptr + turned, mask=valid[:, None], other=0.0).to(tl.float32)
        return x * cos[None, :] + tl.where((rd < HEAD_DIM // 2)[None, :], -y, y) * sin[None, :]

    @triton.jit
    def _decode_attention_qkv_kernel(qkv_ptr, bias_ptr, cos_ptr, sin_ptr, pos_ptr, k_ptr, v_ptr, mask_ptr, out_ptr,
                                     ws_ptr, lock_ptr, W, CHUNK_KEYS, SPLITS, stride_kh, stride_kl, stride_vh,
                                     stride_vl, scaling, Q_HEADS: tl.constexpr, KV_HEADS: tl.constexpr,
                                     GROUP: tl.constexpr, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
                                     BLOCK_L: tl.constexpr, DOT_FP32: tl.constexpr, HAS_BIAS: tl.constexpr,
                                     PDL: tl.constexpr = 0):
        _begin(k_ptr, v_ptr, W, CHUNK_KEYS, stride_kh, stride_kl, stride_vh, stride_vl, HEAD_DIM, BLOCK_L, PDL)
        head = tl.program_id(0)
        rg = tl.arange(0, ROWS)
        rd = tl.arange(0, HEAD_DIM)
        cos = tl.load(cos_ptr + rd).to(tl.float32)
        sin = tl.load(sin_ptr + rd).to(tl.float32)
        # The group's query heads, rotated and rounded to the cache's dtype (what a separate rotation
        # kernel would hand the attention), then the usual attention over the chunk.
        q = rotated_rows(qkv_ptr, bias_ptr, head * GROUP + rg, rg < GROUP, cos, sin, HEAD_DIM, HAS_BIAS)
        q = q.to(k_ptr.dtype.element_ty)
        pos = tl.load(pos_ptr)
        if tl.program_id(1) == pos // CHUNK_KEYS:
            write_token(qkv_ptr, bias_ptr, k_ptr, v_ptr, head, pos, cos, sin, stride_kh, stride_kl, stride_vh,
                        stride_vl, Q_HEADS, KV_HEADS, HEAD_DIM, HAS_BIAS)
        # Causal: nothing after the token's position is read, whatever the mask (a window's chunks past it
        # load no keys: up to half of a window, which grows in powers of two, in a long chat).
        attend_chunk(q, head, tl.program_id(1), k_ptr, v_ptr, mask_ptr, out_ptr, ws_ptr, lock_ptr, W, pos + 1,
                     CHUNK_KEYS, SPLITS, stride_kh, stride_kl, stride_vh, stride_vl, scaling, GROUP, ROWS,
                     HEAD_DIM, BLOCK_L, DOT_FP32)

    @triton.jit
    def write_token(qkv_ptr, bias_ptr, k_ptr, v_ptr, head, pos, cos, sin, stride_kh, stride_kl, stride_vh, stride_vl,
                    Q_HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_BIAS: tl.constexpr):
        """KV head `head`'s key (rotated) and value of this token, from qkv, into the cache at `pos`.

        Run by the program whose chunk holds the position, which then reads them back with the rest of its
        chunk (after the barrier here: every thread's store is visible to the block). No other program
        reads that position: one kernel, no race."""
        rd = tl.arange(0, HEAD_DIM)
        one = tl.arange(0, 1)
        key = rotated_rows(qkv_ptr, bias_ptr, Q_HEADS + head + one, one < 1, cos, sin, HEAD_DIM, HAS_BIAS)
        v_at = (Q_HEADS + KV_HEADS + head) * HEAD_DIM + rd
        value = tl.load(qkv_ptr + v_at).to(tl.float32)
        if HAS_BIAS:
            value += tl.load(bias_ptr + v_at).to(tl.float32)
        tl.store(k_ptr + head * stride_kh + pos * stride_kl + one[:, None] * 0 + rd[None, :],
                 key.to(k_ptr.dtype.element_ty))
        tl.store(v_ptr + head * stride_vh + pos * stride_vl + rd, value.to(v_ptr.dtype.element_ty))
        tl.debug_barrier()

    @triton.jit
    def attend_chunk(q, head, split, k_ptr, v_ptr, mask_ptr, out_ptr, ws_ptr, lock_ptr, W, END, CHUNK_KEYS, SPLITS,
                stride_kh, stride_kl, stride_vh, stride_vl, scaling,
                GROUP: tl.constexpr, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
                BLOCK_L: tl.constexpr, DOT_FP32: tl.constexpr):
        """Query rows `q` [ROWS, HEAD_DIM] of KV head `head` over chunk `split` (a kernel passes its program
        ids; a persistent kernel the item it is on), positions before END (<= W) only; the last program of
        the head merges the chunks and writes the output."""
        rg = tl.arange(0, ROWS)
        rd = tl.arange(0, HEAD_DIM)
        rl = tl.arange(0, BLOCK_L)
        grow = rg < GROUP
        # Masked scores are a large negative number, not -inf: a chunk whose keys are all masked then
        # keeps finite sums (no inf - inf), and the merge below weighs it by exp(-1e30 - max) = 0.
        m_i = tl.full([ROWS], -1e30, dtype=tl.float32)
        l_i = tl.zeros([ROWS], dtype=tl.float32)
        acc = tl.zeros([ROWS, HEAD_DIM], dtype=tl.float32)
        lo = split * CHUNK_KEYS
        hi = tl.minimum(lo + CHUNK_KEYS, W)
        if DOT_FP32:  # Triton's interpreter (CPU tests) multiplies in float32
            q = q.to(tl.float32)
        # Positions from END on are masked off in the loads, which then read nothing. (Bounding the loop by
        # END instead, a loaded value, compiled the q/k/v kernel differently: 94 registers against 138 on
        # sm_90, and 200 bytes of spills where the launch's alignment is not known.)
        for start in range(lo, hi, BLOCK_L):
            pos = start + rl
            inside = (pos < hi) & (pos < END)
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
