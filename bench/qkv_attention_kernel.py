"""Probe: a decode layer's q/k/v projection and attention as one kernel, a thread-block cluster per KV head (Hopper).

Version 1 measured slower than the two kernels it would replace, so the app does not run it (BENCHMARKS.md, session
34: on an H100 the 1.8B's layer 16.3 against 14.4 us, the 7B's 27.6 against 18.6, end to end 887 against 925 and 345 against
395 tok/s). What limited it: the projection's weights were read by only CLUSTER x KV heads blocks (64 for both models),
each warp a K split of up to three 32-row tiles, two groups of words in flight at a time: six to eight dependent DRAM
round trips where the GEMV kernel's hundreds of blocks have one or two.

Version 2 (this file): 16 warps a block, and every word, scale and offset of a block's share asked for before x is
staged (up to 24 16-byte words a lane): one DRAM latency for the projection. Timed in session 35 (H100,
bench/results/qkv_attention_h100_s35.txt), it is still slower: the 1.8B's layer 17.5 against 14.4 us at a 1,024
window (version 1: 16.3), the 7B's 24.9 against 18.5 (version 1: 27.6). More words in flight helped the 7B and not
the 1.8B; 64 blocks still read the projection where the GEMV spreads it over hundreds.

Why: a layer of the one-token step was five kernels (q/k/v GEMV, attention, o, gate/up, down), and what keeps decode
under the bandwidth roofline is each kernel's fixed cost: its launch, its first DRAM latency, its split-K tail
(BENCHMARKS.md, sessions 29-34; the 1.8B's q/k/v GEMV takes 6.2 us for 4.5 MB, 24 % of the copy rate). A KV head's
attention needs only its own rows of the projection: its GROUP query heads', its key's and its value's, (GROUP + 2)
x 128 rows. Here the CLUSTER blocks of the head's cluster (attention_cluster.py) first compute those rows, each block
a share of their 32-row tiles on the tensor cores (mma_fragments.py, as int4_mma.py's GEMV, K split over the warps
and summed in a fixed order), scale them by the folded RMSNorm (int4_epilogue.SCALED: the layer's input norm, whose
weight is folded into the projection) and round them to bf16 as the GEMV's output would be; the blocks exchange the
rows through distributed shared memory, and attention_cluster's attend_head runs on them. The q/k/v output never goes
to global memory, and one launch a layer goes.

Where it does not apply (not Hopper, other dtypes or layouts) the op runs the two ops it replaces.
"""

from __future__ import annotations

import functools

import torch

from models.kernels import attention_cluster, int4_mma, nvrtc, pdl
from models.kernels.decode_attention import decode_attention_qkv
from models.kernels.int4_folded import int4_linear_scaled
from models.kernels.mma_fragments import FRAGMENTS

WARPS = 16  # a block's warps (version 2; version 1 ran attention_cluster.warps_for's 8 or 16)

KERNEL = r"""
#define KS WARPS                       // K splits of a row tile: one a warp
#define HEAD_ROWS ((GROUP + 2) * D)    // the head's rows of the projection: its q heads', its key's, its value's
#define TILES (HEAD_ROWS / 32)
#define MY_TILES ((TILES + CLUSTER - 1) / CLUSTER)   // the most tiles a block of the cluster takes

// The projection's row for row j of the head's rows (q heads, then the key, then the value).
__device__ __forceinline__ int projection_row(int j, int head, int q_heads, int kv_heads) {
  const int block = j / D, at = j % D;
  return (block < GROUP ? head * GROUP + block : block == GROUP ? q_heads + head : q_heads + kv_heads + head) * D + at;
}

extern "C" __global__ void __launch_bounds__(WARPS * 32) __cluster_dims__(CLUSTER, 1, 1)
qkv_attention(const u16* x, const uint4* qw, const u16* scales, const u16* offsets, int N, int K, int G, u32 magic,
              const float* sq, int n_sq, float eps, const u16* bias, const u16* cs, const u16* sn,
              const long long* pos_ptr, u16* kc, u16* vc, const unsigned char* mask, u16* out, int W, int skh, int skl,
              int svh, int svl, float scale_log2, int q_heads, int kv_heads) {
#if PDL
  asm volatile("griddepcontrol.launch_dependents;");
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
  extern __shared__ uint4 smem[];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, head = blockIdx.y;
  u32 rank;
  asm("mov.u32 %0, %%cluster_ctarank;" : "=r"(rank));
  const int my_tiles = (TILES - (int)rank + CLUSTER - 1) / CLUSTER;   // tiles rank, rank + CLUSTER, ...
  // Shared memory: x staged (G groups), this block's rows (bf16, indexed by head row), all the head's rows gathered,
  // the K splits' partial sums, then attend_head's floats.
  const int stage_bytes = G * 520;
  u16* rows_mine = (u16*)((char*)smem + stage_bytes);
  u16* rows_all = rows_mine + HEAD_ROWS;
  float* part = (float*)(rows_all + HEAD_ROWS);                        // [KS][my_tiles * 32]
  float* attend_smem = part + KS * MY_TILES * 32;

  // Each warp: its K split (GPW groups) of every tile of this block; a lane holds 4 rows' words (one 16-byte load a
  // word index). Version 2: every word, scale and offset of the block's share is asked for before x is staged, so
  // the share costs one DRAM latency, not one per tile and pair of groups (version 1, measured: session 34).
  const int nq = N >> 2, r = lane >> 2, c = lane & 3;
  const int g_lo = min(warp * GPW, G), ng = min(g_lo + GPW, G) - g_lo;
  uint4 words[MY_TILES][GPW][4];
  u16 scale[MY_TILES][GPW], offset[MY_TILES][GPW];
#pragma unroll
  for (int t = 0; t < MY_TILES; ++t) {
    const int tile = min((int)rank + t * CLUSTER, TILES - 1);          // past the block's tiles: clamped, unused
    const int quad = projection_row(tile * 32, head, q_heads, kv_heads) / 4 + r;
    const uint4* wp = qw + (size_t)(g_lo * 16 + c) * nq + quad;
#pragma unroll
    for (int i = 0; i < GPW; ++i) {
      const int gi = min(i, max(ng - 1, 0));                           // clamped: in bounds, unused past ng
      const int gl = min(g_lo + gi, G - 1);
#pragma unroll
      for (int s = 0; s < 4; ++s) words[t][i][s] = __ldg(wp + (size_t)gi * 16 * nq + s * 4 * nq);
      scale[t][i] = __ldg(scales + (size_t)gl * N + quad * 4 + c);
      offset[t][i] = __ldg(offsets + (size_t)gl * N + quad * 4 + c);
    }
  }
  float inv_sigma;
  stage_x(x, K, 0, G, G, smem, inv_sigma);
  const uint4* frags = smem + G * 16;
  const float2* sums = (const float2*)(smem + G * 32);
#pragma unroll
  for (int t = 0; t < MY_TILES; ++t) {
    float acc = 0.f;
#pragma unroll
    for (int i = 0; i < GPW; ++i) {
      if (i < ng) {
        const int gl = g_lo + i;
        float t0[4] = {0.f, 0.f, 0.f, 0.f}, t1[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int s = 0; s < 4; ++s) word_step(t0, t1, words[t][i][s], frags[gl * 16 + s * 4 + c], magic);
        const float dot = c == 0 ? t0[0] : c == 1 ? t0[2] : c == 2 ? t1[0] : t1[2];
        const float2 sm = sums[gl];
        acc += bf16_to_f32(scale[t][i]) * (dot - sm.x) * inv_sigma + bf16_to_f32(offset[t][i]) * sm.y;
      }
    }
    if (t < my_tiles) part[warp * my_tiles * 32 + t * 32 + r * 4 + c] = acc;
  }
  __syncthreads();
  // The rows: the splits summed in order, scaled as the folded input norm's RMSNorm (int4_epilogue.SCALED), rounded.
  float total_sq = 0.f;
  for (int i = 0; i < n_sq; ++i) total_sq += __ldcg(sq + i);
  const float norm = rsqrtf(total_sq / K + eps);
  for (int i = tid; i < my_tiles * 32; i += WARPS * 32) {
    float y = 0.f;
    for (int s = 0; s < KS; ++s) y += part[s * my_tiles * 32 + i];
    rows_mine[((int)rank + (i / 32) * CLUSTER) * 32 + i % 32] = f32_to_bf16(y * norm);
  }
  // Every block gathers the head's rows from the blocks that computed them (distributed shared memory).
  asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;" ::: "memory");
  for (int j = tid; j < HEAD_ROWS; j += WARPS * 32) {
    u32 local, remote;
    unsigned short v;
    asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(local) : "l"(rows_mine + j));
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(local), "r"((j / 32) % CLUSTER));
    asm volatile("ld.shared::cluster.u16 %0, [%1];" : "=h"(v) : "r"(remote) : "memory");
    rows_all[j] = v;
  }
  __syncthreads();
  attend_head(rows_all, 0, GROUP, GROUP + 1, bias, cs, sn, (int)*pos_ptr, kc, vc, mask, out, W, skh, skl, svh, svl,
              scale_log2, q_heads, kv_heads, head, rank, attend_smem);
}
"""


def source_for(group: int, has_bias: bool, dependent: bool, warps: int, groups: int) -> str:
    """The kernel for `group` query heads a KV head (head_dim 128), the q/k/v bias or not, launched early or not,
    `warps` a block, over a K of `groups` groups of 128 (a warp's share of them, GPW, sizes its registers)."""
    defines = (f"#define GROUP {group}\n#define HEAD_DIM 128\n#define HAS_BIAS {int(has_bias)}\n#define PDL {int(dependent)}\n"
               f"#define WARPS {warps}\n#define CLUSTER {attention_cluster.CLUSTER}\n#define GPW {-(-groups // warps)}\n")
    return defines + FRAGMENTS + attention_cluster.SOURCE + KERNEL


def shared_bytes(group: int, groups: int, warps: int) -> int:
    """KERNEL's dynamic shared memory for `groups` groups of 128 in K."""
    tiles = (group + 2) * 128 // 32
    per_block = -(-tiles // attention_cluster.CLUSTER) * 32
    head_rows = (group + 2) * 128
    return groups * 520 + 2 * 2 * head_rows + 4 * warps * per_block + attention_cluster.shared_bytes(group, 128, warps)


def takes(x: torch.Tensor, qweight: torch.Tensor, bias: torch.Tensor | None, cos: torch.Tensor, position: torch.Tensor,
          key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, query_heads: int) -> bool:
    """Whether the fused kernel runs the step: attention_cluster.takes for the attention, and bf16 x with K a
    multiple of 128 over a projection of (Hq + 2 Hkv) x 128 rows."""
    hkv = key.shape[1]
    rows = (query_heads + 2 * hkv) * 128
    return (x.dtype == torch.bfloat16 and x.numel() % 128 == 0 and qweight.shape == (x.numel() // 8, rows)
            and qweight.is_contiguous() and attention_cluster.takes(x, bias, cos, position, key, value, mask, query_heads))


@functools.lru_cache(maxsize=None)
def _kernel(group: int, has_bias: bool, dependent: bool, warps: int, groups: int, device: torch.device) -> nvrtc.Kernel:
    return nvrtc.load_kernel(source_for(group, has_bias, dependent, warps, groups), "qkv_attention", device,
                             ("-std=c++17",))


def launch(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, sums: torch.Tensor,
           eps: float, bias: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor, position: torch.Tensor,
           key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, scaling: float, query_heads: int) -> torch.Tensor:
    """The attention output [1, Hq, D] of the token whose input-norm input is x [1, K] (`takes` must hold)."""
    hkv, k = key.shape[1], x.numel()
    groups, n = scales.shape
    group = query_heads // hkv
    warps = WARPS  # version 2: 16 warps, twice the words in flight of 8
    device = nvrtc.device_of(x)
    dependent = pdl.level(device) > pdl.OFF
    out = x.new_empty(1, query_heads, 128)
    kernel = _kernel(group, bias is not None, dependent, warps, groups, device)
    kernel((attention_cluster.CLUSTER, hkv, 1), (32 * warps, 1, 1),
           [x.contiguous(), qweight, scales, offsets, n, k, groups, int4_mma.MAGIC, sums, sums.numel(), float(eps),
            x if bias is None else bias.contiguous(), cos.contiguous(), sin.contiguous(), position, key, value,
            mask.reshape(-1), out, mask.shape[-1], key.stride(1), key.stride(2), value.stride(1), value.stride(2),
            float(scaling * attention_cluster.LOG2E), query_heads, hkv], shared_bytes(group, groups, warps), dependent)
    return out


ENV = "SMALLCHAT_FUSED_QKV"  # "0": the q/k/v GEMV and the attention as two kernels (this kernel's A/B)


# The cache's key and value are written (this token's); the GEMV and attention workspaces are left as they were
# (decode_attention_qkv's reasoning).
@torch.library.custom_op("smallchat_bench::qkv_attention", mutates_args=("key", "value"))
def qkv_attention(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, in_features: int,
                  split_partials: torch.Tensor, split_counters: torch.Tensor, tile: int, sums: torch.Tensor, eps: float,
                  bias: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor, position: torch.Tensor,
                  key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, scaling: float, query_heads: int,
                  partials: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """decode_attention_qkv's result [1, Hq, D] for the token whose q/k/v projection (int4, its input norm folded:
    int4_linear_scaled's arguments first) is not yet computed: one kernel where `takes` holds, else the two ops."""
    import os

    if os.environ.get(ENV, "1") != "0" and takes(x, qweight, bias, cos, position, key, value, mask, query_heads) \
            and sums.dtype == torch.float32:
        return launch(x, qweight, scales, offsets, sums, eps, bias, cos, sin, position, key, value, mask, scaling,
                      query_heads)
    qkv = int4_linear_scaled(x, qweight, scales, offsets, in_features, split_partials, split_counters, tile, sums, eps,
                             False)
    return decode_attention_qkv(qkv.reshape(-1), bias, cos, sin, position, key, value, mask, scaling, query_heads,
                                partials, counters)


@qkv_attention.register_fake
def _(x, qweight, scales, offsets, in_features, split_partials, split_counters, tile, sums, eps, bias, cos, sin,
      position, key, value, mask, scaling, query_heads, partials, counters):
    return x.new_empty(1, query_heads, key.shape[-1])
