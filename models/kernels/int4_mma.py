"""A batch-1 int4 GEMV on the tensor cores' mma.sync, written in CUDA C++ and compiled at run time (NVRTC).

Why: the Triton GEMV (int4_triton.py) spends 2.3-2.6 SASS instructions per weight, and on an H200 that
is most of the issue slots the copy rate would need (BENCHMARKS.md, sessions 21-29). Here the
multiply-adds go to the tensor cores, where an m16n8k16 mma takes 8 weights a thread in one
instruction; what the CUDA cores still do per word of 8 weights is 4 LOP3 and a shift (fp16 magic
numbers, below). Triton cannot emit mma.sync on Hopper (it picks wgmma, whose operands go through
shared memory and whose waits serialised session 21's tensor-core probe), hence CUDA C++.
NVRTC comes with every CUDA build of torch and the driver with the GPU (nvrtc.py), so a user needs no
compiler. Ampere and later (mma.sync m16n8k16 is sm_80+).

The numbers: a word's nibbles j and j + 4 (bits 4j and 16 + 4j) masked in place and ORed into fp16's
1024.0 give the pair (1024 + q, 1024 + q') for j = 0, 2 (after one shift by 8 for j = 2) and
(1024 + 16 q, 1024 + 16 q') for j = 1, 3, all exact. The mma multiplies them by x' = x sigma (x sigma / 16
for j odd) in fp16, sigma a power of two chosen per block from its largest |x| (exact for a bf16 x), and
sums in fp32; the 1024s come out per group through the sum of those x': sum_k q x = (C - 1024 sum x') /
sigma. The fp32 sum then holds ~7 bits fewer of q x than a centred one would, ~16 bits of it: far below
the bf16 output's rounding.

Layout: a warp owns 32 output rows (8 lanes x 4 adjacent rows, one 16-byte load each) and every lane
c = lane % 4 owns words c, c + 4, c + 8, c + 12 of each group; one mma tile is 16 of the warp's rows
x the 16 k of one word index's 4 nibble pairs. x, turned into the B operand's fp16 pairs, is staged
in shared memory once per block (its K range), where every lane reads its 4 pairs with one 16-byte
load per word index. Every column of B holds the same x, so every column of C holds the dot.
"""

from __future__ import annotations

import functools
import os

import torch

from . import nvrtc, pdl
from .mma_fragments import FRAGMENTS

SOURCE = FRAGMENTS + r"""
// The finished rows, as int4_epilogue.py's EPILOGUE says (the same math and roundings as its Triton
// finish_rows): 0 store; 1 SCALED, times the folded RMSNorm's rsqrt(sum(sq) / K + eps); 3 SCALED_SILU_MUL, then
// SiLU(gate) * up of the row pairs (gate, up) into row / 2; 2 RESIDUAL_NORM, h = res + y, y = h * gamma, and
// the block's sum of h^2 into sq[blockIdx.x]. Every thread of the block calls it (shuffles, a block reduction).
__device__ __forceinline__ void finish(float total, int row, bool ok, int tid, int lane, int warp, u16* y,
                                       const u16* res, const u16* gamma, u16* h, float* sq, int n_sq, int K,
                                       float eps, int epilogue) {
  if (epilogue == 1 || epilogue == 3) {
    float sum = 0.f;
    for (int i = 0; i < n_sq; ++i) sum += __ldcg(sq + i);
    const float scaled = total * rsqrtf(sum / K + eps);
    if (epilogue == 1) {
      if (ok) y[row] = f32_to_bf16(scaled);
    } else {
      const float rounded = bf16_to_f32(f32_to_bf16(scaled));
      const float up = __shfl_down_sync(0xffffffffu, rounded, 1);  // rows alternate gate, up: lanes c, c + 1
      const float silu = bf16_to_f32(f32_to_bf16(rounded / (1.f + __expf(-rounded))));
      if (ok && (row & 1) == 0) y[row >> 1] = f32_to_bf16(silu * up);
    }
  } else if (epilogue == 2) {
    const float yv = bf16_to_f32(f32_to_bf16(total));     // the model adds its o/down output rounded to bf16
    float hv = 0.f;
    if (ok) {
      hv = bf16_to_f32(f32_to_bf16(bf16_to_f32(res[row]) + yv));
      h[row] = f32_to_bf16(hv);
      y[row] = f32_to_bf16(hv * bf16_to_f32(gamma[row]));
    }
    float square = hv * hv;
#pragma unroll
    for (int m = 16; m >= 1; m >>= 1) square += __shfl_xor_sync(0xffffffffu, square, m);
    __shared__ float warp_sums[WARPS];
    if (lane == 0) warp_sums[warp] = square;
    __syncthreads();
    if (tid == 0) {
      float block = 0.f;
#pragma unroll
      for (int i = 0; i < WARPS; ++i) block += warp_sums[i];
      sq[blockIdx.x] = block;
    }
  } else if (ok) {
    y[row] = f32_to_bf16(total);
  }
}

#if CLUSTER > 1
#define CLUSTER_DIMS __cluster_dims__(1, CLUSTER, 1)
#else
#define CLUSTER_DIMS
#endif
// y [N] (bf16) = x [K] (bf16) @ W.T for int4.py's format; grid (ceil(N / (32 WARPS)), split), WARPS warps a block.
// Dynamic shared memory: g_per * (256 + 256 + 8) bytes (x' in k order, B fragments, two sums per group).
extern "C" __global__ void __launch_bounds__(WARPS * 32) CLUSTER_DIMS
int4_mma_gemv(const u16* __restrict__ x, const uint4* __restrict__ qw, const u16* __restrict__ scales,
              const u16* __restrict__ offsets, u16* __restrict__ y, float* __restrict__ ws,
              int* __restrict__ counters, int N, int K, int G, int split, u32 magic, const u16* res,
              const u16* gamma, u16* h, float* sq, int n_sq, float eps, int epilogue) {
  extern __shared__ uint4 smem[];
#if PDL  // programmatic dependent launch (pdl.py): the next kernel may start now; this one waits below
  asm volatile("griddepcontrol.launch_dependents;");
#endif
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int r = lane >> 2, c = lane & 3;
  const int g_per = (G + split - 1) / split;
  const int g_lo = blockIdx.y * g_per;
  const int ng = max(min(g_lo + g_per, G) - g_lo, 0);
  const int nq = N >> 2;                                  // 16-byte columns (4 rows each)
  const int quad = (blockIdx.x * WARPS + warp) * 8 + r;
  const bool quad_ok = quad < nq;
#if TILED
  // The words re-laid as [N / 32][G][16][32] (tile_words): a warp's group is 2 KB in one piece and each of its
  // loads 512 contiguous bytes, against 4 pieces of 128 bytes N * 4 bytes apart in int4.py's layout.
  const int warp_tile = min(blockIdx.x * WARPS + warp, (N >> 5) - 1);
  const uint4* wp = qw + ((size_t)(warp_tile * G + g_lo) * 16 + c) * 8 + r;
  const size_t word_stride = 32, group_stride = 128;
#else
  const uint4* wp = qw + (size_t)(g_lo * 16 + c) * nq + (quad_ok ? quad : nq - 1);
  const size_t word_stride = (size_t)4 * nq;              // 4 word indices on: the lane's next word
  const size_t group_stride = (size_t)16 * nq;
#endif

  // The first STAGES groups' words in flight before x is staged (weights do not depend on x).
  uint4 buf[STAGES][4];
#pragma unroll
  for (int i = 0; i < STAGES; ++i)
    if (i < ng) {
#pragma unroll
      for (int s = 0; s < 4; ++s) buf[i][s] = __ldg(wp + i * group_stride + s * word_stride);
    }
#if PDL  // all that follows reads or writes what earlier kernels wrote (x, the epilogue's inputs, the workspace)
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif

  float inv_sigma;
  stage_x(x, K, g_lo, ng, g_per, smem, inv_sigma);
  const uint4* frags = smem + g_per * 16;                 // [ng * 16]: (group, word index 4s + c)
  const float2* sums = (const float2*)(smem + g_per * 32);  // [ng]: (1024 sum x', sum x)

  // The lane finishes row 4 quad + c: tile 0's C row r (c = 0) or r + 8 (c = 1), tile 1's likewise.
  const int row = (quad_ok ? quad : nq - 1) * 4 + c;
  const uint4* next = wp + STAGES * group_stride;         // the next group to load (running pointers: no
  const u16* sp = scales + (size_t)g_lo * N + row;        // 64-bit products in the loop)
  const u16* op = offsets + (size_t)g_lo * N + row;
  float acc = 0.f;
#pragma unroll 1
  for (int gi = 0; gi < ng; gi += STAGES) {
#pragma unroll
    for (int i = 0; i < STAGES; ++i) {
      const int gl = gi + i;
      if (gl < ng) {
        uint4 cur[4];
#pragma unroll
        for (int s = 0; s < 4; ++s) cur[s] = buf[i][s];
        if (gl + STAGES < ng) {
#pragma unroll
          for (int s = 0; s < 4; ++s) buf[i][s] = __ldg(next + s * word_stride);
        }
        next += group_stride;
        const float sc = bf16_to_f32(__ldg(sp)), of = bf16_to_f32(__ldg(op));
        sp += N;
        op += N;
        float t0[4] = {0.f, 0.f, 0.f, 0.f}, t1[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int s = 0; s < 4; ++s) word_step(t0, t1, cur[s], frags[gl * 16 + s * 4 + c], magic);
        const float dot = c == 0 ? t0[0] : c == 1 ? t0[2] : c == 2 ? t1[0] : t1[2];
        const float2 sm = sums[gl];
        acc += sc * (dot - sm.x) * inv_sigma + of * sm.y;
      }
    }
  }

  if (split == 1) {
    finish(acc, row, quad_ok, tid, lane, warp, y, res, gamma, h, sq, n_sq, K, eps, epilogue);
    return;
  }
#if CLUSTER > 1
  // Split K over the blocks of a thread-block cluster (sm_90): they meet in the first one's shared memory
  // (distributed shared memory) behind a cluster barrier, instead of global memory, a fence and an atomic.
  __shared__ float part[WARPS * 32];
  part[tid] = acc;
  asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;" ::: "memory");
  u32 rank;
  asm("mov.u32 %0, %%cluster_ctarank;" : "=r"(rank));
  if (rank == 0) {
    u32 local;
    asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(local) : "l"(part + tid));
    float total = acc;
    for (u32 peer = 1; peer < CLUSTER; ++peer) {
      u32 remote; float v;
      asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(local), "r"(peer));
      asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(v) : "r"(remote) : "memory");
      total += v;
    }
    finish(total, row, quad_ok, tid, lane, warp, y, res, gamma, h, sq, n_sq, K, eps, epilogue);
  }
  // no block may leave while the first still reads its shared memory
  asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;" ::: "memory");
  return;
#endif
  // Split K: partial sums meet in the workspace; the last block of this column of blocks adds them up.
  if (quad_ok) ws[(size_t)blockIdx.y * N + row] = acc;
  __threadfence();
  __syncthreads();
  __shared__ int last;
  if (tid == 0) last = atomicAdd(counters + blockIdx.x, 1) == split - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();
  float total = 0.f;
  for (int part = 0; part < split; ++part) total += __ldcg(ws + (size_t)part * N + row);
  finish(total, row, quad_ok, tid, lane, warp, y, res, gamma, h, sq, n_sq, K, eps, epilogue);
  if (tid == 0) counters[blockIdx.x] = 0;
}
"""

MAGIC = 0x64006400  # fp16 1024.0 in both halves (passed as an argument: see lop3 in SOURCE)
# Shared memory a block needs per group of its K range: x' (256 B), B fragments (256 B), two fp32 sums.
SMEM_PER_GROUP = 256 + 256 + 8


# The tiles the app may choose for a shape (gemv_tiles times them beside int4_triton's five): (warps a block,
# groups in flight a lane, split of K, split within a thread-block cluster). The best per shape on the H200
# (bench/int4_mma_gemv.py; bench/results/int4_mma_gemv_h200_s33.txt): global splits of 16 and 32 for the deep
# and the square matrices, cluster splits of 2-8 for the wide ones.
TILES = [(4, 2, 16, False), (4, 3, 16, False), (4, 3, 32, False), (4, 2, 2, True), (4, 2, 4, True), (2, 2, 8, True)]


def available(device: torch.device) -> bool:
    """CUDA with mma.sync m16n8k16 (compute capability 8.0+)."""
    return device.type == "cuda" and torch.version.cuda is not None and torch.cuda.get_device_capability(device) >= (8, 0)


ENV = "SMALLCHAT_MMA_GEMV"  # "0": the tile chooser offers only Triton's tiles (an A/B of this kernel)


def offered(device: torch.device) -> bool:
    """Whether the tile chooser offers this kernel's tiles on `device`: it runs there and ENV does not turn it off."""
    return os.environ.get(ENV, "1") != "0" and available(device)


def tile_fits(tile: tuple[int, int, int, bool], out_features: int, device: torch.device) -> bool:
    """`tile` runs here for N = out_features: 4 | N, mma.sync, a cluster only on sm_90+, a split that fits the
    workspace (split_k.split_fits)."""
    from .split_k import split_fits

    warps, stages, split, cluster = tile
    return (out_features % 4 == 0 and offered(device) and split_fits(split, out_features)
            and (not cluster or torch.cuda.get_device_capability(device) >= (9, 0)))


def config(tile: tuple[int, int, int, bool]) -> dict:
    """A tile as int4_triton.launch's `config`: MMA, and the rows a block finishes (BLOCK_N) and SPLIT, which the
    folded norms' sums count and the workspace check read."""
    warps, stages, split, cluster = tile
    return {"MMA": tile, "BLOCK_N": 32 * warps, "SPLIT": split}


def source_for(warps: int, stages: int, cluster: int, tiled: bool = False, dependent: bool = False) -> str:
    """SOURCE for (warps a block, groups in flight a lane, blocks of a cluster splitting K; `tiled`: words as
    tile_words lays them; `dependent`: launched early, its first weights loaded before its griddepcontrol.wait)."""
    return (f"#define WARPS {warps}\n#define STAGES {stages}\n#define CLUSTER {cluster}\n#define TILED {int(tiled)}\n"
            f"#define PDL {int(dependent)}\n{SOURCE}")


@functools.lru_cache(maxsize=None)
def _kernel(warps: int, stages: int, cluster: int, device: torch.device, tiled: bool, dependent: bool) -> nvrtc.Kernel:
    """source_for's kernel compiled for this GPU's architecture (or read from the cubin cache) and loaded."""
    return nvrtc.load_kernel(source_for(warps, stages, cluster, tiled, dependent), "int4_mma_gemv", device,
                             ("-std=c++17",))


def launch(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, in_features: int,
           y: torch.Tensor, workspace: tuple[torch.Tensor, torch.Tensor], tile: tuple[int, int, int, bool],
           epilogue_args: tuple = (), epilogue: int = 0, tiled: bool = False) -> None:
    """Run the GEMV of x [1, K] (bf16) into y with `tile` and int4_epilogue's `epilogue` and its arguments
    (residual, gamma, h, sums of squares, their count, eps), as int4_triton.launch does. `tiled`: qweight is
    tile_words' layout (a bench probe: the app keeps int4.py's)."""
    warps, stages, split, cluster = tile
    groups, n = scales.shape
    if n % 4 or x.dtype != torch.bfloat16:
        raise ValueError(f"int4_mma needs N % 4 == 0 and bf16 activations (N {n}, {x.dtype})")
    if cluster and not 2 <= split <= 8:
        raise ValueError(f"a cluster holds 2 to 8 blocks, not split {split}")
    partials, counters = workspace
    blocks = -(-n // (32 * warps))
    if split > 1 and not cluster and (partials.numel() < split * n or counters.numel() < blocks):
        raise ValueError(f"the workspace holds {partials.numel()} partials; split {split} x N {n} needs more")
    res, gamma, h, sums, n_sums, eps = epilogue_args or (y, y, y, partials, 0, 0.0)
    device = nvrtc.device_of(x)
    if tiled and n % 32:
        raise ValueError(f"tiled words need N % 32 == 0 (N {n})")
    if any(t.stride() != (n, 1) for t in ((scales, offsets) if tiled else (qweight, scales, offsets))):
        raise ValueError("int4_mma reads the packed tensors as contiguous [rows, N]")
    dependent = pdl.level(device) > pdl.OFF
    kernel = _kernel(warps, stages, split if cluster else 1, device, tiled, dependent)
    kernel((blocks, split, 1), (32 * warps, 1, 1),
           [x.contiguous(), qweight, scales, offsets, y, partials, counters, n, in_features, groups, split, MAGIC,
            res, gamma, h, sums, n_sums, float(eps), epilogue], -(-groups // split) * SMEM_PER_GROUP, dependent)


def tile_words(qweight: torch.Tensor) -> torch.Tensor:
    """int4.py's words [Kp/8, N] re-laid as [N/32, G, 16, 32] (N % 32 == 0): each warp's group of words in one
    2 KB piece. A bench probe (bench/int4_mma_gemv.py): does the DRAM read faster in whole pieces?"""
    rows, n = qweight.shape
    return qweight.view(rows // 16, 16, n // 32, 32).permute(2, 0, 1, 3).contiguous()


def gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, in_features: int,
         workspace: tuple[torch.Tensor, torch.Tensor], warps: int = 4, stages: int = 2, split: int = 1,
         out: torch.Tensor | None = None, cluster: bool = False, tiled: bool = False) -> torch.Tensor:
    """y [1, N] = x [1, K] @ W.T (bf16) on the tensor cores; N must be a multiple of 4.

    `workspace` is int4.new_workspace's (partials, counters) pair: split * N partials, and a counter a block column.
    `cluster` (sm_90, split 2-8): the split-K blocks of a row range form a thread-block cluster and add their
    partial sums in shared memory (the workspace is not used). `tiled`: qweight is tile_words(...)'s."""
    y = out if out is not None else torch.empty(1, scales.shape[1], dtype=x.dtype, device=x.device)
    launch(x, qweight, scales, offsets, in_features, y, workspace, (warps, stages, split, cluster), tiled=tiled)
    return y
