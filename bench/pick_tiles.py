"""The GEMV tiles the app should tune over, chosen from a sweep: the few that minimise a decode step's GEMV time.

Why a few: the autotuner times every tile in the set on a model's first load of each shape, and each
tile is one more kernel to compile, so the set is kept small (int4_triton._GEMV_CONFIGS: five). Which
five is a set-cover question over the sweep's timings: for each linear shape of a step, the set's
fastest tile is what the autotuner will pick, and a step runs each shape once per layer.

    python bench/pick_tiles.py SWEEP.json [--count 5]

SWEEP.json: the rows bench/int4_gemv_sweep.py writes (one per shape and tile, microseconds in a CUDA
graph). Prints the chosen set against the app's current one and the sweep's best per shape, and the
triton.Config lines for int4_triton._GEMV_CONFIGS.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

# Each linear shape (N, K) of a decode step as the app loads them (fused q/k/v and gate/up, o, down),
# with how many layers run it: InternLM2.5-7B (32), InternLM2-1.8B (24), Qwen2.5-7B (28).
LAYERS = {(6144, 4096): 32, (4096, 4096): 32, (28672, 4096): 32, (4096, 14336): 32,
          (4096, 2048): 24, (2048, 2048): 24, (16384, 2048): 24, (2048, 8192): 24,
          (4608, 3584): 28, (3584, 3584): 28, (37888, 3584): 28, (3584, 18944): 28}
TILE_KEYS = ("BLOCK_N", "SPLIT", "num_warps", "PREFETCH", "LOOP_STAGES", "HALF2", "L2_AHEAD")
EXHAUSTIVE_LIMIT = 2_000_000  # sets to try one by one; beyond that, greedy then single swaps


def tile_of(row: dict) -> tuple:
    """A sweep row's tile: BLOCK_N, SPLIT, warps, PREFETCH, LOOP_STAGES, HALF2, L2_AHEAD."""
    defaults = {"PREFETCH": True, "LOOP_STAGES": 1, "HALF2": False, "L2_AHEAD": 0}
    return tuple(row.get(key, defaults.get(key)) for key in TILE_KEYS)


def timings(rows: list[dict]) -> dict[tuple, dict[tuple, float]]:
    """{(N, K): {tile: microseconds}} from a sweep's rows (the autotuner-pick summary rows left out)."""
    table: dict[tuple, dict[tuple, float]] = {}
    for row in rows:
        if row.get("tuned_pick") or "us" not in row:
            continue
        table.setdefault((row["n"], row["k"]), {})[tile_of(row)] = row["us"]
    return table


def step_us(tiles, table: dict, layers: dict) -> float:
    """Microseconds of GEMV per step summed over the shapes, each at the set's fastest tile (inf if none ran)."""
    return sum(layers.get(shape, 1) * min((times.get(t, float("inf")) for t in tiles), default=float("inf"))
               for shape, times in table.items())


def choose(table: dict, count: int, layers: dict = LAYERS) -> tuple:
    """The `count` tiles whose per-shape best gives the least step time: every set where that is few enough
    to try, else a greedy set improved by single swaps until none helps."""
    candidates = sorted({t for times in table.values() for t in times})
    count = min(count, len(candidates))
    sets = 1
    for i in range(count):
        sets = sets * (len(candidates) - i) // (i + 1)
    if sets <= EXHAUSTIVE_LIMIT:
        return min(itertools.combinations(candidates, count), key=lambda s: step_us(s, table, layers))
    chosen: list = []
    while len(chosen) < count:
        chosen.append(min((t for t in candidates if t not in chosen), key=lambda t: step_us(chosen + [t], table, layers)))
    improved = True
    while improved:
        improved = False
        for i, t in itertools.product(range(count), candidates):
            if t not in chosen:
                trial = chosen[:i] + [t] + chosen[i + 1:]
                if step_us(trial, table, layers) < step_us(chosen, table, layers) - 1e-9:
                    chosen, improved = trial, True
    return tuple(sorted(chosen))


def config_line(tile: tuple) -> str:
    """The tile as the triton.Config that int4_triton._GEMV_CONFIGS lists."""
    block_n, split, warps, prefetch, stages, half2, ahead = tile
    kwargs = {"BLOCK_N": block_n, "SPLIT": split, "PREFETCH": prefetch}
    if stages != 1:
        kwargs["LOOP_STAGES"] = stages
    if half2:
        kwargs["HALF2"] = True
    if ahead:
        kwargs["L2_AHEAD"] = ahead
    return f"triton.Config({kwargs}, num_warps={warps}, num_stages=1)"


def report(table: dict, chosen: tuple, current: tuple) -> str:
    """A markdown table: per shape, the chosen set's time, the current set's, and the sweep's best."""
    lines = ["| N × K | layers | chosen set µs | current set µs | sweep best µs (tile) |", "|---|---|---|---|---|"]
    for shape in sorted(table, key=lambda s: (LAYERS.get(s, 0), s)):
        times = table[shape]
        best = min(times, key=times.get)
        lines.append(f"| {shape[0]} × {shape[1]} | {LAYERS.get(shape, 1)} | {min(times.get(t, float('inf')) for t in chosen):.2f} | "
                     f"{min((times.get(t, float('inf')) for t in current), default=float('inf')):.2f} | "
                     f"{times[best]:.2f} {best} |")
    lines.append(f"\nGEMV µs per step summed over the shapes: chosen {step_us(chosen, table, LAYERS):.0f}, "
                 f"current {step_us(current, table, LAYERS):.0f}, every shape at its best "
                 f"{sum(LAYERS.get(s, 1) * min(t.values()) for s, t in table.items()):.0f}")
    return "\n".join(lines)


def main() -> None:
    """Command-line entry point."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep", type=Path)
    p.add_argument("--count", type=int, default=5)
    a = p.parse_args()
    table = timings(json.loads(a.sweep.read_text()))
    if not table:
        sys.exit(f"{a.sweep}: no timed rows")
    missing = sorted(set(LAYERS) - set(table))
    if missing:
        print(f"not in the sweep (its budget ran out?): {missing}")
    try:
        from models.kernels import int4_triton
        current = tuple(tile_of({**c.kwargs, "num_warps": c.num_warps}) for c in int4_triton._GEMV_CONFIGS)
    except ImportError:  # no Triton here: compare against nothing
        current = ()
    chosen = choose(table, a.count)
    print(report(table, chosen, current))
    print("\n_GEMV_CONFIGS:")
    for tile in chosen:
        print("   ", config_line(tile))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
