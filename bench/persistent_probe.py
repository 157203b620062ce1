"""Probe: a layer's int4 GEMVs as one persistent kernel with grid barriers, against separate launches.

Why (BENCHMARKS.md, session 29): the decode step's kernels carry fixed costs that no tile removes. The
small GEMVs (q/k/v, o) take 8.4-9.5 us for 2-3 us of bytes, a boundary drains one kernel before the
next starts, and each kernel waits a DRAM latency for its first weights; early launches (PDL) and asking
the L2 ahead measured slower. The remaining way is fewer, longer-lived kernels: every program resident,
the phases of a layer in turn, a barrier over the grid between them, and the next phase's first weights
asked of the L2 before each barrier. Before building a whole persistent layer (attention, norms and
SiLU inside it too), this probe answers the question that decides it, on the GPU, in one short run:
does a layer's chain of GEMVs (fused q/k/v, o, fused gate/up, down) run faster as one persistent
launch than as four of today's kernels?

Each phase reads the first K of the previous phase's output as its x (the layer's own data dependence,
without the attention and SiLU between). The persistent kernel splits each phase into (row tile, K
slice) items dealt round-robin to its programs; each item's fp32 partial sums are added into the
phase's output with atomics (zeroed before the launch), so a phase needs no second pass, only the
barrier. Rows: separate launches (the app's GEMV, Triton-autotuned tile per shape, in a CUDA graph);
the persistent kernel's code launched once per phase (kernel boundaries, no barrier: what the barrier
itself changes); one launch per layer and one for all layers, each with and without asking the L2 for
the next phase's first weights. Every variant runs over several layers' weights (past the L2) and is
checked against a plain-PyTorch chain. Also a barrier alone, and an empty kernel's boundary.

    python bench/persistent_probe.py [--shapes 1.8b 7b] [--layers 8] [--out results.jsonl]

Triton's interpreter runs a grid's programs one after another, so there only a one-program grid can
pass a barrier (tests/test_persistent_probe.py checks the arithmetic that way; the GPU test the grid).
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

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from models.kernels.int4 import dequantize_reference  # noqa: E402
from models.kernels.int4_half2 import H2_X_SCALE_, ONE_TO_H2_ONE  # noqa: E402
from models.kernels.int4_triton import ONE_BITS, _prefetch_share  # noqa: E402
from bench.persistent_kernels import gemv_items, pick as _pick, programs_that_fit, split_for  # noqa: E402
from bench.persistent_kernels import grid_sync as _grid_sync  # noqa: E402

PHASES = 4  # fused q/k/v, o, fused gate/up, down


@triton.jit
def _barriers_only(bar_ptr, count):
    """`count` grid barriers and nothing else: what one costs."""
    programs = tl.num_programs(0)
    for b in range(1, count + 1):
        _grid_sync(bar_ptr, b * programs)


@triton.jit
def _ask_first(w_ptr, s_ptr, o_ptr, N, K, split, BLOCK_N: tl.constexpr):
    """Ask the L2 for the first groups (up to 4) of this program's first item of a phase: its weights are
    constant, so this may run before the barrier that the phase waits on."""
    pid = tl.program_id(0)
    tiles = N // BLOCK_N
    groups = K // 128
    if pid < tiles * split:
        g_lo = (pid // tiles) * tl.cdiv(groups, split)
        _prefetch_share(w_ptr, s_ptr, o_ptr, g_lo, tl.minimum(g_lo + 4, groups), pid % tiles, N, N, N, BLOCK_N)


@triton.jit
def _phase_weights(layer, p, w0, s0, o0, n0, k0, split0, w1, s1, o1, n1, k1, split1,
                   w2, s2, o2, n2, k2, split2, w3, s3, o3, n3, k3, split3):
    """Phase p's weights of `layer` (stacked by layer) and its N, K and K slices."""
    n = _pick(p, n0, n1, n2, n3)
    k = _pick(p, k0, k1, k2, k3)
    words = layer * (k // 8) * n
    pairs = layer * (k // 128) * n
    return (_pick(p, w0, w1, w2, w3) + words, _pick(p, s0, s1, s2, s3) + pairs, _pick(p, o0, o1, o2, o3) + pairs,
            n, k, _pick(p, split0, split1, split2, split3))


@triton.jit
def _layers_kernel(x_ptr, out_ptr, bar_ptr, first_step, steps,
                   w0, s0, o0, n0, k0, split0, w1, s1, o1, n1, k1, split1,
                   w2, s2, o2, n2, k2, split2, w3, s3, o3, n3, k3, split3, one_bits,
                   BLOCK_N: tl.constexpr, ASK_NEXT: tl.constexpr, ASM: tl.constexpr):
    """Steps first_step .. first_step + steps - 1 of the layers' chains (step = 4 layer + phase), barriers between.

    Phase p of layer l writes out[l, offset_p : offset_p + n_p] (out: fp32 [L, n0 + n1 + n2 + n3], zeroed)
    and reads the first k_p of the phase before (the layer before's last phase for p = 0; x for the first
    layer). Weights are stacked by layer: w_p [L, k_p / 8, n_p], s_p and o_p [L, k_p / 128, n_p]. bar_ptr is
    zeroed before the launch. One loop over (layer, phase) with the phase's pointers picked at run time,
    not the four phases written out: each written-out phase kept registers of its own live (253 a thread
    for the 256-row tile on sm_90, against 128 for one phase), which would cap the programs per SM."""
    programs = tl.num_programs(0)
    h2_one = one_bits - ONE_TO_H2_ONE
    row = n0 + n1 + n2 + n3
    for step in range(first_step, first_step + steps):
        layer = step // 4
        p = step % 4
        w, s, o, n, k, split = _phase_weights(layer, p, w0, s0, o0, n0, k0, split0, w1, s1, o1, n1, k1, split1,
                                              w2, s2, o2, n2, k2, split2, w3, s3, o3, n3, k3, split3)
        offset = _pick(p, 0, n0, n0 + n1, n0 + n1 + n2)
        out = out_ptr + layer * row + offset
        if step == 0:
            x = x_ptr
        elif p == 0:
            x = out - n3  # the layer before's last phase
        else:
            x = out - _pick(p, 0, n0, n1, n2)
        gemv_items(x, H2_X_SCALE_, None, w, s, o, out, n, k, split, h2_one, False, out, bar_ptr, BLOCK_N, ASM, False)
        if step + 1 < first_step + steps:
            if ASK_NEXT:
                nw, ns, no, nn, nk, nsplit = _phase_weights((step + 1) // 4, (step + 1) % 4, w0, s0, o0, n0, k0, split0,
                                                            w1, s1, o1, n1, k1, split1, w2, s2, o2, n2, k2, split2,
                                                            w3, s3, o3, n3, k3, split3)
                _ask_first(nw, ns, no, nn, nk, nsplit, BLOCK_N)
            _grid_sync(bar_ptr, (step + 1 - first_step) * programs)


def random_chain(linears: list[tuple[int, int]], layers: int, device: str, seed: int = 0) -> list[tuple]:
    """Packed int4 weights of `layers` layers of the chain (K, N per phase), stacked by layer: (w, s, o, K, N).

    Random nibbles, weights centred on zero ((q - 8 + u) s, u uniform in [0, 1)) with scales ~0.2/sqrt(K): a
    phase's output then has about its input's size, through the 32 phases of 8 layers (the packed-fp16 loop
    takes x in fp16's range). Offsets of -8 scales alone left every weight's mean at -s/2: the common part of
    the outputs then grew ~0.1 sqrt(K) times a phase, past fp16's range within three layers."""
    gen = torch.Generator().manual_seed(seed)
    chain = []
    for k, n in linears:
        w = torch.randint(-2**31, 2**31 - 1, (layers, k // 8, n), generator=gen, dtype=torch.int64).to(torch.int32)
        s = (torch.rand(layers, k // 128, n, generator=gen) + 0.5) * (0.2 / k**0.5)
        o = (torch.rand(layers, k // 128, n, generator=gen) - 8.0) * s  # w = (q + u - 8) s: mean 0
        chain.append((w.to(device), s.to(torch.bfloat16).to(device), o.to(torch.bfloat16).to(device), k, n))
    return chain


def reference(x: torch.Tensor, chain: list[tuple], layers: int) -> torch.Tensor:
    """out [layers, sum of N] in fp32 by plain PyTorch: each phase on the first K of the phase before."""
    rows = []
    prev = x.float()
    for layer in range(layers):
        parts = []
        for w, s, o, k, n in chain:
            weight = dequantize_reference(w[layer], s[layer], o[layer], k, torch.float32)
            prev = weight @ prev[:k]
            parts.append(prev)
        rows.append(torch.cat(parts))
    return torch.stack(rows)


def run_persistent(x: torch.Tensor, chain: list[tuple], out: torch.Tensor, bar: torch.Tensor, programs: int,
                   first_step: int, steps: int, block_n: int, warps: int, ask_next: bool,
                   splits: list[int] | None = None) -> None:
    """Launch _layers_kernel over `programs` programs (every one must be resident at once on a GPU);
    `splits`: each phase's K slices (default split_for's)."""
    args, options = _launch(x, chain, out, bar, programs, first_step, steps, block_n, warps, ask_next, splits)
    _layers_kernel[(programs,)](*args, **options)


def _launch(x, chain, out, bar, programs, first_step, steps, block_n, warps, ask_next, splits=None):
    """_layers_kernel's arguments and launch options."""
    splits = splits or [split_for(n, k, programs, block_n) for *_, k, n in chain]
    args = [x, out, bar, first_step, steps]
    for (w, s, o, k, n), split in zip(chain, splits):
        args += [w, s, o, n, k, split]
    options = {"BLOCK_N": block_n, "ASK_NEXT": ask_next, "ASM": os.environ.get("TRITON_INTERPRET") != "1",
               "num_warps": warps, "num_stages": 1}
    return args + [ONE_BITS], options


def resident_programs(x, chain, out, bar, block_n: int, warps: int, ask_next: bool) -> tuple[int, dict]:
    """How many programs of this kernel the GPU holds at once (a grid barrier over more would never end),
    and its registers and shared memory: compiled, not launched."""
    args, options = _launch(x, chain, out, bar, 1, 0, PHASES, block_n, warps, ask_next)
    return programs_that_fit(_layers_kernel.warmup(*args, grid=(1,), **options), warps, x.device)


def persistent_step(x, chain, out, bar, programs: int, layers: int, phases_per_launch: int, block_n: int, warps: int,
                    ask_next: bool):
    """A step's chain as launches of the persistent kernel, each running `phases_per_launch` phases (1: a
    kernel boundary after every phase, as today; 4: one launch a layer; 4 x layers: one for the step);
    zeroing the outputs and the barrier counter first."""
    steps = PHASES * layers
    launches = [(first, min(phases_per_launch, steps - first)) for first in range(0, steps, phases_per_launch)]

    def run():
        out.zero_()
        for first_step, count in launches:
            bar.zero_()  # each launch counts its own barriers from 0
            run_persistent(x, chain, out, bar, programs, first_step, count, block_n, warps, ask_next)
    return run


def separate_step(x: torch.Tensor, chain: list[tuple], layers: int):
    """The same chain as the app's GEMVs, one launch each (Triton-autotuned tile per shape); outputs bf16."""
    from models.kernels import int4_triton
    from models.kernels.int4 import new_workspace

    workspace = new_workspace(max(n for *_, n in chain), x.device)
    x16 = x.to(torch.bfloat16).view(1, -1)
    outs = []

    def run():
        outs.clear()
        prev = x16
        for layer in range(layers):
            for w, s, o, k, n in chain:
                prev = int4_triton.gemv(prev[:, :k], w[layer], s[layer], o[layer], k, workspace)
                outs.append(prev)
        return outs
    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="*", default=["1.8b", "7b"])
    p.add_argument("--layers", type=int, default=8, help="layers of weights per step (enough to pass the L2)")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    from bench.int4_kernels import LAYERS, copy_rate, fused, graph_ms
    from models.kernels.int4 import packed_bytes

    gpu = torch.cuda.get_device_name()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    copy = copy_rate()
    rows = []

    def emit(row: dict) -> None:
        rows.append({"gpu": gpu, **row})
        print(json.dumps(rows[-1]), flush=True)

    bar = torch.zeros(1, dtype=torch.int32, device="cuda")
    for count in (64, 256):
        ms = graph_ms(lambda: (bar.zero_(), _barriers_only[(sms,)](bar, count, num_warps=2)))
        emit({"probe": "barrier", "programs": sms, "barriers": count, "us_per_barrier": round(ms * 1e3 / count, 3)})
    for shape in a.shapes:
        linears = fused(LAYERS[shape][1])  # (K, N): fused q/k/v, o, fused gate/up, down
        chain = random_chain(linears, a.layers, "cuda")
        x = torch.randn(linears[0][0], device="cuda")
        want = reference(x, chain, a.layers)
        layer_bytes = sum(packed_bytes(n, k) for k, n in linears)
        width = sum(n for _, n in linears)
        out = torch.empty(a.layers, width, device="cuda")

        def record(variant: str, ms: float, got: torch.Tensor, **extra) -> None:
            us = ms * 1e3 / a.layers
            error = ((got.float() - want).abs().max() / want.abs().max()).item()
            emit({"shape": shape, "variant": variant, "us_per_layer": round(us, 2), "layer_mb": layer_bytes / 1e6,
                  "gb_s": round(layer_bytes / us / 1e3, 1), "of_copy": round(layer_bytes / us / 1e3 / copy, 3),
                  "copy_gbps": round(copy, 1), "max_rel_error": round(error, 5), **extra})

        separate = separate_step(x, chain, a.layers)
        ms = graph_ms(separate)
        got = torch.stack([torch.cat([y.view(-1).float() for y in separate()[i * PHASES:(i + 1) * PHASES]])
                           for i in range(a.layers)])
        record("separate launches (app GEMV, autotuned tiles)", ms, got)
        launches = {1: "one launch per phase (the same code, kernel boundaries)", PHASES: "one launch per layer",
                    PHASES * a.layers: "one launch for all layers"}
        for phases_per_launch, variant in launches.items():
            for block_n, warps in ((256, 2), (128, 1), (512, 4)):
                for programs in (sms, 2 * sms, 4 * sms):
                    for ask_next in (False, True) if phases_per_launch > 1 else (False,):
                        fits, usage = resident_programs(x, chain, out, bar, block_n, warps, ask_next)
                        if programs > fits:
                            print(f"skipped: {programs} programs of {block_n} rows, {warps} warps; {fits} fit {usage}")
                            continue
                        step = persistent_step(x, chain, out, bar, programs, a.layers, phases_per_launch, block_n, warps,
                                               ask_next)
                        ms = graph_ms(step)
                        step()
                        record(variant, ms, out.clone(),
                               block_n=block_n, warps=warps, programs=programs, ask_next=ask_next,
                               splits=[split_for(n, k, programs, block_n) for k, n in linears], **usage)
        del chain
        torch.cuda.empty_cache()
    if a.out:
        Path(a.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(table(rows))


def table(rows: list[dict]) -> str:
    """The results as Markdown: each shape's separate launches, then its persistent variants, fastest first."""
    lines = []
    for r in rows:
        if r.get("probe") == "barrier":
            lines.append(f"Grid barrier alone ({r['gpu']}, {r['programs']} programs, {r['barriers']} in a row): "
                         f"{r['us_per_barrier']:.2f} us each.")
    for shape in dict.fromkeys(r["shape"] for r in rows if "shape" in r):
        mine = [r for r in rows if r.get("shape") == shape]
        base = mine[0]["us_per_layer"]
        lines += ["", f"{shape}: a layer's four GEMVs ({mine[0]['layer_mb']:.1f} MB), copy rate {mine[0]['copy_gbps']} GB/s",
                  "", "| variant | tile (rows, warps) | programs | ask next | us per layer | of copy | × separate | max rel. error |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in [mine[0]] + sorted(mine[1:], key=lambda r: r["us_per_layer"]):
            tile = f"{r['block_n']}, {r['warps']}" if "block_n" in r else "–"
            lines.append(f"| {r['variant']} | {tile} | {r.get('programs', '–')} | {r.get('ask_next', '–')} | "
                         f"{r['us_per_layer']:.2f} | {100 * r['of_copy']:.0f} % | {base / r['us_per_layer']:.2f} | "
                         f"{r['max_rel_error']:.4f} |")
        best = {}  # each variant's fastest row
        for r in mine:
            if r["variant"] not in best or r["us_per_layer"] < best[r["variant"]]["us_per_layer"]:
                best[r["variant"]] = r
        lines += ["", "Best of each: " + "; ".join(f"{variant} {r['us_per_layer']:.2f} us ({base / r['us_per_layer']:.2f}×)"
                                                 for variant, r in best.items())]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
