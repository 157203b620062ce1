"""Probe: the int4 GEMV on tensor cores (wgmma / mma with x padded to 16 columns) against today's GEMV.

Why: the large decode GEMVs are issue-bound (BENCHMARKS.md, sessions 17-21: SMs ~50 % busy at ~50 %
of the copy rate, ~4 SASS instructions per weight). Here the weights are the A operand of a
[BLOCK_N, 32] x [32, 16] bf16 dot with fp32 accumulation. One AND and one OR make two weights at
once: nibbles p and p + 4 of a word sit at bits 4p and 16 + 4p, so (w >> 4p) & 0x000F000F |
0x43004300 is a bf16 pair (128 + q, 128 + q'), exact, already packed as the dot operand wants it
when its K order pairs plane p with plane p + 4 (x is gathered in that order). The 128 is taken out
with the group's offset: sum_k (q s + o) x = s * dot - (128 s - o) * sum_k x. Multiply-adds then
run on the tensor cores: ~2.4-2.7 SASS instructions per weight on sm_90 (bench/int4_sass.py), 3.9-4.0
for today's tile. Column 0 of the dot is the answer; the others multiply zeros.

    python bench/int4_mma_probe.py [OUT.json]     (CUDA; times both kernels in CUDA graphs)
"""
from __future__ import annotations

import itertools
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

MAGIC = 0x43004300  # bf16 128.0 in both halves: OR a nibble into bits 0-3 of each half for 128 + q


@triton.jit
def mma_gemv_kernel(x_ptr, w_ptr, s_ptr, o_ptr, y_ptr, ws_ptr, lock_ptr, N, K, G_COUNT, stride_w, stride_s, one_bits,
                    BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, EVEN: tl.constexpr = True,
                    PREFETCH: tl.constexpr = False, LOOP_STAGES: tl.constexpr = 1, DOT_F32: tl.constexpr = False):
    """y = x @ W.T for N % BLOCK_N == 0 and K % 128 == 0, W as the A operand of a tensor-core dot."""
    pid_n = tl.program_id(0)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rw = tl.arange(0, 16)
    kap = tl.arange(0, 32)
    col = tl.arange(0, 16)
    g_per = tl.cdiv(G_COUNT, SPLIT)
    g_lo = tl.program_id(1) * g_per
    g_hi = tl.minimum(g_lo + g_per, G_COUNT)
    acc = tl.zeros([BLOCK_N, 16], dtype=tl.float32)
    for g in tl.range(g_lo, g_hi, num_stages=LOOP_STAGES):
        words = tl.load(w_ptr + (g * 16 + rw)[None, :] * stride_w + rn[:, None])  # [BLOCK_N, 16]
        dot = tl.zeros([BLOCK_N, 16], dtype=tl.float32)
        sx = 0.0
        for p in tl.static_range(4):
            # Constants, not a register argument: with a run-time operand Triton no longer moves the
            # layout change onto the int32 words (it then shuffles the bf16 pairs through shared memory).
            pair = ((words >> (4 * p)) & 0x000F000F) | 0x43004300
            lo = pair.to(tl.int16).to(tl.bfloat16, bitcast=True)
            hi = (pair >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)
            a = tl.reshape(tl.join(lo, hi), [BLOCK_N, 32])  # column 2w + h: nibble p + 4h of word w
            xk = g * 128 + (p + 4 * (kap % 2)) * 16 + kap // 2
            xv = tl.load(x_ptr + xk)
            sx += tl.sum(xv.to(tl.float32), axis=0)
            xb = tl.where(col[None, :] == 0, xv[:, None], 0.0).to(tl.bfloat16)
            if DOT_F32:  # Triton's interpreter multiplies bitcast bf16 operands as raw bits: give it float32
                dot = tl.dot(a.to(tl.float32), xb.to(tl.float32), dot)
            else:
                dot = tl.dot(a, xb, dot)
        s = tl.load(s_ptr + g * stride_s + rn).to(tl.float32)
        o = tl.load(o_ptr + g * stride_s + rn).to(tl.float32)
        acc += dot * s[:, None] + ((o - 128.0 * s) * sx)[:, None]
    partial = tl.sum(tl.where(col[None, :] == 0, acc, 0.0), axis=1)
    if SPLIT == 1:
        tl.store(y_ptr + rn, partial.to(y_ptr.dtype.element_ty))
    else:  # the same last-program split-K reduction as int4_triton._gemv_body
        tl.store(ws_ptr + tl.program_id(1) * N + rn, partial)
        tl.debug_barrier()
        count = tl.atomic_add(lock_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        if count == SPLIT - 1:
            total = tl.zeros([BLOCK_N], dtype=tl.float32)
            for part_no in tl.static_range(SPLIT):
                total += tl.load(ws_ptr + part_no * N + rn, cache_modifier=".cg")
            tl.store(y_ptr + rn, total.to(y_ptr.dtype.element_ty))
            tl.atomic_xchg(lock_ptr + pid_n, 0)


def mma_gemv(x, qweight, scales, offsets, in_features, workspace, config, interpret=False):
    """y [1, N] through mma_gemv_kernel with one tile config (BLOCK_N, SPLIT, num_warps, LOOP_STAGES)."""
    groups, n = scales.shape
    y = torch.empty(1, n, dtype=x.dtype, device=x.device)
    grid = (n // config["BLOCK_N"], config["SPLIT"])
    mma_gemv_kernel[grid](x, qweight, scales, offsets, y, workspace[0], workspace[1], n, in_features, groups,
                          qweight.stride(0), scales.stride(0), 0, DOT_F32=interpret, **config)
    return y


SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (92544, 4096), (16384, 2048)]
GRID = [dict(BLOCK_N=bn, SPLIT=sp, num_warps=w, LOOP_STAGES=st)
        for bn, w in [(128, 4), (256, 4), (256, 8), (512, 4), (512, 8)] for sp in (8, 16, 32) for st in (1, 3)]


def graph_us(fn, copies: int) -> float:
    """Microseconds per call of fn(i) over `copies` rotated weights, replayed as one CUDA graph."""
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for i in range(2):
            fn(i)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(copies):
            fn(i)
    g.replay()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(5):
        g.replay()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) * 1000 / (5 * copies)


def main() -> None:
    from bench.decode_speed import copy_bandwidth
    from models.kernels import int4, int4_triton as kt

    rate = copy_bandwidth(nbytes=1 << 30, reps=10)
    print(f"# {torch.cuda.get_device_name()} copy {rate:.0f} GB/s, triton {triton.__version__}", flush=True)
    rows = []
    t0 = time.time()
    for n, k in SHAPES:
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        q, s, o = int4.quantize(w)
        nbytes = int4.packed_bytes(n, k)
        copies = max(2, math.ceil((400 << 20) / nbytes))
        qs = [q.clone() for _ in range(copies)]
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        ref = x.float() @ int4.dequantize_reference(q, s, o, k, torch.float32).T
        ws = (torch.empty(64 * n, dtype=torch.float32, device="cuda"), torch.zeros(n, dtype=torch.int32, device="cuda"))
        app_ws = int4.new_workspace(n, x.device)
        kt.gemv(x, q, s, o, k, app_ws)  # tunes
        torch.cuda.synchronize()
        pick = kt._gemv_kernel.best_config
        ours = graph_us(lambda i: kt.gemv(x, qs[i % copies], s, o, k, app_ws), copies)
        row = {"n": n, "k": k, "kernel": "app (tuned)", "config": str(pick), "us": round(ours, 2),
               "of_copy": round(nbytes / ours / 1e3 / rate, 3)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        best = None
        for cfg in GRID:
            if n % cfg["BLOCK_N"]:
                continue
            try:
                y = mma_gemv(x, q, s, o, k, ws, cfg)
                err = ((y.float() - ref).abs().max() / ref.abs().max()).item()
                us = graph_us(lambda i: mma_gemv(x, qs[i % copies], s, o, k, ws, cfg), copies)
            except Exception as e:  # noqa: BLE001 - a config that does not compile is reported, the probe goes on
                print(json.dumps({"n": n, "k": k, "config": cfg, "error": str(e)[:200]}), flush=True)
                continue
            row = {"n": n, "k": k, "kernel": "mma", "config": cfg, "us": round(us, 2), "err": round(err, 4),
                   "of_copy": round(nbytes / us / 1e3 / rate, 3)}
            rows.append(row)
            if best is None or us < best["us"]:
                best = row
        print(json.dumps({**best, "best": True}), f"elapsed {time.time() - t0:.0f} s", flush=True)
        del qs
        torch.cuda.empty_cache()
    if len(sys.argv) > 1:
        Path(sys.argv[1]).write_text(json.dumps(rows))


if __name__ == "__main__":
    main()
