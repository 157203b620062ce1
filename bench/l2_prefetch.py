"""Do a layer's GEMVs run faster when a second stream asks the L2 for their weights ahead of them? No: on an H100
every budget and way of asking below was slower (bench/results/l2_prefetch_h100_s35.txt; BENCHMARKS.md, session 35).

Session 34's profile put most of what the decode step loses to the roofline in the GEMVs' fixed cost: each of a
layer's five dependent kernels (q/k/v GEMV, attention, o, gate/up, down) drains, launches and then waits a DRAM
latency for its first weights, and the small ones (the 1.8B's q/k/v and o: 6.7 MB, 11.5 µs a layer) run at 14-24 %
of the copy rate. Meanwhile the DRAM idles: during the attention (~7-9 µs a layer, 2.5 MB) and in every kernel's
ramp and tail. Here a second stream in the same CUDA graph asks the L2 (50 MB on the H100 and H200) for the weights
of the kernels ahead, up to `budget` bytes past the end of the kernel running, so that those kernels find them in
the L2 (bench/l2_ahead.py, as the app's step would). Ways of asking: `cp.async.bulk.prefetch.L2` (Hopper's
bulk copy engine, one instruction for 16 KB) with or without the plan's capacity rule, at the L2's evict-last
priority (no capacity rule: what survives a 7B's 59 MB gate/up), and plain loads
with a 256-byte L2 fetch (`ld.global.L2::256B`, what Ampere and Ada would run). The chain is
bench/pdl_chain.py's (its tiles chosen among Triton's and int4_mma's, timed alone), 8 layers of random weights, one
CUDA graph; every variant's output is checked bit for bit against the chain without prefetch.

    python bench/l2_prefetch.py [--shapes 1.8b 7b] [--budgets-mb 4 8 16 24 32 48] [--out rows.jsonl]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import l2_ahead  # noqa: E402
from bench.pdl_chain import chain_step, layer_bytes, run_and_time, tiles_alone  # noqa: E402
from bench.persistent_layer import SHAPES, make_problem  # noqa: E402

# (bulk, evict_last, capped: a kernel asks for at most 3/4 of the L2 less its own weights, l2_ahead.plan);
# evict-last last: lines it leaves at that priority could hold the L2 for a mode after it
MODES = {"bulk": (True, False, True), "bulk-uncapped": (True, False, False), "load256": (False, False, True),
         "bulk-evict-last": (True, True, False)}


def chain_weights(problem: dict) -> list[list[torch.Tensor]]:
    """Per GEMV of the chain, in order (q/k/v, o, gate/up, down a layer), the tensors it reads as l2_ahead.L2Ahead
    takes them: scales, offsets, words. The attention is not among them, as in the app's cycle."""
    return [[s[layer], o[layer], w[layer]] for layer in range(problem["layers"]) for w, s, o, _k, _n in problem["chain"]]


def prefetching_step(problem: dict, keys: torch.Tensor, values: torch.Tensor, tiles: list[int], ahead=None):
    """bench/pdl_chain.py's chain of the layers' kernels; with `ahead` (an l2_ahead.L2Ahead over chain_weights), each
    GEMV first forks the side stream and asks the L2 for the weights after it. The attention asks nothing, as in the
    app, where only the GEMV ops ask."""
    if ahead is None:
        return chain_step(problem, keys, values, tiles)
    per_layer = len(problem["chain"]) + 1  # chain_step's kernels a layer: the GEMVs and the attention after the first
    # the chain's kernel index -> the GEMV's in the cycle, None for the attention
    gemv_of = [None if i % per_layer == 1 else i // per_layer * (per_layer - 1) + i % per_layer - (i % per_layer > 1)
               for i in range(problem["layers"] * per_layer)]
    return chain_step(problem, keys, values, tiles,
                      lambda i: ahead.ask(gemv_of[i]) if gemv_of[i] is not None else None, ahead.join)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="*", default=["1.8b", "7b"])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--position", type=int, default=600)
    p.add_argument("--cache", type=int, default=4160)
    p.add_argument("--budgets-mb", nargs="*", type=float, default=[4, 8, 16, 24, 32, 48])
    p.add_argument("--modes", nargs="*", default=list(MODES))
    p.add_argument("--out", default=None)
    a = p.parse_args()
    from bench.int4_kernels import copy_rate

    device = torch.device("cuda", torch.cuda.current_device())
    gpu, copy = torch.cuda.get_device_name(), copy_rate()
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    print(f"# {gpu}: copy {copy:.0f} GB/s, L2 {l2 / 2**20:.0f} MiB; torch {torch.__version__}", flush=True)
    rows = []
    for shape in a.shapes:
        problem = make_problem(SHAPES[shape], a.layers, a.cache, a.position, "cuda")
        read = layer_bytes(problem, shape)
        tiles = [min(times, key=times.get) for times in tiles_alone(problem, shape, device)]  # Triton's or int4_mma's
        weights = chain_weights(problem)
        variants = [(None, 0.0)] + [(mode, mb) for mode in a.modes for mb in a.budgets_mb]
        base = None
        for mode, mb in variants:
            keys, values = problem["keys"].clone(), problem["values"].clone()
            bulk, evict_last, capped = MODES.get(mode, (None, None, None))
            ahead = None if mode is None else l2_ahead.L2Ahead(weights, int(mb * 2**20), device, evict_last, bulk,
                                                               -1 if capped else None)
            out, same, us = run_and_time(prefetching_step(problem, keys, values, tiles, ahead), base, a.layers, 3)
            base = out if base is None else base
            rows.append({"gpu": gpu, "shape": shape, "tiles": tiles, "mode": mode or "none", "budget_mb": mb,
                         "us_per_layer": round(us, 2), "of_copy": round(read / us / 1e3 / copy, 3),
                         "same_as_none": same})
            print(json.dumps(rows[-1]), flush=True)
        problem = None
        torch.cuda.empty_cache()
    if a.out:
        Path(a.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(table(rows))


def table(rows: list[dict]) -> str:
    """Markdown: µs a layer per shape, mode and budget, and × no prefetch."""
    lines = ["| shape | mode | budget MB | µs a layer | of copy | × none | identical |",
             "|---|---|---|---|---|---|---|"]
    for shape in dict.fromkeys(r["shape"] for r in rows):
        mine = [r for r in rows if r["shape"] == shape]
        base = next(r["us_per_layer"] for r in mine if r["mode"] == "none")
        for r in mine:
            lines.append(f"| {shape} | {r['mode']} | {r['budget_mb']:g} | {r['us_per_layer']} | {r['of_copy']:.0%} | "
                         f"{base / r['us_per_layer']:.2f}× | {r['same_as_none']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
