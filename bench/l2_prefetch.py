"""Do a layer's GEMVs run faster when a second stream asks the L2 for their weights ahead of them?

Session 34's profile put most of what the decode step loses to the roofline in the GEMVs' fixed cost: each of a
layer's five dependent kernels (q/k/v GEMV, attention, o, gate/up, down) drains, launches and then waits a DRAM
latency for its first weights, and the small ones (the 1.8B's q/k/v and o: 6.7 MB, 11.5 µs a layer) run at 14-24 %
of the copy rate. Meanwhile the DRAM idles: during the attention (~7-9 µs a layer, 2.5 MB) and in every kernel's
ramp and tail. Here a second stream in the same CUDA graph asks the L2 (50 MB on the H100 and H200) for the weights
of the kernels ahead, up to `budget` bytes past the end of the kernel running, so that those kernels find them in
the L2. Two ways of asking: `cp.async.bulk.prefetch.L2` (Hopper's bulk copy engine, one instruction for 16 KB) and
plain loads with a 256-byte L2 fetch (`ld.global.L2::256B`). The chain is bench/pdl_chain.py's (its tiles chosen
among Triton's and int4_mma's, timed alone), 8 layers of random weights, one CUDA graph; every variant's output is
checked bit for bit against the chain without prefetch.

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

from bench.pdl_chain import chain_step, slot_us  # noqa: E402
from bench.persistent_layer import HEAD_DIM, SHAPES, layer_linears, make_problem  # noqa: E402
from models.kernels import int4_triton, nvrtc  # noqa: E402
from models.kernels.int4 import packed_bytes  # noqa: E402

SOURCE = r"""
// Block row y asks for range y of the table (address, bytes); its threads stride over it in pieces of PIECE bytes.
extern "C" __global__ void l2_prefetch(const long long* table) {
    const char* base = (const char*)table[2 * blockIdx.y];
    unsigned int bytes = (unsigned int)table[2 * blockIdx.y + 1];
    unsigned int stride = gridDim.x * blockDim.x * PIECE;
    for (unsigned int at = (blockIdx.x * blockDim.x + threadIdx.x) * PIECE; at < bytes; at += stride) {
#if BULK
        // the copy engine fetches the piece into the L2; nothing comes back to the thread
        unsigned int size = min((unsigned int)PIECE, bytes - at) & ~15u;
        if (size) asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" :: "l"(base + at), "r"(size) : "memory");
#else
        // a 16-byte load whose miss brings its whole 256-byte piece into the L2
        unsigned int w0, w1, w2, w3;
        asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
                     : "=r"(w0), "=r"(w1), "=r"(w2), "=r"(w3) : "l"(base + at));
#endif
    }
}
"""
THREADS = 128
MODES = {"bulk": (1, 16384), "load256": (0, 256)}  # BULK, PIECE


def prefetch_kernel(mode: str, device: torch.device) -> nvrtc.Kernel:
    """The prefetch kernel for `mode` (bulk copies or 256-byte loads), compiled for `device`."""
    bulk, piece = MODES[mode]
    return nvrtc.load_kernel(SOURCE, "l2_prefetch", device, (f"-DBULK={bulk}", f"-DPIECE={piece}"))


def ask_l2(kernel: nvrtc.Kernel, mode: str, table: torch.Tensor, largest: int) -> None:
    """Ask the L2 for the byte ranges of `table` (int64 [ranges, 2]: address, bytes) on the current stream."""
    blocks = max(1, min(32, -(-largest // (THREADS * MODES[mode][1]))))
    kernel((blocks, table.shape[0], 1), (THREADS, 1, 1), [table])


def weight_pieces(problem: dict, piece_bytes: int) -> list[list[tuple[int, torch.Tensor]]]:
    """Per kernel of the chain, in order (q/k/v, attention, o, gate/up, down per layer): its weights as
    (first byte in the step's stream of weights, flat uint8 view) pieces of at most `piece_bytes`."""
    kernels, offset = [], 0
    for layer in range(problem["layers"]):
        for slot, (w, s, o, _k, _n) in enumerate(problem["chain"]):
            if slot == 1:
                kernels.append([])  # the attention reads the cache, not weights
            pieces = []
            for t in (s[layer], o[layer], w[layer]):  # scales and offsets first: every group needs them
                flat = t.contiguous().view(torch.uint8).view(-1)
                for start in range(0, flat.numel(), piece_bytes):
                    pieces.append((offset, flat[start:start + piece_bytes]))
                    offset += pieces[-1][1].numel()
            kernels.append(pieces)
    return kernels


def prefetching_step(problem: dict, keys: torch.Tensor, values: torch.Tensor, tiles: list[int], prefetch=None):
    """bench/pdl_chain.py's chain of the layers' kernels; with `prefetch` (kernel, mode, budget bytes, pieces), a
    second stream asks the L2 for the weights up to `budget` bytes past the end of each kernel as it starts."""
    if prefetch is None:
        return chain_step(problem, keys, values, tiles)
    kernel, mode, budget, kernels = prefetch
    ends, total = [], 0
    for pieces in kernels:
        total += sum(p.numel() for _, p in pieces)
        ends.append(total)
    # issues[i]: the pieces asked for as kernel i starts (those starting before its end + budget, not yet asked)
    issues, asked = [], 0
    flat = [p for pieces in kernels for p in pieces]
    for end in ends:
        mine = []
        while asked < len(flat) and flat[asked][0] < end + budget:
            mine.append(flat[asked][1])
            asked += 1
        issues.append(None if not mine else (
            torch.tensor([[v.data_ptr(), v.numel()] for v in mine], dtype=torch.int64, device=keys.device),
            max(v.numel() for v in mine)))
    side = torch.cuda.Stream(keys.device)

    def ask(index: int) -> None:
        if issues[index] is None:
            return
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            ask_l2(kernel, mode, *issues[index])
    return chain_step(problem, keys, values, tiles, ask, lambda: torch.cuda.current_stream().wait_stream(side))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="*", default=["1.8b", "7b"])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--position", type=int, default=600)
    p.add_argument("--cache", type=int, default=4160)
    p.add_argument("--budgets-mb", nargs="*", type=float, default=[4, 8, 16, 24, 32, 48])
    p.add_argument("--modes", nargs="*", default=list(MODES))
    p.add_argument("--piece-mb", type=float, default=1.0)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    from bench.int4_kernels import copy_rate, graph_ms
    from models.kernels import int4_mma

    device = torch.device("cuda", torch.cuda.current_device())
    gpu, copy = torch.cuda.get_device_name(), copy_rate()
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    print(f"# {gpu}: copy {copy:.0f} GB/s, L2 {l2 / 2**20:.0f} MiB; torch {torch.__version__}", flush=True)
    kernels = {mode: prefetch_kernel(mode, device) for mode in a.modes}
    triton_tiles = list(range(len(int4_triton._GEMV_CONFIGS)))
    rows = []
    for shape in a.shapes:
        problem = make_problem(SHAPES[shape], a.layers, a.cache, a.position, "cuda")
        kv_bytes = 2 * problem["dims"][2] * (a.position + 1) * HEAD_DIM * 2
        layer_bytes = sum(packed_bytes(n, k) for k, n in layer_linears(shape)) + kv_bytes
        tiles = []
        for slot, (*_, k, n) in enumerate(problem["chain"]):
            mma = [len(triton_tiles) + i for i, t in enumerate(int4_mma.TILES) if int4_mma.tile_fits(t, n, device)]
            times = {t: slot_us(problem, slot, t) for t in triton_tiles + mma}
            tiles.append(min(times, key=times.get))
            print(f"{shape} slot {slot} ({n} x {k}): best tile {tiles[-1]} {times[tiles[-1]]:.2f} µs", flush=True)
        pieces = weight_pieces(problem, int(a.piece_mb * 2**20))
        variants = [(None, 0.0)] + [(mode, mb) for mode in a.modes for mb in a.budgets_mb]
        base = None
        for mode, mb in variants:
            keys, values = problem["keys"].clone(), problem["values"].clone()
            prefetch = None if mode is None else (kernels[mode], mode, int(mb * 2**20), pieces)
            step = prefetching_step(problem, keys, values, tiles, prefetch)
            out = step().clone()
            torch.cuda.synchronize()
            same = None if base is None else bool(torch.equal(out, base))
            base = out if base is None else base
            us = min(graph_ms(step) for _ in range(3)) * 1e3 / a.layers
            rows.append({"gpu": gpu, "shape": shape, "tiles": tiles, "mode": mode or "none", "budget_mb": mb,
                         "us_per_layer": round(us, 2), "of_copy": round(layer_bytes / us / 1e3 / copy, 3),
                         "same_as_none": same})
            print(json.dumps(rows[-1]), flush=True)
        problem = None
        torch.cuda.empty_cache()
    if a.out:
        Path(a.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(table(rows))


def table(rows: list[dict]) -> str:
    """Markdown: µs a layer per shape, mode and budget, and × no prefetch."""
    lines = ["| shape | mode | budget MB | µs a layer | of copy | × none | identical |", "|---|---|---|---|---|---|---|"]
    for shape in dict.fromkeys(r["shape"] for r in rows):
        mine = [r for r in rows if r["shape"] == shape]
        base = next(r["us_per_layer"] for r in mine if r["mode"] == "none")
        for r in mine:
            lines.append(f"| {shape} | {r['mode']} | {r['budget_mb']:g} | {r['us_per_layer']} | {r['of_copy']:.0%} | "
                         f"{base / r['us_per_layer']:.2f}× | {r['same_as_none']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
