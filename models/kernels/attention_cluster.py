"""Decode attention of one token as one thread-block cluster per KV head (Hopper), in CUDA C++ (NVRTC).

Why: decode_attention.py's Triton kernel is a latency chain, not bandwidth: at 600 positions a 1.8B layer
reads 2.5 MB of keys and values (0.6 us at the H200's copy rate) and takes ~11 us (BENCHMARKS.md, session
29: 64 programs, 85 % of cycles with no warp ready; each program active ~6 us of 12, the rest the launch
and the last program's merge, which waits on an atomic and reads every chunk's partial back from global
memory). Here the blocks of a KV head form a cluster (sm_90): each block takes an equal share of the
positions up to the token's (the share follows the position at run time, so a graph captured for a
window splits a short chat as evenly as a long one), its warps keep an online softmax over 32 keys at a
time (a lane a key for the scores, a lane 4 dimensions for the values), the warps merge in shared memory,
and the blocks merge in the first block's distributed shared memory behind a cluster barrier: no
workspace, no atomic, no global round trip.

The same contract as decode_attention.decode_attention_qkv (its reference is the test's): the q/k/v
bias is added in fp32 and the rotation applied once, q is rounded to the cache's dtype, the token's key
and value are written at its position before they are read back, positions after it are never read.
"""

from __future__ import annotations

import functools
import logging

import torch

from . import nvrtc, pdl

log = logging.getLogger(__name__)

SOURCE = r"""
typedef unsigned int u32;
typedef unsigned short u16;
#define D HEAD_DIM
#define DPL (D / 32)   // dimensions a lane holds of a value row and of the output
#define KVEC (D / 8)   // 16-byte pieces of a key row
static_assert(D == 128, "a lane holds 4 dimensions of a value row: one 8-byte load");

__device__ __forceinline__ float bf(u16 v) { return __uint_as_float(((u32)v) << 16); }
__device__ __forceinline__ u16 to_bf(float v) { u16 h; asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(v)); return h; }
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int m = 16; m >= 1; m >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, m));
  return v;
}
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int m = 16; m >= 1; m >>= 1) v += __shfl_xor_sync(0xffffffffu, v, m);
  return v;
}
// Row `row` of src viewed as [rows, D], dimension d, plus row `brow` of the bias, rotated: x cos + rotate_half(x) sin in
// fp32. (src: the q/k/v projection's output in global memory, or its rows in shared memory: generic addressing.)
__device__ __forceinline__ float rotated(const u16* src, const u16* bias, const u16* cs, const u16* sn, int row, int brow,
                                         int d) {
  const int partner = (d + D / 2) % D;
  float x = bf(src[row * D + d]), y = bf(src[row * D + partner]);
#if HAS_BIAS
  x += bf(bias[brow * D + d]);
  y += bf(bias[brow * D + partner]);
#endif
  return x * bf(cs[d]) + (d < D / 2 ? -y : y) * bf(sn[d]);
}

// Dynamic shared memory a block of attend_head takes: (GROUP + WARPS GROUP + GROUP) D + 2 (WARPS + 1) GROUP floats.
#define ATTEND_FLOATS ((2 + WARPS) * GROUP * D + 2 * (WARPS + 1) * GROUP)

// out [Hq, D] = attention of the token at pos over positions [0, min(pos + 1, W)) where mask is set, for KV head
// `head`, by the CLUSTER blocks of its cluster (this one is `rank`). src holds the token's q rows (src_q .. + GROUP),
// k row (src_k) and v row (src_v), before their bias (the bias's rows are the projection's: its layout is
// [Hq q rows, Hkv k rows, Hkv v rows]).
__device__ __forceinline__ void attend_head(const u16* src, int src_q, int src_k, int src_v, const u16* bias,
    const u16* cs, const u16* sn, int pos, u16* kc, u16* vc, const unsigned char* mask, u16* out, int W, int skh,
    int skl, int svh, int svl, float scale_log2, int q_heads, int kv_heads, int head, u32 rank, float* smem) {
  float* qs = smem;                          // [GROUP][D]: q rotated, rounded, times scale * log2(e)
  float* wacc = qs + GROUP * D;              // [WARPS][GROUP][D]
  float* cta_acc = wacc + WARPS * GROUP * D; // [GROUP][D]
  float* wm = cta_acc + GROUP * D;           // [WARPS][GROUP]
  float* wl = wm + WARPS * GROUP;            // [WARPS][GROUP]
  float* cta_m = wl + WARPS * GROUP;         // [GROUP]
  float* cta_l = cta_m + GROUP;              // [GROUP]
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int n_keys = min(pos + 1, W);
  const int share = (n_keys + CLUSTER - 1) / CLUSTER;
  const int lo = min((int)rank * share, n_keys), hi = min(lo + share, n_keys);

  for (int i = tid; i < GROUP * D; i += WARPS * 32)
    qs[i] = bf(to_bf(rotated(src, bias, cs, sn, src_q + i / D, head * GROUP + i / D, i % D))) * scale_log2;
  if (lo <= pos && pos < hi) {               // this block's share holds the token: write its key and value first
    for (int d = tid; d < D; d += WARPS * 32) {
      kc[(size_t)head * skh + (size_t)pos * skl + d] = to_bf(rotated(src, bias, cs, sn, src_k, q_heads + head, d));
#if HAS_BIAS
      const float v_biased = bf(src[src_v * D + d]) + bf(bias[(q_heads + kv_heads + head) * D + d]);
      vc[(size_t)head * svh + (size_t)pos * svl + d] = to_bf(v_biased);
#else
      vc[(size_t)head * svh + (size_t)pos * svl + d] = src[src_v * D + d];
#endif
    }
  }
  __syncthreads();                           // q staged; the token's key and value visible to the block

  float m[GROUP], l[GROUP], acc[GROUP][DPL];
#pragma unroll
  for (int g = 0; g < GROUP; ++g) {
    m[g] = -1e30f;
    l[g] = 0.f;
#pragma unroll
    for (int e = 0; e < DPL; ++e) acc[g][e] = 0.f;
  }
  const u16* kh = kc + (size_t)head * skh;
  const u16* vh = vc + (size_t)head * svh;
  for (int base = lo + warp * 32; base < hi; base += WARPS * 32) {
    const int key = min(base + lane, hi - 1);          // clamped: every load is in bounds, none is conditional
    const bool valid = base + lane < hi && mask[key];
    float s[GROUP];
#pragma unroll
    for (int g = 0; g < GROUP; ++g) s[g] = 0.f;
    // The whole key row, then the 32 value rows' pieces, are asked for before any is used: one memory latency a
    // round, not one a load (ptxas keeps loads where the source puts them).
    const uint4* kp = (const uint4*)(kh + (size_t)key * skl);
    uint4 krow[KVEC];
#pragma unroll
    for (int c = 0; c < KVEC; ++c) krow[c] = kp[c];
    uint2 vrow[32];
#pragma unroll
    for (int j = 0; j < 32; ++j)                       // keys past the share: clamped, and their p is 0
      vrow[j] = *(const uint2*)(vh + (size_t)min(base + j, hi - 1) * svl + lane * DPL);
#pragma unroll
    for (int c = 0; c < KVEC; ++c) {
      const u32 words[4] = {krow[c].x, krow[c].y, krow[c].z, krow[c].w};
#pragma unroll
      for (int h = 0; h < 4; ++h) {
        const float k0 = __uint_as_float(words[h] << 16), k1 = __uint_as_float(words[h] & 0xffff0000u);
#pragma unroll
        for (int g = 0; g < GROUP; ++g) {
          const float2 q = *(const float2*)(qs + g * D + c * 8 + h * 2);
          s[g] = fmaf(q.x, k0, fmaf(q.y, k1, s[g]));
        }
      }
    }
    float p[GROUP];
#pragma unroll
    for (int g = 0; g < GROUP; ++g) {
      const float m_new = fmaxf(m[g], warp_max(valid ? s[g] : -1e30f));
      const float alpha = exp2f(m[g] - m_new);
      p[g] = valid ? exp2f(s[g] - m_new) : 0.f;
      l[g] = l[g] * alpha + warp_sum(p[g]);
      m[g] = m_new;
#pragma unroll
      for (int e = 0; e < DPL; ++e) acc[g][e] *= alpha;
    }
#pragma unroll
    for (int j = 0; j < 32; ++j) {
      const float v[4] = {__uint_as_float(vrow[j].x << 16), __uint_as_float(vrow[j].x & 0xffff0000u),
                          __uint_as_float(vrow[j].y << 16), __uint_as_float(vrow[j].y & 0xffff0000u)};
#pragma unroll
      for (int g = 0; g < GROUP; ++g) {
        const float pj = __shfl_sync(0xffffffffu, p[g], j);
#pragma unroll
        for (int e = 0; e < DPL; ++e) acc[g][e] = fmaf(pj, v[e], acc[g][e]);
      }
    }
  }

  // The warps' partials, then the block's, in shared memory.
#pragma unroll
  for (int g = 0; g < GROUP; ++g) {
    if (lane == 0) { wm[warp * GROUP + g] = m[g]; wl[warp * GROUP + g] = l[g]; }
#pragma unroll
    for (int e = 0; e < DPL; ++e) wacc[(warp * GROUP + g) * D + lane * DPL + e] = acc[g][e];
  }
  __syncthreads();
  for (int i = tid; i < GROUP * D; i += WARPS * 32) {
    const int g = i / D;
    float top = -1e30f;
    for (int w = 0; w < WARPS; ++w) top = fmaxf(top, wm[w * GROUP + g]);
    float a = 0.f, total = 0.f;
    for (int w = 0; w < WARPS; ++w) {
      const float weight = exp2f(wm[w * GROUP + g] - top);
      a += weight * wacc[w * GROUP * D + i];
      total += weight * wl[w * GROUP + g];
    }
    cta_acc[i] = a;
    if (i % D == 0) { cta_m[g] = top; cta_l[g] = total; }
  }
  // The blocks' partials meet in the first block, read from the others' shared memory (distributed shared memory).
  asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;" ::: "memory");
  if (rank == 0) {
    for (int i = tid; i < GROUP * D; i += WARPS * 32) {
      const int g = i / D;
      float ms[CLUSTER], ls[CLUSTER], as[CLUSTER], top = -1e30f;
#pragma unroll
      for (int r = 0; r < CLUSTER; ++r) {
        u32 local, remote;
        asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(local) : "l"(cta_m + g));
        asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(local), "r"(r));
        asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(ms[r]) : "r"(remote) : "memory");
        asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(local) : "l"(cta_l + g));
        asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(local), "r"(r));
        asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(ls[r]) : "r"(remote) : "memory");
        asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(local) : "l"(cta_acc + i));
        asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(local), "r"(r));
        asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(as[r]) : "r"(remote) : "memory");
        top = fmaxf(top, ms[r]);
      }
      float a = 0.f, total = 0.f;
#pragma unroll
      for (int r = 0; r < CLUSTER; ++r) {
        const float weight = exp2f(ms[r] - top);
        a += weight * as[r];
        total += weight * ls[r];
      }
      out[(head * GROUP + g) * D + i % D] = to_bf(a / total);
    }
  }
  // no block may leave while the first still reads its shared memory
  asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;" ::: "memory");
}
"""

# The kernel of decode_attention_qkv's contract: q/k/v from the projection's output in global memory. Grid (CLUSTER,
# KV heads), a cluster a KV head.
ENTRY = r"""
extern "C" __global__ void __launch_bounds__(WARPS * 32) __cluster_dims__(CLUSTER, 1, 1)
attention_cluster(const u16* qkv, const u16* bias, const u16* cs, const u16* sn, const long long* pos_ptr, u16* kc,
                  u16* vc, const unsigned char* mask, u16* out, int W, int skh, int skl, int svh, int svl,
                  float scale_log2, int q_heads, int kv_heads) {
#if PDL
  asm volatile("griddepcontrol.launch_dependents;");
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
  extern __shared__ float smem[];
  const int head = blockIdx.y;
  u32 rank;
  asm("mov.u32 %0, %%cluster_ctarank;" : "=r"(rank));
  attend_head(qkv, head * GROUP, q_heads + head, q_heads + kv_heads + head, bias, cs, sn, (int)*pos_ptr, kc, vc, mask,
              out, W, skh, skl, svh, svl, scale_log2, q_heads, kv_heads, head, rank, smem);
}
"""

LOG2E = 1.4426950408889634
WARPS = 8  # a block's warps: 256 keys in flight a round
# Windows longer than this take 16 warps a block (bench/results/attention_cluster_tiles_h100_s34.txt: at 4,096
# positions 1.8B 11.4-12.9 against 12.4-13.5 us, 7B 13.9-15.9 against 15.4-16.7; at 2,048 and less 8 warps are as
# fast or faster; 4 blocks a KV head tie or win by up to 5 % at 512 positions and lose from 1,024 on, so CLUSTER
# stays 8). With 16 warps a group of 4 spills 24 bytes a thread (128 registers at 512 threads) and is still the
# faster.
LONG_WINDOW, LONG_WARPS = 2048, 16
CLUSTER = 8  # blocks a KV head (the portable cluster size)
# Where it is taken, from bench/attention_cluster.py on an H100 (bench/results/attention_cluster_h100_s34.txt), µs a
# layer against the Triton kernel: groups of 2 (1.8B) 1.35-1.67x faster at windows of 512-8,192, groups of 4 (7B)
# 1.04x at 512 and 1.20-1.37x from 1,024; groups of 6-7 (Qwen2.5, 2-4 KV heads) 0.68-1.04x and 16 (InternLM3, 2 KV
# heads) 0.49-0.71x: a lane's scores cost GROUP x 128 multiply-adds, and a model with few KV heads fills few SMs.
MAX_GROUP = 4
MAX_WINDOW = 8192  # the longest window measured


def available(device: torch.device) -> bool:
    """A CUDA GPU with thread-block clusters and distributed shared memory (compute capability 9.0+)."""
    return device.type == "cuda" and torch.version.cuda is not None and torch.cuda.get_device_capability(device) >= (9, 0)


def takes(qkv: torch.Tensor, bias: torch.Tensor | None, cos: torch.Tensor, position: torch.Tensor, key: torch.Tensor,
          value: torch.Tensor, mask: torch.Tensor, query_heads: int) -> bool:
    """Whether this kernel runs the step: Hopper, bf16 throughout, head_dim 128 (every catalog model's), at most
    MAX_WINDOW positions, at most MAX_GROUP query heads a KV head, contiguous rows of 16-byte-aligned keys and values."""
    hkv, d = key.shape[1], key.shape[-1]
    tensors = [qkv, cos, key, value] + ([bias] if bias is not None else [])
    return (qkv.is_cuda and available(qkv.device) and all(t.dtype == torch.bfloat16 for t in tensors)
            and d == 128 and query_heads % hkv == 0 and query_heads // hkv <= MAX_GROUP
            and position.dtype == torch.int64 and mask.dtype == torch.bool and mask.shape[-1] <= MAX_WINDOW
            and key.stride(-1) == 1 and value.stride(-1) == 1
            and all(t.data_ptr() % 16 == 0 and t.stride(2) % 8 == 0 for t in (key, value))
            and builds(query_heads // hkv, d, bias is not None, pdl.level(nvrtc.device_of(qkv)) > pdl.OFF,
                       warps_for(mask.shape[-1]), nvrtc.device_of(qkv)))


@functools.lru_cache(maxsize=None)
def builds(group: int, head_dim: int, has_bias: bool, dependent: bool, warps: int, device: torch.device) -> bool:
    """Whether this kernel compiles and loads here (NVRTC found, the compile and the module load succeed): if not,
    that is logged once and the step keeps the Triton kernel rather than failing."""
    try:
        _kernel(group, head_dim, has_bias, dependent, warps, CLUSTER, device)
        return True
    except (OSError, RuntimeError) as error:
        log.warning("the cluster decode attention cannot run here, the Triton kernel runs instead: %s", error)
        return False


def source_for(group: int, head_dim: int, has_bias: bool, dependent: bool, warps: int = WARPS,
               cluster: int = CLUSTER) -> str:
    """SOURCE for `group` query heads a KV head of `head_dim`, with or without the q/k/v bias, launched early or not."""
    return (f"#define GROUP {group}\n#define HEAD_DIM {head_dim}\n#define HAS_BIAS {int(has_bias)}\n"
            f"#define PDL {int(dependent)}\n#define WARPS {warps}\n#define CLUSTER {cluster}\n{SOURCE}{ENTRY}")


def shared_bytes(group: int, head_dim: int, warps: int = WARPS) -> int:
    """The dynamic shared memory a block takes (SOURCE's layout)."""
    return 4 * ((2 + warps) * group * head_dim + 2 * (warps + 1) * group)


@functools.lru_cache(maxsize=None)
def _kernel(group: int, head_dim: int, has_bias: bool, dependent: bool, warps: int, cluster: int,
            device: torch.device) -> nvrtc.Kernel:
    return nvrtc.load_kernel(source_for(group, head_dim, has_bias, dependent, warps, cluster), "attention_cluster",
                             device, ("-std=c++17",))


def compile_jobs(query_heads: int, kv_heads: int, head_dim: int, has_bias: bool, dtype: torch.dtype, pdl_level: int,
                 device: torch.device) -> list:
    """Calls that compile (or read from the cubin cache) the kernels a decode step of this head layout will launch
    on `device`, one for each block shape warps_for gives: for int4_precompile to run in threads while the weights
    load, so that the first decode step compiles nothing. None where the step does not take this kernel."""
    group = query_heads // max(kv_heads, 1)
    if not (available(device) and dtype == torch.bfloat16 and head_dim == 128 and query_heads % kv_heads == 0
            and group <= MAX_GROUP):
        return []
    dependent = pdl_level > pdl.OFF
    return [lambda w=warps: _kernel(group, head_dim, has_bias, dependent, w, CLUSTER, device)
            for warps in (WARPS, LONG_WARPS)]


def warps_for(window: int) -> int:
    """A block's warps for a window of `window` positions (WARPS, or LONG_WARPS past LONG_WINDOW)."""
    return LONG_WARPS if window > LONG_WINDOW else WARPS


def attention_qkv(qkv: torch.Tensor, bias: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                  position: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, scaling: float,
                  query_heads: int, warps: int | None = None, cluster: int = CLUSTER) -> torch.Tensor:
    """decode_attention.decode_attention_qkv's result [1, Hq, D] by this kernel (`takes` must hold; `warps` and
    `cluster`, a block's warps and a KV head's blocks, for the bench: warps_for's by default)."""
    hkv, d = key.shape[1], key.shape[-1]
    warps = warps or warps_for(mask.shape[-1])
    group = query_heads // hkv
    device = nvrtc.device_of(qkv)
    dependent = pdl.level(device) > pdl.OFF
    out = qkv.new_empty(1, query_heads, d)
    kernel = _kernel(group, d, bias is not None, dependent, warps, cluster, device)
    kernel((cluster, hkv, 1), (32 * warps, 1, 1),
           [qkv.contiguous(), qkv if bias is None else bias.contiguous(), cos.contiguous(), sin.contiguous(),
            position, key, value, mask.reshape(-1), out, mask.shape[-1], key.stride(1), key.stride(2), value.stride(1),
            value.stride(2), float(scaling * LOG2E), query_heads, hkv], shared_bytes(group, d, warps), dependent)
    return out
