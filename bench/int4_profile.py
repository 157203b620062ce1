"""Where the int4 GEMV's time goes, per weight shape: time alone vs the bandwidth, and (under ncu) why.

For each (K, N) of a 7B decode step: 8 distinct weights (more than the L2 holds) are multiplied in
turn; the time per call is compared with its bytes over the copy rate. With --ncu-region, one call
per shape runs between cudaProfilerStart/Stop, for `ncu --profile-from-start off` to read its
hardware counters (throughput, occupancy, stall reasons).

    python bench/int4_profile.py [--configs 256,16,4 512,32,2,0]
    ncu --clock-control none --profile-from-start off --section SpeedOfLight --section Occupancy \\
        --section WarpStateStats python bench/int4_profile.py --ncu-region

--configs profiles fixed tiles (BLOCK_N,SPLIT,warps[,PREFETCH 0/1[,LOOP_STAGES[,HALF2 0/1]]]) after the tuned one, so
that ncu shows side by side why one tile reads faster than another (bench/device_run.sh profile).
--best-from SWEEP.json adds, per shape, the fastest tile of a bench/int4_gemv_sweep.py run.
--mma profiles tiles of the tensor-core GEMV (models/kernels/int4_mma.py) as well: warps,stages,split,cluster 0/1
(bench/device_run.sh mma-profile).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

# (K, N) of the 7B's linears as the app loads them (q/k/v and gate/up fused), and its lm_head.
SHAPES = [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096), (4096, 92544)]
COPIES = 8


def sweep_best(path: Path) -> dict:
    """The fastest tile per (N, K) in a bench/int4_gemv_sweep.py JSON, as a launch config."""
    keys = ("BLOCK_N", "SPLIT", "num_warps", "num_stages", "PREFETCH", "LOOP_STAGES")
    best: dict = {}
    for row in json.loads(path.read_text()):
        if "tuned_pick" in row:
            continue
        shape = (row["n"], row["k"])
        if shape not in best or row["us"] < best[shape][1]:
            config = {key: row[key] for key in keys}
            config.update({"HALF2": True} if row.get("HALF2") else {})
            best[shape] = (config, row["us"])
    return {shape: config for shape, (config, _) in best.items()}


def main() -> None:
    from bench.int4_kernels import copy_rate
    from models.kernels import int4, int4_triton
    from models.kernels.split_k import split_fits

    p = argparse.ArgumentParser()
    p.add_argument("--ncu-region", action="store_true")
    p.add_argument("--configs", nargs="*", default=[], help="fixed tiles to run after the tuned one")
    p.add_argument("--best-from", type=Path, help="a sweep's JSON: its fastest tile per shape is profiled too")
    p.add_argument("--mma", nargs="*", default=[], help="tensor-core GEMV tiles: warps,stages,split,cluster")
    a = p.parse_args()
    from models.kernels import int4_mma

    fixed = [int4_mma.config((w, st, sp, bool(cl))) for w, st, sp, cl in (map(int, t.split(",")) for t in a.mma)]
    for text in a.configs:
        block_n, split, warps, *rest = (int(v) for v in text.split(","))
        fixed.append(dict(BLOCK_N=block_n, SPLIT=split, num_warps=warps, num_stages=1,
                          PREFETCH=bool(rest[0]) if rest else True, LOOP_STAGES=rest[1] if len(rest) > 1 else 1))
        if len(rest) > 2 and rest[2]:
            fixed[-1]["HALF2"] = True
    best = sweep_best(a.best_from) if a.best_from and a.best_from.exists() else {}
    rate = copy_rate()
    print(json.dumps({"gpu": torch.cuda.get_device_name(), "copy_gbps": round(rate, 1)}), flush=True)
    for k, n in SHAPES:
        packs = [int4.quantize(torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02) for _ in range(COPIES)]
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        ws = int4.new_workspace(n, x.device)
        int4_triton.gemv(x, *packs[0], k, ws)  # tunes this (N, K)
        torch.cuda.synchronize()
        tuned = getattr(int4_triton._gemv_kernel, "best_config", None)
        extra = [best[(n, k)]] if (n, k) in best and best[(n, k)] not in fixed else []
        for config in [None] + [c for c in fixed + extra if split_fits(c["SPLIT"], n)]:
            int4_triton.gemv(x, *packs[0], k, ws, config)  # compiled outside the profiled region
            torch.cuda.synchronize()
            if a.ncu_region:
                torch.cuda.cudart().cudaProfilerStart()
                int4_triton.gemv(x, *packs[1], k, ws, config)
                torch.cuda.synchronize()
                torch.cuda.cudart().cudaProfilerStop()
                print(json.dumps({"K": k, "N": n, "profiled": str(config or tuned)}), flush=True)
                continue
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            reps = 20
            s.record()
            for _ in range(reps):
                for pack in packs:
                    int4_triton.gemv(x, *pack, k, ws, config)
            e.record()
            e.synchronize()
            us = s.elapsed_time(e) * 1e3 / reps / COPIES
            nbytes = int4.packed_bytes(n, k)
            print(json.dumps({"K": k, "N": n, "us": round(us, 2), "floor_us": round(nbytes / rate / 1e3, 2),
                              "of_copy": round(nbytes / (us * 1e3) / rate, 3), "config": str(config or tuned)}),
                  flush=True)


if __name__ == "__main__":
    main()
