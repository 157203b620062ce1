"""A layer's q/k/v GEMV and attention as one kernel (bench/qkv_attention_kernel.py) against the two kernels it replaces.

Per head layout (1.8B 2048 / 16 / 8, 7B 4096 / 32 / 8) and window, one CUDA graph runs the op for every layer of a
step, each layer with weights and a cache of its own (as decode does: they do not fit in the L2), and is replayed.
The two-kernel path runs the app's q/k/v GEMV (int4_linear_scaled with the folded norm's scale) with the best of
every tile that fits (timed here, as the app's tile chooser does) and then decode_attention_qkv (on Hopper the
cluster kernel where it applies). Each row is checked against the two-kernel path first.

    python bench/qkv_attention.py [--windows 1024 4096] [--out rows.jsonl]
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

from bench.int4_kernels import graph_ms  # noqa: E402
from bench import qkv_attention_kernel as attention_qkv  # noqa: E402
from models.kernels import decode_attention, int4_triton  # noqa: E402
from models.kernels.int4 import new_workspace, quantize  # noqa: E402

LAYOUTS = {"1.8B": (2048, 16, 8, 24), "7B": (4096, 32, 8, 32)}  # hidden, query heads, KV heads, layers
D = 128


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--windows", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--out", default=None)
    a = p.parse_args()
    gpu = torch.cuda.get_device_name()
    print(f"# {gpu}; torch {torch.__version__}", flush=True)
    rows = []
    for name, (hidden, hq, hkv, layers) in LAYOUTS.items():
        gen = torch.Generator(device="cuda").manual_seed(0)
        n = (hq + 2 * hkv) * D
        packed = [quantize((torch.randn(n, hidden, device="cuda", generator=gen) / hidden ** 0.5).to(torch.bfloat16))
                  for _ in range(layers)]
        length = max(a.windows) + 64
        keys = [torch.randn(1, hkv, length, D, device="cuda", generator=gen).to(torch.bfloat16) for _ in range(layers)]
        values = [torch.randn_like(k) for k in keys]
        x = torch.randn(1, hidden, device="cuda", generator=gen).to(torch.bfloat16)
        sums = torch.full((16,), hidden / 16, device="cuda")
        angle = torch.rand(D // 2, device="cuda", generator=gen) * 6.28
        cos, sin = (torch.cat([f(angle)] * 2).to(torch.bfloat16) for f in (torch.cos, torch.sin))
        split_ws, attention_ws = new_workspace(n, "cuda"), decode_attention.new_workspace(hq, hkv, D, "cuda")
        tiles = [t for t in range(int4_triton.tile_count()) if _fits(t, n)]
        for window in a.windows:
            mask = torch.ones(window, dtype=torch.bool, device="cuda")
            position = torch.tensor([window - window // 4 + 88], device="cuda")

            def step(tile):
                return lambda: [attention_qkv.qkv_attention(
                    x, *packed[i], hidden, *split_ws, tile, sums, 1e-6, None, cos, sin, position, keys[i], values[i],
                    mask, D ** -0.5, hq, *attention_ws) for i in range(layers)]
            fused_out = step(0)()[0].float()
            os.environ[attention_qkv.ENV] = "0"
            separate = {t: graph_ms(step(t), 30) * 1e3 / layers for t in tiles}
            best = min(separate, key=separate.get)
            want = step(best)()[0].float()
            os.environ[attention_qkv.ENV] = "1"
            fused_us = graph_ms(step(0), 30) * 1e3 / layers
            row = {"gpu": gpu, "layout": name, "window": window, "position": int(position), "fused_us": round(fused_us, 2),
                   "separate_best_us": round(separate[best], 2), "best_tile": best,
                   "speedup": round(separate[best] / fused_us, 2),
                   "rel_err": round(float((fused_out - want).abs().max() / want.abs().max()), 5),
                   "separate_us_by_tile": {t: round(v, 2) for t, v in separate.items()}}
            rows.append(row)
            print(json.dumps(row), flush=True)
    if a.out:
        Path(a.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    print("| layout | window | position | GEMV + attention µs a layer (best tile) | one kernel µs | × | error |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['layout']} | {r['window']} | {r['position']} | {r['separate_best_us']} ({r['best_tile']}) | "
              f"{r['fused_us']} | {r['speedup']} | {r['rel_err']} |")


def _fits(tile: int, n: int) -> bool:
    from models.kernels import int4_mma
    from models.kernels.split_k import split_fits

    config = int4_triton.tile_config(tile)
    if "MMA" in config:
        return int4_mma.tile_fits(config["MMA"], n, torch.device("cuda", torch.cuda.current_device()))
    return split_fits(config["SPLIT"], n)


if __name__ == "__main__":
    main()
