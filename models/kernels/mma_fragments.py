"""CUDA C++ pieces of the int4 kernels on the tensor cores (mma.sync m16n8k16), shared by int4_mma.py's GEMV and
bench/qkv_attention_kernel.py's fused q/k/v projection (a probe): conversions, the nibbles-to-fp16 LOP3
(int4_mma.py's docstring has the numbers), the mma, one word index's step over a lane's 4 rows, and x staged in
shared memory as the B fragments.
Sources that include FRAGMENTS define WARPS (a block's warps) first.
"""

FRAGMENTS = r"""
typedef unsigned int u32;
typedef unsigned short u16;

__device__ __forceinline__ float bf16_to_f32(u16 v) { return __uint_as_float(((u32)v) << 16); }
__device__ __forceinline__ u16 f32_to_f16(float v) { u16 h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v)); return h; }
__device__ __forceinline__ float f16_to_f32(u16 h) { float v; asm("cvt.f32.f16 %0, %1;" : "=f"(v) : "h"(h)); return v; }
__device__ __forceinline__ u16 f32_to_bf16(float v) { u16 h; asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(v)); return h; }

// (w & mask) | magic in one LOP3. magic (fp16 1024.0 in both halves) is a kernel argument, so that it sits in a
// register: with both as constants ptxas spends an AND and an OR (one immediate an instruction).
__device__ __forceinline__ u32 lop3(u32 w, u32 mask, u32 magic) {
  u32 d; asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(w), "r"(mask), "r"(magic)); return d;
}
// (1024 + q, 1024 + q') for the nibbles at bits 0-3 and 16-19; (1024 + 16 q, 1024 + 16 q') for bits 4-7 and 20-23.
#define LO(w) lop3((w), 0x000F000Fu, magic)
#define HI(w) lop3((w), 0x00F000F0u, magic)

__device__ __forceinline__ void mma(float* d, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// One word index of a group for the lane's 4 rows: words w[0..3] (rows 4r .. 4r+3), B pairs xf.
// Tile 0 takes rows 4r (as mma row r) and 4r + 1 (as row r + 8); tile 1 rows 4r + 2, 4r + 3.
__device__ __forceinline__ void word_step(float* t0, float* t1, uint4 w, uint4 xf, u32 magic) {
  u32 w0s = w.x >> 8, w1s = w.y >> 8, w2s = w.z >> 8, w3s = w.w >> 8;
  mma(t0, LO(w.x), LO(w.y), HI(w.x), HI(w.y), xf.x, xf.y);
  mma(t0, LO(w0s), LO(w1s), HI(w0s), HI(w1s), xf.z, xf.w);
  mma(t1, LO(w.z), LO(w.w), HI(w.z), HI(w.w), xf.x, xf.y);
  mma(t1, LO(w2s), LO(w3s), HI(w2s), HI(w3s), xf.z, xf.w);
}

// x [K] (bf16), groups [g_lo, g_lo + ng) of 128, staged in smem for word_step: x' in fp16 in k order at smem[0],
// the B fragments at smem + g_per * 16 (group, word index), the sums (1024 sum x', sum x) a group at smem + g_per * 32;
// inv_sigma receives 1 / sigma. Every thread of the block (WARPS warps) calls it; it ends with a barrier.
__device__ __forceinline__ void stage_x(const u16* x, int K, int g_lo, int ng, int g_per, uint4* smem, float& inv_sigma) {
  // x's scale in fp16 (sigma, a power of two): the block's largest |x| times sigma near 2**15, so that x' = x sigma
  // (x sigma / 16 at odd nibble positions) keeps all of a bf16's bits down to 2**-24 of that largest value.
  __shared__ float warp_max[WARPS];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int pieces = ng * 16;
  float largest = 0.f;
  for (int p = tid; p < pieces; p += WARPS * 32) {
    const int k0 = g_lo * 128 + p * 8;
#pragma unroll
    for (int e = 0; e < 8; ++e) largest = fmaxf(largest, k0 + e < K ? fabsf(bf16_to_f32(x[k0 + e])) : 0.f);
  }
#pragma unroll
  for (int m = 16; m >= 1; m >>= 1) largest = fmaxf(largest, __shfl_xor_sync(0xffffffffu, largest, m));
  if (lane == 0) warp_max[warp] = largest;
  __syncthreads();
#pragma unroll
  for (int i = 0; i < WARPS; ++i) largest = fmaxf(largest, warp_max[i]);
  const float sigma = largest > 0.f ? exp2f(floorf(log2f(32768.f / largest))) : 1.f;
  inv_sigma = 1.f / sigma;

  // Stage x: x' in fp16 in k order (a 16-byte piece = 8 k of one nibble position j), then the B fragments.
  u16* xs = (u16*)smem;                                   // [ng * 128]
  uint4* frags = smem + g_per * 16;                       // [ng * 16]: (group, word index 4s + c)
  float2* sums = (float2*)(smem + g_per * 32);            // [ng]: (1024 sum x', sum x)
  for (int p0 = 0; p0 < pieces; p0 += WARPS * 32) {       // whole warps: the shuffles below need them
    const int p = p0 + tid;
    float add1024 = 0.f, add_x = 0.f;
    if (p < pieces) {
      const int k0 = g_lo * 128 + p * 8;
      const int j = (p >> 1) & 7;                         // nibble position of these k (16 k per j)
      const float sc = (j & 1) ? sigma * (1.f / 16.f) : sigma;
      u32 packed[4];
#pragma unroll
      for (int e = 0; e < 8; e += 2) {
        float v0 = k0 + e < K ? bf16_to_f32(x[k0 + e]) : 0.f;
        float v1 = k0 + e + 1 < K ? bf16_to_f32(x[k0 + e + 1]) : 0.f;
        u16 h0 = f32_to_f16(v0 * sc), h1 = f32_to_f16(v1 * sc);
        float f0 = f16_to_f32(h0), f1 = f16_to_f32(h1);
        add1024 += f0 + f1;                               // what the 1024s of the mma's A add, / 1024
        add_x += (f0 + f1) * ((j & 1) ? 16.f : 1.f);      // x sigma, for the offset's sum
        packed[e >> 1] = (u32)h0 | ((u32)h1 << 16);
      }
      ((uint4*)xs)[p] = make_uint4(packed[0], packed[1], packed[2], packed[3]);
    }
#pragma unroll
    for (int m = 8; m >= 1; m >>= 1) {                    // a group's 16 pieces are 16 adjacent threads
      add1024 += __shfl_xor_sync(0xffffffffu, add1024, m);
      add_x += __shfl_xor_sync(0xffffffffu, add_x, m);
    }
    if (p < pieces && (p & 15) == 0) sums[p >> 4] = make_float2(1024.f * add1024, add_x * inv_sigma);
  }
  __syncthreads();
  for (int f = tid; f < pieces; f += WARPS * 32) {        // fragment (group gl, word i): x' at k = 16 j + i
    const int gl = f >> 4, i = f & 15;
    const u16* xg = xs + gl * 128 + i;
    frags[f] = make_uint4((u32)xg[0] | ((u32)xg[64] << 16), (u32)xg[16] | ((u32)xg[80] << 16),
                          (u32)xg[32] | ((u32)xg[96] << 16), (u32)xg[48] | ((u32)xg[112] << 16));
  }
  __syncthreads();

}
"""
