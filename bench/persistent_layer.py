"""Probe, second step: whole decoder layers' one-token steps as one persistent kernel, against the app's kernels.

bench/persistent_probe.py asks whether a layer's four GEMVs run faster as one launch with grid barriers.
This asks what a whole layer costs that way: bench/persistent_kernels.py's kernel (its docstring has the
five phases), over random weights in the app's layout (gate and up rows alternating, the norms' weights
applied on load, the residual in fp32).

Rows: the app's kernels one after another per layer in a CUDA graph (int4 GEMVs and the fused q/k/v
attention, without the epilogues the app folds into them); the persistent kernel, one launch per layer
(each layer's own tensors) and one for all layers (weights stacked by layer). Both checked against plain
PyTorch (decode_attention.qkv_reference and dequantized weights).

    python bench/persistent_layer.py [--shapes 1.8b 7b] [--layers 8] [--position 600] [--out results.jsonl]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.persistent_probe import random_chain  # noqa: E402
from models.kernels import decode_attention  # noqa: E402
from models.kernels.int4 import dequantize_reference  # noqa: E402
from models.kernels.int4_triton import ONE_BITS  # noqa: E402
from bench.persistent_kernels import BLOCK_L, PREFETCH_MB, TILES, layer_kernel, split_for, units_in  # noqa: E402
from models.kernels.split_k import attention_rows  # noqa: E402

HEAD_DIM = 128
EPS = 1e-6
# (hidden, query heads, KV heads, intermediate) of the app's InternLM2 shapes
SHAPES = {"1.8b": (2048, 16, 8, 8192), "7b": (4096, 32, 8, 14336)}


def layer_linears(shape: str) -> list[tuple[int, int]]:
    """(K, N) of a layer's four GEMVs: fused q/k/v, o, fused gate/up, down."""
    hidden, hq, hkv, inter = SHAPES[shape] if isinstance(shape, str) else shape
    return [(hidden, (hq + 2 * hkv) * HEAD_DIM), (hq * HEAD_DIM, hidden), (hidden, 2 * inter), (inter, hidden)]


def make_problem(dims: tuple[int, int, int, int], layers: int, cache_len: int, position: int, device: str,
                 seed: int = 0) -> dict:
    """Random weights, norm weights, caches (stale entries past the position large: never to be attended), a
    residual h and the step's rotation, for `layers` layers of (hidden, query heads, KV heads, intermediate)."""
    hidden, hq, hkv, inter = dims
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(layers, hkv, cache_len, HEAD_DIM, generator=gen)
    values = torch.randn(layers, hkv, cache_len, HEAD_DIM, generator=gen)
    keys[:, :, position:] *= 50
    values[:, :, position:] *= 50
    freqs = 1.0 / 10000 ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM)
    angles = torch.cat([position * freqs, position * freqs])
    gammas = (1 + 0.2 * torch.randn(2, layers, hidden, generator=gen)).to(torch.bfloat16)
    return {"dims": dims, "layers": layers, "cache_len": cache_len, "position": position,
            "chain": random_chain(layer_linears(dims), layers, device, seed),
            "keys": keys.to(torch.bfloat16).to(device), "values": values.to(torch.bfloat16).to(device),
            "h": torch.randn(hidden, generator=gen).to(device), "gamma_in": gammas[0].to(device),
            "gamma_post": gammas[1].to(device), "ones": torch.ones(max(hidden, hq * HEAD_DIM, inter),
                                                                   dtype=torch.bfloat16, device=device),
            "cos": angles.cos().to(device), "sin": angles.sin().to(device),
            "pos": torch.tensor([position], device=device)}


def window_for(position: int, cache_len: int) -> int:
    """The attention window decode runs at `position`: the smallest power of two from 512 holding it, or the cache."""
    window = 512
    while window <= position:
        window *= 2
    return min(window, cache_len)


def reference(problem: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(h after the layers, the caches after them) in plain PyTorch; gate/up rows alternate, as the app's."""
    keys, values = problem["keys"].clone(), problem["values"].clone()
    position = torch.tensor([problem["position"]], device=keys.device)
    window = window_for(problem["position"], problem["cache_len"])
    mask = torch.ones(window, dtype=torch.bool, device=keys.device)
    h = problem["h"].float()

    def linear(slot: int, layer: int, x: torch.Tensor) -> torch.Tensor:
        w, s, o, k, _ = problem["chain"][slot]
        return dequantize_reference(w[layer], s[layer], o[layer], k, torch.float32) @ x

    def normed(x: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.square().mean() + EPS) * gamma.float()
    for layer in range(problem["layers"]):
        qkv = linear(0, layer, normed(h, problem["gamma_in"][layer]))
        attn = decode_attention.qkv_reference(qkv, None, problem["cos"], problem["sin"], position,
                                              keys[layer:layer + 1], values[layer:layer + 1], mask, HEAD_DIM ** -0.5,
                                              problem["dims"][1])
        h = h + linear(1, layer, attn.float().view(-1))
        gate, up = linear(2, layer, normed(h, problem["gamma_post"][layer])).view(-1, 2).unbind(1)
        h = h + linear(3, layer, torch.nn.functional.silu(gate) * up)
    return h, keys, values


def buffers(problem: dict) -> dict:
    """The kernel's per-layer scratch (one flat fp32 buffer, zeroed before each launch) and its counters."""
    hidden, hq, hkv, inter = problem["dims"]
    layers, device = problem["layers"], problem["h"].device
    sizes = {"h": (layers + 1) * hidden, "hmid": layers * hidden, "qkv": layers * (hq + 2 * hkv) * HEAD_DIM,
             "attn": layers * hq * HEAD_DIM, "gu": layers * 2 * inter, "act": layers * inter}
    flat = torch.zeros(sum(sizes.values()), device=device)
    views, at = {"flat": flat}, 0
    for name, size in sizes.items():
        views[name] = flat[at:at + size]
        at += size
    ws, locks = decode_attention.new_workspace(hq, hkv, HEAD_DIM, device)
    views.update(ws=ws, locks=locks, tile_locks=torch.zeros(2 * inter // 16, dtype=torch.int32, device=device),
                 bar=torch.zeros(1, dtype=torch.int32, device=device))
    return views


def run_layers(problem: dict, bufs: dict, keys: torch.Tensor, values: torch.Tensor, programs: int, per_layer: bool,
               block_n: int, warps: int, splits: list[int] | None = None, check_fit: bool = False,
               block_l: int = BLOCK_L, prefetch_mb: float = 0.0) -> None:
    """The layers through layer_kernel: one launch for all, or one per layer. bufs["h"][-hidden:] is the result.
    `check_fit` first compiles the kernel and refuses a grid larger than the GPU holds at once (on a GPU);
    `prefetch_mb`: o's and gate/up's weights the attention phase's idle programs ask the L2 for."""
    hidden, hq, hkv, inter = problem["dims"]
    layers, cache_len, position = problem["layers"], problem["cache_len"], problem["position"]
    window = window_for(position, cache_len)
    chunk_keys = decode_attention.CHUNK if window <= decode_attention.LONG_WINDOW else decode_attention.LONG_CHUNK
    chunk_splits = -(-window // chunk_keys)
    mask = torch.ones(window, dtype=torch.bool, device=keys.device)
    splits = splits or [split_for(n, k, programs, block_n) for k, n in layer_linears(problem["dims"])]
    weights = [t for w, s, o, *_ in problem["chain"] for t in (w, s, o)]
    interpret = os.environ.get("TRITON_INTERPRET") == "1"

    def launch(first: int, count: int, grid: int, warmup: bool = False):
        args = (bufs["h"], bufs["hmid"], bufs["qkv"], bufs["attn"], bufs["gu"], bufs["act"], bufs["bar"], bufs["ws"],
                bufs["locks"], bufs["tile_locks"], keys, values, mask, problem["cos"], problem["sin"], problem["pos"],
                bufs["qkv"], problem["gamma_in"], problem["gamma_post"], problem["ones"], first, count, *weights,
                hidden, inter, *splits, window, chunk_keys, chunk_splits, cache_len, HEAD_DIM ** -0.5, ONE_BITS, EPS,
                units_in(prefetch_mb, block_n))
        options = dict(Q_HEADS=hq, KV_HEADS=hkv, ROWS=attention_rows(hq, hkv), HEAD_DIM=HEAD_DIM, BLOCK_L=block_l,
                       DOT_FP32=interpret, BLOCK_N=block_n, ASM=not interpret, HAS_BIAS=False, num_warps=warps,
                       num_stages=1)
        if warmup:
            return layer_kernel.warmup(*args, grid=(grid,), **options)
        layer_kernel[(grid,)](*args, **options)
    if check_fit and not interpret:  # a grid barrier over more programs than the GPU holds at once never ends
        from bench.persistent_kernels import programs_that_fit

        fits, usage = programs_that_fit(launch(0, layers, 1, warmup=True), warps, keys.device)
        if programs > fits:
            raise ValueError(f"{programs} programs do not fit at once ({fits} do: {usage})")
    bufs["flat"].zero_()
    bufs["h"][:hidden].copy_(problem["h"])
    for first, count in ([(layer, 1) for layer in range(layers)] if per_layer else [(0, layers)]):
        bufs["bar"].zero_()
        launch(first, count, programs)


def separate_step(problem: dict, keys: torch.Tensor, values: torch.Tensor):
    """The app's kernels for the same layers, one after another: the q/k/v GEMV, decode_attention_qkv (rotation,
    cache write, attention), the o, gate/up and down GEMVs (without the norm, residual and SiLU epilogues the
    app folds into them: x is the previous output's first K). Returns the step; it leaves each layer's down output."""
    from models.kernels import int4_triton
    from models.kernels.int4 import new_workspace

    hidden, hq, hkv, inter = problem["dims"]
    chain, position = problem["chain"], problem["position"]
    window = window_for(position, problem["cache_len"])
    mask = torch.ones(window, dtype=torch.bool, device=keys.device)
    pos = torch.tensor([position], device=keys.device)
    workspace = new_workspace(max(n for *_, n in chain), keys.device)
    partials, counters = decode_attention.new_workspace(hq, hkv, HEAD_DIM, keys.device)
    h = problem["h"].to(torch.bfloat16).view(1, -1)

    def run():
        x = h
        for layer in range(problem["layers"]):
            ys = []
            for slot, (w, s, o, k, n) in enumerate(chain):
                if slot == 1:  # attention between q/k/v and o
                    x = decode_attention.decode_attention_qkv(
                        x.view(-1), None, problem["cos"].to(torch.bfloat16), problem["sin"].to(torch.bfloat16), pos,
                        keys[layer:layer + 1], values[layer:layer + 1], mask, HEAD_DIM ** -0.5, hq, partials,
                        counters).view(1, -1)
                x = int4_triton.gemv(x[:, :k], w[layer], s[layer], o[layer], k, workspace)
                ys.append(x)
            x = ys[-1]
        return x
    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="*", default=["1.8b", "7b"])
    p.add_argument("--layers", type=int, default=8, help="layers of weights and caches per step (past the L2)")
    p.add_argument("--position", type=int, default=600, help="the token's position (the window follows from it)")
    p.add_argument("--cache", type=int, default=4160, help="cache positions per layer")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    from bench.int4_kernels import copy_rate, graph_ms
    from models.kernels.int4 import packed_bytes

    gpu = torch.cuda.get_device_name()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    copy = copy_rate()
    rows = []
    for shape in a.shapes:
        problem = make_problem(SHAPES[shape], a.layers, a.cache, a.position, "cuda")
        hidden = problem["dims"][0]
        window = window_for(a.position, a.cache)
        kv_bytes = 2 * problem["dims"][2] * (a.position + 1) * HEAD_DIM * 2
        layer_bytes = sum(packed_bytes(n, k) for k, n in layer_linears(shape)) + kv_bytes

        def emit(variant: str, ms: float, error: float | None, **extra) -> None:
            us = ms * 1e3 / a.layers
            rows.append({"gpu": gpu, "shape": shape, "variant": variant, "us_per_layer": round(us, 2),
                         "layer_mb": round(layer_bytes / 1e6, 2), "of_copy": round(layer_bytes / us / 1e3 / copy, 3),
                         "copy_gbps": round(copy, 1), "position": a.position, "window": window,
                         "max_rel_error": None if error is None else round(error, 5), **extra})
            print(json.dumps(rows[-1]), flush=True)

        keys, values = problem["keys"].clone(), problem["values"].clone()
        emit("the app's kernels one by one (no epilogues)", graph_ms(separate_step(problem, keys, values)), None)
        for block_n, warps in TILES:
            want, want_keys, _ = reference(problem)
            bufs = buffers(problem)
            for programs, per_layer, prefetch in itertools.product((sms, 2 * sms), (True, False), (0.0, PREFETCH_MB)):
                keys, values = problem["keys"].clone(), problem["values"].clone()
                try:
                    run_layers(problem, bufs, keys, values, programs, per_layer, block_n, warps, check_fit=True,
                               prefetch_mb=prefetch)
                    torch.cuda.synchronize()
                except Exception as e:  # noqa: BLE001 - a tile that cannot compile or fit: reported, not fatal
                    print(f"skipped {block_n}/{warps}/{programs}: {type(e).__name__}: {e}"[:300], flush=True)
                    continue
                got = bufs["h"][-hidden:]
                error = ((got - want).abs().max() / want.abs().max()).item()
                keys_error = (keys.float() - want_keys.float()).abs().max().item()
                ms = graph_ms(lambda: run_layers(problem, bufs, keys, values, programs, per_layer, block_n, warps,
                                                 prefetch_mb=prefetch))
                emit(f"persistent, one launch {'per layer' if per_layer else 'for all layers'}"
                     f"{f', L2 asked for {prefetch:.0f} MB' if prefetch else ''}", ms, error,
                     block_n=block_n, warps=warps, programs=programs, cache_error=keys_error, prefetch_mb=prefetch)
        problem = bufs = keys = values = None
        torch.cuda.empty_cache()
    if a.out:
        Path(a.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(table(rows))


def table(rows: list[dict]) -> str:
    """Markdown: per shape, the app's kernels first, then the persistent variants fastest first."""
    lines = []
    for shape in dict.fromkeys(r["shape"] for r in rows):
        mine = [r for r in rows if r["shape"] == shape]
        base = mine[0]["us_per_layer"]
        lines += ["", f"{shape} ({mine[0]['gpu']}): a layer's weights and cache read at position {mine[0]['position']} "
                      f"({mine[0]['layer_mb']} MB), copy rate {mine[0]['copy_gbps']} GB/s", "",
                  "| variant | tile | programs | us per layer | of copy | × the app's kernels | max rel. error |",
                  "|---|---|---|---|---|---|---|"]
        for r in [mine[0]] + sorted(mine[1:], key=lambda r: r["us_per_layer"]):
            tile = f"{r['block_n']}, {r['warps']}" if "block_n" in r else "–"
            error = "–" if r["max_rel_error"] is None else f"{r['max_rel_error']:.4f}"
            lines.append(f"| {r['variant']} | {tile} | {r.get('programs', '–')} | {r['us_per_layer']:.2f} | "
                         f"{100 * r['of_copy']:.0f} % | {base / r['us_per_layer']:.2f} | {error} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
