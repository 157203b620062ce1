"""Probe, second step: whole decoder layers' one-token steps as one persistent kernel, against the app's kernels.

bench/persistent_probe.py asks whether a layer's four GEMVs run faster as one launch with grid barriers.
This asks what a whole layer costs that way, if they do: fused q/k/v, attention (rotation, cache write,
chunks and their merge: models/kernels/decode_attention's code, run per item), o, fused gate/up, down,
with the RMSNorms, the SiLU and the residual adds inside the same launch (BENCHMARKS.md, session 30: the
plan). Five phases a layer, a barrier over the grid after each:

  0 q/k/v   x = the residual h, normalised as it is loaded (each program takes h's RMS from the L2)
  1 attn    items (KV head, chunk) as decode_attention_qkv's programs; also copies h into h_mid
  2 o       x = the attention output; fp32 atomics add W_o x into h_mid (the residual add)
  3 gate/up x = h_mid normalised; the last K slice of each row tile to arrive writes SiLU(gate) * up
            (gate and up rows interleaved by halves of a tile); also copies h_mid into the next h
  4 down    x = SiLU(gate) * up; atomics add W_d x into the next h

Every phase writes a buffer of its own layer (qkv, attn, gu, act, h_mid, h per layer), zeroed before the
launch, so no program ever reads a line another wrote earlier in the launch at the same address (no stale
L1). RMSNorm weights are taken as folded into the weights (the app folds them): the norm is 1/RMS.

Rows: the app's kernels one after another per layer in a CUDA graph (int4 GEMVs and the fused q/k/v
attention, without the epilogues the app folds into them); the persistent kernel, one launch per layer
and one for all layers. Both checked against plain PyTorch (decode_attention.qkv_reference and dequantized
weights).

    python bench/persistent_layer.py [--shapes 1.8b 7b] [--layers 8] [--position 600] [--out results.jsonl]
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

from bench.persistent_probe import _grid_sync, _pick, gemv_items, random_chain, split_for  # noqa: E402
from models.kernels import decode_attention  # noqa: E402
from models.kernels.decode_attention import attend_chunk, rotated_rows, write_token  # noqa: E402
from models.kernels.int4 import dequantize_reference  # noqa: E402
from models.kernels.int4_half2 import H2_X_SCALE_, ONE_TO_H2_ONE  # noqa: E402
from models.kernels.int4_triton import ONE_BITS  # noqa: E402
from models.kernels.split_k import attention_rows  # noqa: E402

PHASES = 5
HEAD_DIM = 128
# Keys per step of the attention's inner loop: 64, not the app kernel's 128. In one kernel with the GEMVs
# (4 warps) a 128-key step spilled 328 bytes on sm_90; 64 spills nothing (255 registers: 2 programs an SM).
BLOCK_L = 64
# (rows, warps) of the GEMV phases: the app's 512- and 256-row tiles at the 4 warps the attention needs
# (at 2 warps its key and value tiles spill 2.6 KB).
TILES = ((512, 4), (256, 4))
EPS = 1e-6
# (hidden, query heads, KV heads, intermediate) of the app's InternLM2 shapes
SHAPES = {"1.8b": (2048, 16, 8, 8192), "7b": (4096, 32, 8, 14336)}


@triton.jit
def _inverse_rms(h_ptr, H, eps, BLOCK: tl.constexpr):
    """1 / RMS(h[0:H]): every program reads h (a few KB, from the L2) after the barrier that completed it."""
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, H, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        v = tl.load(h_ptr + offs, mask=offs < H, other=0.0)
        total += v * v
    return 1.0 / tl.sqrt(tl.sum(total, axis=0) / H + eps)


@triton.jit
def _copy_share(src_ptr, dst_ptr, n, BLOCK: tl.constexpr):
    """dst[0:n] = src[0:n], shared out over the grid."""
    for start in range(tl.program_id(0) * BLOCK, n, tl.num_programs(0) * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        tl.store(dst_ptr + offs, tl.load(src_ptr + offs, mask=offs < n), mask=offs < n)


@triton.jit
def _attention_items(qkv_ptr, k_ptr, v_ptr, mask_ptr, out_ptr, ws_ptr, lock_ptr, cos_ptr, sin_ptr, pos, W,
                     CHUNK_KEYS, SPLITS, stride_kh, stride_kl, scaling, Q_HEADS: tl.constexpr,
                     KV_HEADS: tl.constexpr, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_L: tl.constexpr,
                     DOT_FP32: tl.constexpr):
    """decode_attention_qkv's programs as items (KV head, chunk) of this program: the group's queries rotated,
    the token's key and value written by the item whose chunk holds the position, the chunk attended, and
    the last chunk of a head to finish merging them into out."""
    GROUP: tl.constexpr = Q_HEADS // KV_HEADS
    rg = tl.arange(0, ROWS)
    rd = tl.arange(0, HEAD_DIM)
    cos = tl.load(cos_ptr + rd).to(tl.float32)
    sin = tl.load(sin_ptr + rd).to(tl.float32)
    for item in range(tl.program_id(0), KV_HEADS * SPLITS, tl.num_programs(0)):
        head = item % KV_HEADS
        split = item // KV_HEADS
        q = rotated_rows(qkv_ptr, qkv_ptr, head * GROUP + rg, rg < GROUP, cos, sin, HEAD_DIM, False)
        q = q.to(k_ptr.dtype.element_ty)
        if split == pos // CHUNK_KEYS:
            write_token(qkv_ptr, qkv_ptr, k_ptr, v_ptr, head, pos, cos, sin, stride_kh, stride_kl, stride_kh,
                        stride_kl, Q_HEADS, KV_HEADS, HEAD_DIM, False)
        attend_chunk(q, head, split, k_ptr, v_ptr, mask_ptr, out_ptr, ws_ptr, lock_ptr, W, pos + 1, CHUNK_KEYS,
                     SPLITS, stride_kh, stride_kl, stride_kh, stride_kl, scaling, GROUP, ROWS, HEAD_DIM, BLOCK_L,
                     DOT_FP32)


@triton.jit
def _layer_kernel(h_ptr, hmid_ptr, qkv_ptr, attn_ptr, gu_ptr, act_ptr, bar_ptr, ws_ptr, lock_ptr, tile_lock_ptr,
                  k_ptr, v_ptr, mask_ptr, cos_ptr, sin_ptr, pos, first_layer, layers,
                  wq, sq, oq, wo, so, oo, wg, sg, og, wd, sd, od, H, I, split_q, split_o, split_g, split_d,
                  W, CHUNK_KEYS, SPLITS, cache_len, scaling, one_bits, eps,
                  Q_HEADS: tl.constexpr, KV_HEADS: tl.constexpr, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
                  BLOCK_L: tl.constexpr, DOT_FP32: tl.constexpr, BLOCK_N: tl.constexpr, ASM: tl.constexpr):
    """Layers first_layer .. first_layer + layers - 1, five phases each (the module's docstring), barriers between.

    Per layer l: h [l] in, h [l + 1] out (h: [L + 1, H]); hmid, qkv, attn, gu, act [L, ...]; the caches
    [L, KV_HEADS, cache_len, HEAD_DIM]. Weights stacked by layer as persistent_probe's random_chain makes them."""
    programs = tl.num_programs(0)
    h2_one = one_bits - ONE_TO_H2_ONE
    QKV_N: tl.constexpr = (Q_HEADS + 2 * KV_HEADS) * HEAD_DIM
    ATTN_K: tl.constexpr = Q_HEADS * HEAD_DIM
    stride_kh = cache_len * HEAD_DIM
    for step in range(first_layer * 5, (first_layer + layers) * 5):
        layer = step // 5
        p = step % 5
        h_in = h_ptr + layer * H
        h_mid = hmid_ptr + layer * H
        qkv = qkv_ptr + layer * QKV_N
        attn = attn_ptr + layer * ATTN_K
        gu = gu_ptr + layer * 2 * I
        act = act_ptr + layer * I
        if p == 1:
            cache = layer * KV_HEADS * stride_kh
            _attention_items(qkv, k_ptr + cache, v_ptr + cache, mask_ptr, attn, ws_ptr, lock_ptr, cos_ptr, sin_ptr,
                             pos, W, CHUNK_KEYS, SPLITS, stride_kh, HEAD_DIM, scaling, Q_HEADS, KV_HEADS, ROWS,
                             HEAD_DIM, BLOCK_L, DOT_FP32)
            _copy_share(h_in, h_mid, H, 1024)
        else:
            slot = tl.where(p > 1, p - 1, p)  # phases 0, 2, 3, 4: GEMV slots 0, 1, 2, 3
            n = _pick(slot, QKV_N, H, 2 * I, H)
            k = _pick(slot, H, ATTN_K, H, I)
            words = layer * (k // 8) * n
            pairs = layer * (k // 128) * n
            w = _pick(slot, wq, wo, wg, wd) + words
            s = _pick(slot, sq, so, sg, sd) + pairs
            o = _pick(slot, oq, oo, og, od) + pairs
            split = _pick(slot, split_q, split_o, split_g, split_d)
            x = _pick(slot, h_in, attn, h_mid, act)
            y = _pick(slot, qkv, h_mid, gu, h_ptr + (layer + 1) * H)
            x_scale = tl.full([], H2_X_SCALE_, tl.float32)
            if slot == 0 or slot == 2:  # the RMSNorm before q/k/v and before gate/up, on load
                x_scale = H2_X_SCALE_ * _inverse_rms(x, H, eps, 1024)
            gemv_items(x, x_scale, w, s, o, y, n, k, split, h2_one, slot == 2, act, tile_lock_ptr, BLOCK_N, ASM)
            if slot == 2:
                _copy_share(h_mid, h_ptr + (layer + 1) * H, H, 1024)
        if step + 1 < (first_layer + layers) * 5:
            _grid_sync(bar_ptr, (step + 1 - first_layer * 5) * programs)


def layer_linears(shape: str) -> list[tuple[int, int]]:
    """(K, N) of a layer's four GEMVs: fused q/k/v, o, fused gate/up, down."""
    hidden, hq, hkv, inter = SHAPES[shape] if isinstance(shape, str) else shape
    return [(hidden, (hq + 2 * hkv) * HEAD_DIM), (hq * HEAD_DIM, hidden), (hidden, 2 * inter), (inter, hidden)]


def make_problem(dims: tuple[int, int, int, int], layers: int, cache_len: int, position: int, device: str,
                 seed: int = 0) -> dict:
    """Random weights, caches (stale entries past the position large: never to be attended), a residual h
    and the step's rotation, for `layers` layers of (hidden, query heads, KV heads, intermediate)."""
    hidden, hq, hkv, inter = dims
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(layers, hkv, cache_len, HEAD_DIM, generator=gen)
    values = torch.randn(layers, hkv, cache_len, HEAD_DIM, generator=gen)
    keys[:, :, position:] *= 50
    values[:, :, position:] *= 50
    freqs = 1.0 / 10000 ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM)
    angles = torch.cat([position * freqs, position * freqs])
    return {"dims": dims, "layers": layers, "cache_len": cache_len, "position": position,
            "chain": random_chain(layer_linears(dims), layers, device, seed),
            "keys": keys.to(torch.bfloat16).to(device), "values": values.to(torch.bfloat16).to(device),
            "h": torch.randn(hidden, generator=gen).to(device),
            "cos": angles.cos().to(device), "sin": angles.sin().to(device)}


def window_for(position: int, cache_len: int) -> int:
    """The attention window decode runs at `position`: the smallest power of two from 512 holding it, or the cache."""
    window = 512
    while window <= position:
        window *= 2
    return min(window, cache_len)


def reference(problem: dict, block_n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(h after the layers, the caches after them) in plain PyTorch; gate/up rows interleaved by halves of
    `block_n`-row tiles, as the kernel reads them."""
    hidden, hq, hkv, inter = problem["dims"]
    keys, values = problem["keys"].clone(), problem["values"].clone()
    position = torch.tensor([problem["position"]], device=keys.device)
    window = window_for(problem["position"], problem["cache_len"])
    mask = torch.ones(window, dtype=torch.bool, device=keys.device)
    h = problem["h"].float()

    def linear(slot: int, layer: int, x: torch.Tensor) -> torch.Tensor:
        w, s, o, k, _ = problem["chain"][slot]
        return dequantize_reference(w[layer], s[layer], o[layer], k, torch.float32) @ x

    def normed(x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.square().mean() + EPS)
    for layer in range(problem["layers"]):
        qkv = linear(0, layer, normed(h))
        attn = decode_attention.qkv_reference(qkv, None, problem["cos"], problem["sin"], position,
                                              keys[layer:layer + 1], values[layer:layer + 1], mask, HEAD_DIM ** -0.5,
                                              hq)
        h = h + linear(1, layer, attn.float().view(-1))
        gate, up = linear(2, layer, normed(h)).view(-1, 2, block_n // 2).unbind(1)
        h = h + linear(3, layer, (torch.nn.functional.silu(gate) * up).reshape(-1))
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
               block_l: int = BLOCK_L) -> None:
    """The layers through _layer_kernel: one launch for all, or one per layer. bufs["h"][-hidden:] is the result.
    `check_fit` first compiles the kernel and refuses a grid larger than the GPU holds at once (on a GPU)."""
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
                bufs["locks"], bufs["tile_locks"], keys, values, mask, problem["cos"], problem["sin"], position, first,
                count, *weights, hidden, inter, *splits, window, chunk_keys, chunk_splits, cache_len, HEAD_DIM ** -0.5,
                ONE_BITS, EPS)
        options = dict(Q_HEADS=hq, KV_HEADS=hkv, ROWS=attention_rows(hq, hkv), HEAD_DIM=HEAD_DIM, BLOCK_L=block_l,
                       DOT_FP32=interpret, BLOCK_N=block_n, ASM=not interpret, num_warps=warps, num_stages=1)
        if warmup:
            return _layer_kernel.warmup(*args, grid=(grid,), **options)
        _layer_kernel[(grid,)](*args, **options)
    if check_fit and not interpret:  # a grid barrier over more programs than the GPU holds at once never ends
        from bench.persistent_probe import programs_that_fit

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
            want, want_keys, _ = reference(problem, block_n)
            bufs = buffers(problem)
            for programs in (sms, 2 * sms, 4 * sms):
                for per_layer in (True, False):
                    keys, values = problem["keys"].clone(), problem["values"].clone()
                    try:
                        run_layers(problem, bufs, keys, values, programs, per_layer, block_n, warps, check_fit=True)
                        torch.cuda.synchronize()
                    except Exception as e:  # noqa: BLE001 - a tile that cannot compile or fit: reported, not fatal
                        print(f"skipped {block_n}/{warps}/{programs}: {type(e).__name__}: {e}"[:300], flush=True)
                        continue
                    got = bufs["h"][-hidden:]
                    error = ((got - want).abs().max() / want.abs().max()).item()
                    keys_error = (keys.float() - want_keys.float()).abs().max().item()
                    ms = graph_ms(lambda: run_layers(problem, bufs, keys, values, programs, per_layer, block_n, warps))
                    emit(f"persistent, one launch {'per layer' if per_layer else 'for all layers'}", ms, error,
                         block_n=block_n, warps=warps, programs=programs, cache_error=keys_error)
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
