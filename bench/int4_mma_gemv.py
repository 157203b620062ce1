"""The tensor-core GEMV (models/kernels/int4_mma.py) against the app's Triton GEMV, on every linear shape of a step.

    python bench/int4_mma_gemv.py [OUT.json] [7b|app]

Per shape, in one process on one GPU: the device copy rate (the roofline), each of the app's five Triton
tiles and every (warps, groups in flight, split) of the mma kernel, each checked against the plain
dequantize-then-matmul reference and timed back to back in a CUDA graph over copies of the weights that
together pass the L2 (every call reads DRAM, as decode does). Prints a table: µs and fraction of the copy
rate of the app's best tile and of the mma kernel's best, and their ratio."""
import json
import math
import sys
import time

import torch

sys.path.insert(0, ".")
from bench.decode_speed import copy_bandwidth  # noqa: E402
from bench.int4_mma_probe import graph_us  # noqa: E402  (µs per call, replayed as one CUDA graph)
from models.kernels import int4, int4_mma, int4_triton as kt  # noqa: E402

# Every linear of one decode step as the app loads them (fused q/k/v, o, fused gate/up, down): the 7B, the
# 1.8B, then Qwen2.5-7B (bench/int4_gemv_sweep.py's APP).
APP = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (4096, 2048), (2048, 2048), (16384, 2048),
       (2048, 8192), (4608, 3584), (3584, 3584), (37888, 3584), (3584, 18944)]


def main() -> None:
    out_path = sys.argv[1] if len(sys.argv) > 1 else "/dev/null"
    shapes = APP[:4] if "7b" in sys.argv[2:] else APP
    dev = torch.device("cuda")
    rate = copy_bandwidth(nbytes=1 << 30, reps=10)
    print(f"# {torch.cuda.get_device_name()}: copy {rate:.0f} GB/s; torch {torch.__version__}", flush=True)
    t0 = time.time()
    # (warps, groups in flight a lane, split, cluster, tiled words)
    variants = [(w, st, sp, False, False) for w in (2, 4, 8) for st in (2, 3) for sp in (1, 2, 4, 8, 16, 32, 64)]
    if torch.cuda.get_device_capability() >= (9, 0):  # split K within a thread-block cluster
        variants += [(w, st, sp, True, False) for w in (2, 4, 8) for st in (2, 3) for sp in (2, 4, 8)]
    # Two questions of session 33's result (gate/up stopped at 64 % of the H200's copy rate): do more bytes in
    # flight help (4 groups a lane: 126 registers, no spills), and does the DRAM read faster when a warp's
    # words are one 2 KB piece (int4_mma.tile_words) instead of 4 pieces of 128 bytes N * 4 bytes apart?
    variants += [(4, 4, sp, False, False) for sp in (1, 2, 4, 8, 16)]
    variants += [(4, st, sp, False, True) for st in (2, 3, 4) for sp in (1, 2, 4, 8, 16, 32)]
    if torch.cuda.get_device_capability() >= (9, 0):
        variants += [(w, 2, sp, True, True) for w in (2, 4) for sp in (2, 4, 8)]
    rows = []
    print("| N x K | MB | app best tile µs (of copy) | mma best µs (of copy) | mma config | app / mma |")
    print("|---|---|---|---|---|---|")
    for n, k in shapes:
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
        q, s, o = int4.quantize(w)
        del w
        nbytes = q.numel() * 4 + 2 * s.numel() * 2
        copies = max(2, math.ceil((400 << 20) / nbytes))
        qs = [q.clone() for _ in range(copies)]
        tiled_qs = [int4_mma.tile_words(qq) for qq in qs] if n % 32 == 0 else []
        x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
        ref = x.float() @ int4.dequantize_reference(q, s, o, k, torch.float32).T
        ws = torch.empty(64 * n, dtype=torch.float32, device=dev)
        counters = torch.zeros(n, dtype=torch.int32, device=dev)
        shape_rows = []
        for index in range(len(kt._GEMV_CONFIGS)):
            config = kt.tile_config(index)
            try:
                us = graph_us(lambda i: kt.gemv(x, qs[i], s, o, k, (ws.view(64, n), counters), config), copies)
            except Exception as error:  # a tile whose split the workspace cannot take: not the app's either
                print("  triton tile", config, "failed:", str(error)[:100], flush=True)
                continue
            shape_rows.append({"n": n, "k": k, "kernel": "triton", "config": config, "us": round(us, 2)})
        checked = kt.gemv(x, q, s, o, k, (ws.view(64, n), counters), kt.tile_config(1)).float()
        triton_err = ((checked - ref).abs().max() / ref.abs().max()).item()
        if triton_err > 1e-2:
            print(f"  {n}x{k}: the fp32 reference is {triton_err:.4f} off Triton's tile: checking against the tile",
                  flush=True)
        for warps, stages, split, cluster, tiled in variants:
            if (split > 1 and -(-k // 128) < split) or (tiled and not tiled_qs):
                continue
            words = tiled_qs if tiled else qs
            y = torch.empty(1, n, dtype=torch.bfloat16, device=dev)
            try:
                got = int4_mma.gemv(x, words[0], s, o, k, (ws, counters), warps, stages, split, cluster=cluster,
                                    tiled=tiled)
                err = ((got.float() - ref).abs().max() / ref.abs().max()).item()
                against_triton = ((got.float() - checked).abs().max() / checked.abs().max()).item()
                # Session 33 saw the fp32 reference off for Triton's tile too on two shapes (cause not found):
                # there the check is against Triton's tile, which the GPU tests hold to the reference.
                if err > 1e-2 and not (triton_err > 1e-2 and against_triton < 1e-2):
                    print(f"  BAD mma {n}x{k} {warps, stages, split, cluster, tiled}: rel err {err:.4f} (the Triton "
                          f"tile's {triton_err:.4f}; mma against Triton {against_triton:.4f})", flush=True)
                    continue
                us = graph_us(lambda i: int4_mma.gemv(x, words[i], s, o, k, (ws, counters), warps, stages, split, y,
                                                      cluster, tiled), copies)
            except Exception as error:
                print(f"  mma {n}x{k} {warps, stages, split, cluster, tiled} failed: {str(error)[:160]}", flush=True)
                continue
            shape_rows.append({"n": n, "k": k, "kernel": "mma", "config": {"warps": warps, "stages": stages,
                               "split": split, "cluster": cluster, "tiled": tiled}, "us": round(us, 2),
                               "rel_err": err})
        for row in shape_rows:
            row["of_copy"] = round(nbytes / (row["us"] * 1e-6) / 1e9 / rate, 3)
        rows += shape_rows
        app = min((r for r in shape_rows if r["kernel"] == "triton"), key=lambda r: r["us"], default=None)
        mma = min((r for r in shape_rows if r["kernel"] == "mma"), key=lambda r: r["us"], default=None)
        for label, keep in (("without a cluster", lambda c: not c["cluster"]),
                            ("in int4.py's layout", lambda c: not c["tiled"]), ("tiled", lambda c: c["tiled"]),
                            ("4 groups in flight", lambda c: c["stages"] == 4)):
            best = min((r for r in shape_rows if r["kernel"] == "mma" and keep(r["config"])), key=lambda r: r["us"],
                       default=None)
            if best:
                print(f"  (best {label}: {best['us']} µs, {best['of_copy']:.0%} of copy, {best['config']})")
        if app and mma:
            print(f"| {n} x {k} | {nbytes / 1e6:.1f} | {app['us']} ({app['of_copy']:.0%}) | {mma['us']} "
                  f"({mma['of_copy']:.0%}) | {mma['config']} | {app['us'] / mma['us']:.2f}x |", flush=True)
        qs.clear()
        tiled_qs.clear()
        torch.cuda.empty_cache()
    print(f"# {time.time() - t0:.0f} s", flush=True)
    json.dump({"gpu": torch.cuda.get_device_name(), "copy_gbps": rate, "rows": rows}, open(out_path, "w"), indent=1)


if __name__ == "__main__":
    main()
