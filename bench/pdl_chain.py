"""Does an early launch (programmatic dependent launch, models/kernels/pdl.py) pay with the tensor-core GEMV?

Session 28 timed early launches with the Triton kernels only, end to end, and they lost (the 1.8B's step
1.107 ms at level 0, 1.143 at 1, 1.162 at 2; BENCHMARKS.md). int4_mma.py's GEMV holds 72-96 registers where
the Triton tiles hold 128-168, so a kernel launched early can sit beside the one before it, with its first
weights loaded into registers before its griddepcontrol.wait. This times a layer's chain as the app runs it
(q/k/v GEMV, decode_attention_qkv, o, gate/up, down; no epilogues) over 8 layers of random weights in one CUDA
graph, with each slot's tile chosen among Triton's five, int4_mma's six, or all eleven (timed alone at level
0), at levels 0, 1 and 2. Each level's output is checked bit for bit against level 0's.

    python bench/pdl_chain.py [--shapes 1.8b 7b] [--layers 8] [--position 600] [--out rows.jsonl]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.persistent_layer import HEAD_DIM, SHAPES, layer_linears, make_problem, window_for  # noqa: E402
from models.kernels import decode_attention, int4_triton, pdl  # noqa: E402
from models.kernels.int4 import new_workspace, packed_bytes  # noqa: E402


def chain_step(problem: dict, keys: torch.Tensor, values: torch.Tensor, tiles: list[int], before=None, after=None):
    """The layers' kernels one after another, slot s's GEMV with tile index tiles[s] (int4_triton.tile_config).
    `before(i)` runs before the step's i-th kernel (q/k/v, attention, o, gate/up, down a layer), `after()` at its end."""
    hidden, hq, hkv, inter = problem["dims"]
    chain = problem["chain"]
    window = window_for(problem["position"], problem["cache_len"])
    mask = torch.ones(window, dtype=torch.bool, device=keys.device)
    workspace = new_workspace(max(n for *_, n in chain), keys.device)
    partials, counters = decode_attention.new_workspace(hq, hkv, HEAD_DIM, keys.device)
    h = problem["h"].to(torch.bfloat16).view(1, -1)
    cos, sin = problem["cos"].to(torch.bfloat16), problem["sin"].to(torch.bfloat16)
    configs = [int4_triton.tile_config(t) for t in tiles]
    outs = [torch.empty(1, n, dtype=torch.bfloat16, device=keys.device) for *_, n in chain]

    def run():
        x = h
        index = 0
        for layer in range(problem["layers"]):
            for slot, (w, s, o, k, n) in enumerate(chain):
                if slot == 1:  # attention between q/k/v and o
                    if before is not None:
                        before(index)
                    index += 1
                    x = decode_attention.decode_attention_qkv(
                        x.view(-1), None, cos, sin, problem["pos"], keys[layer:layer + 1], values[layer:layer + 1],
                        mask, HEAD_DIM ** -0.5, hq, partials, counters).view(1, -1)
                if before is not None:
                    before(index)
                index += 1
                y = outs[slot]
                int4_triton.launch(x[:, :k], w[layer], s[layer], o[layer], k, y, workspace, configs[slot],
                                   (y, y, y, workspace[0], 0, 0.0))
                x = y
        if after is not None:
            after()
        return x
    return run


def slot_us(problem: dict, slot: int, tile: int) -> float:
    """One slot's GEMV alone with `tile`, over the layers' copies of its weights, µs a call (level 0)."""
    from bench.int4_kernels import graph_ms

    w, s, o, k, n = problem["chain"][slot]
    x = torch.randn(1, k, device=w.device).to(torch.bfloat16)
    y = torch.empty(1, n, dtype=torch.bfloat16, device=w.device)
    workspace = new_workspace(n, w.device)
    config = int4_triton.tile_config(tile)

    def run():
        for layer in range(problem["layers"]):
            int4_triton.launch(x, w[layer], s[layer], o[layer], k, y, workspace, config, (y, y, y, workspace[0], 0, 0.0))
    return graph_ms(run) * 1e3 / problem["layers"]


def tiles_alone(problem: dict, shape: str, device: torch.device) -> list[dict[int, float]]:
    """Per slot of the chain, µs a call of each tile that runs it (Triton's, then int4_mma's), each timed alone at
    level 0 (printed as they come)."""
    from models.kernels import int4_mma

    triton_tiles = list(range(len(int4_triton._GEMV_CONFIGS)))
    alone = []
    for slot, (*_, k, n) in enumerate(problem["chain"]):
        mma = [len(triton_tiles) + i for i, t in enumerate(int4_mma.TILES) if int4_mma.tile_fits(t, n, device)]
        alone.append({t: slot_us(problem, slot, t) for t in triton_tiles + mma})
        best = min(alone[-1], key=alone[-1].get)
        print(f"{shape} slot {slot} ({n} x {k}): " + ", ".join(f"{t}: {us:.2f}" for t, us in alone[-1].items())
              + f" -> {best}", flush=True)
    return alone


def layer_bytes(problem: dict, shape: str) -> int:
    """Bytes a layer of the chain reads: its four GEMVs' packed weights and the cache up to the position."""
    kv_bytes = 2 * problem["dims"][2] * (problem["position"] + 1) * HEAD_DIM * 2
    return sum(packed_bytes(n, k) for k, n in layer_linears(shape)) + kv_bytes


def run_and_time(step, base: torch.Tensor | None, layers: int, repeats: int = 1) -> tuple[torch.Tensor, bool | None, float]:
    """(the step's output, whether it equals `base` bit for bit (None without one), µs a layer: the least of
    `repeats` graph timings)."""
    from bench.int4_kernels import graph_ms

    out = step().clone()
    torch.cuda.synchronize()
    same = None if base is None else bool(torch.equal(out, base))
    return out, same, min(graph_ms(step) for _ in range(repeats)) * 1e3 / layers


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="*", default=["1.8b", "7b"])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--position", type=int, default=600)
    p.add_argument("--cache", type=int, default=4160)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    from bench.int4_kernels import copy_rate

    device = torch.device("cuda", torch.cuda.current_device())
    gpu, copy = torch.cuda.get_device_name(), copy_rate()
    print(f"# {gpu}: copy {copy:.0f} GB/s; torch {torch.__version__}", flush=True)
    triton_tiles = list(range(len(int4_triton._GEMV_CONFIGS)))
    rows = []
    for shape in a.shapes:
        problem = make_problem(SHAPES[shape], a.layers, a.cache, a.position, "cuda")
        read = layer_bytes(problem, shape)
        alone = tiles_alone(problem, shape, device)
        picks = {"triton": [min(triton_tiles, key=times.get) for times in alone],
                 "mma": [min((t for t in times if t >= len(triton_tiles)), key=times.get, default=None)
                         for times in alone],
                 "both": [min(times, key=times.get) for times in alone]}
        for kind, tiles in picks.items():
            if None in tiles:
                continue
            base = None
            for level in (pdl.OFF, pdl.EARLY, pdl.EARLY_PREFETCH):
                os.environ[pdl.ENV] = str(level)
                if pdl.level(device) != level:
                    print(f"level {level} does not run here", flush=True)
                    continue
                keys, values = problem["keys"].clone(), problem["values"].clone()
                out, same, us = run_and_time(chain_step(problem, keys, values, tiles), base, a.layers)
                base = out if base is None else base
                rows.append({"gpu": gpu, "shape": shape, "tiles": kind, "tile_indices": tiles, "pdl": level,
                             "us_per_layer": round(us, 2), "of_copy": round(read / us / 1e3 / copy, 3),
                             "same_as_level_0": same, "alone_sum_us": round(sum(alone[s][t] for s, t in
                                                                                 enumerate(tiles)), 2)})
                print(json.dumps(rows[-1]), flush=True)
        os.environ[pdl.ENV] = "0"
        problem = None
        torch.cuda.empty_cache()
    if a.out:
        Path(a.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(table(rows))


def table(rows: list[dict]) -> str:
    """Markdown: µs a layer per shape and tile kind at each level, and × level 0."""
    lines = ["| shape | tiles | GEMVs alone µs (sum) | level 0 µs a layer | level 1 | level 2 | identical |",
             "|---|---|---|---|---|---|---|"]
    for shape in dict.fromkeys(r["shape"] for r in rows):
        for kind in dict.fromkeys(r["tiles"] for r in rows if r["shape"] == shape):
            mine = {r["pdl"]: r for r in rows if r["shape"] == shape and r["tiles"] == kind}
            base = mine[0]["us_per_layer"]
            cells = [f"{mine[lv]['us_per_layer']} ({base / mine[lv]['us_per_layer']:.2f}×)" if lv in mine else "–"
                     for lv in (1, 2)]
            same = all(r["same_as_level_0"] in (None, True) for r in mine.values())
            lines.append(f"| {shape} | {kind} {mine[0]['tile_indices']} | {mine[0]['alone_sum_us']} | "
                         f"{base} ({mine[0]['of_copy']:.0%} of copy) | {cells[0]} | {cells[1]} | {same} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
