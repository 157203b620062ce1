"""Decode attention per layer: the fused kernel against the plain form, eager and compiled, in CUDA graphs.

For each model's head layout (InternLM2.5-7B 32/8, InternLM2-1.8B 16/8, Qwen2.5-7B 28/4; head dim
128) and window (512 ... 4,096 positions, all attended), one CUDA graph runs the attention of every
layer of a step, each layer over a cache of its own (as decode does: the caches do not fit in L2),
and is replayed; the table gives microseconds per layer and the keys/values' bytes over that time
against the device-to-device copy rate measured in the same run.

  plain     the matmul / softmax / matmul form as the uncompiled step runs it (models/attention.py)
  compiled  the same, through torch.compile (Inductor fuses the softmax and its casts)
  fused     kernels/decode_attention.py: one kernel

    python bench/decode_attention.py --out results.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.decode_speed import copy_bandwidth  # noqa: E402
from bench.int4_kernels import graph_ms  # noqa: E402
from models.kernels import decode_attention as fused  # noqa: E402

LAYOUTS = {"7B": (32, 8, 32), "1.8B": (16, 8, 24), "Qwen-7B": (28, 4, 28)}  # query heads, KV heads, layers
HEAD_DIM = 128


def graph_us(fn, layers: int, reps: int = 50) -> float:
    """Microseconds per layer of `fn(layer)` for every layer, captured as one CUDA graph and replayed."""
    return graph_ms(lambda: [fn(i) for i in range(layers)], reps) * 1e3 / layers


def step_inputs(hq: int, hkv: int, layers: int, length: int):
    """A query, per-layer keys and values of `length` positions (bf16, random) and a workspace."""
    keys = [torch.randn(1, hkv, length, HEAD_DIM, device="cuda", dtype=torch.bfloat16) for _ in range(layers)]
    values = [torch.randn_like(k) for k in keys]
    query = torch.randn(1, hq, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    return query, keys, values, fused.new_workspace(hq, hkv, HEAD_DIM, "cuda")


def sweep(args) -> None:
    """Microseconds per layer of each tile of the fused kernel, per layout and window; the best first."""
    import itertools

    gpu = torch.cuda.get_device_name()
    results = []
    for name, (hq, hkv, layers) in LAYOUTS.items():
        query, keys, values, workspace = step_inputs(hq, hkv, layers, max(args.windows) + 64)
        for window in args.windows:
            mask = torch.arange(window, device="cuda") < window
            ref = fused.reference(query, keys[0], values[0], mask, 0.1).float()
            timed = []
            for chunk, block, warps, stages in itertools.product((64, 128, 256), (32, 64, 128), (2, 4, 8), (1, 2)):
                if block > chunk or window // chunk > fused.MAX_SPLITS:
                    continue
                tile = dict(chunk=chunk, block_l=block, num_warps=warps, num_stages=stages)
                got = fused._run_kernel(query, keys[0], values[0], mask, 0.1, *workspace, **tile).float()
                assert float((got - ref).abs().max() / ref.abs().max()) < 2e-2, tile
                us = graph_us(lambda i: fused._run_kernel(query, keys[i], values[i], mask, 0.1, *workspace, **tile),
                              layers, reps=20)
                timed.append((us, tile))
            timed.sort(key=lambda t: t[0])
            app = next(us for us, t in timed if t == dict(chunk=fused.splits_for(window)[1], block_l=fused.BLOCK_L,
                                                          num_warps=fused.NUM_WARPS, num_stages=fused.NUM_STAGES))
            print(f"{gpu} {name} window {window}: app tile {app:.2f} us; best " +
                  "; ".join(f"{us:.2f} {t}" for us, t in timed[:5]), flush=True)
            results.append({"gpu": gpu, "model": name, "window": window, "app_us": app,
                            "tiles": [{"us": round(us, 2), **t} for us, t in timed]})
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


def main() -> None:
    """Command-line entry point: the table on stdout, rows as JSON to --out."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--windows", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    p.add_argument("--out")
    p.add_argument("--sweep", action="store_true", help="time the kernel's tiles (chunk, block, warps, stages) instead")
    args = p.parse_args()
    if args.sweep:
        return sweep(args)
    copy_gbps = copy_bandwidth()
    gpu = torch.cuda.get_device_name()
    print(f"{gpu}; copy rate {copy_gbps:.0f} GB/s")
    print("| model | window | plain us | compiled us | fused us | fused vs plain / compiled | fused GB/s (of copy) |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    compiled_reference = torch.compile(fused.reference, dynamic=True)
    for name, (hq, hkv, layers) in LAYOUTS.items():
        query, keys, values, workspace = step_inputs(hq, hkv, layers, max(args.windows) + 64)
        scale = HEAD_DIM**-0.5
        for window in args.windows:
            mask = torch.arange(window, device="cuda") < window  # the whole window attended
            ref = fused.reference(query, keys[0], values[0], mask, scale).float()
            got = fused._run_kernel(query, keys[0], values[0], mask, scale, *workspace).float()
            err = float((got - ref).abs().max() / ref.abs().max())
            times = {
                "plain": graph_us(lambda i: fused.reference(query, keys[i], values[i], mask, scale), layers),
                "compiled": graph_us(lambda i: compiled_reference(query, keys[i], values[i], mask, scale), layers),
                "fused": graph_us(lambda i: fused._run_kernel(query, keys[i], values[i], mask, scale, *workspace),
                                  layers),
            }
            nbytes = 2 * hkv * window * HEAD_DIM * 2
            gbps = nbytes / times["fused"] / 1e3
            row = {"gpu": gpu, "model": name, "window": window, **{f"{k}_us": round(v, 2) for k, v in times.items()},
                   "fused_gbps": round(gbps), "of_copy": round(gbps / copy_gbps, 3), "max_rel_err": err,
                   "copy_gbps": round(copy_gbps)}
            rows.append(row)
            print(f"| {name} | {window} | {times['plain']:.2f} | {times['compiled']:.2f} | {times['fused']:.2f} | "
                  f"{times['plain'] / times['fused']:.2f}x / {times['compiled'] / times['fused']:.2f}x | "
                  f"{gbps:.0f} ({gbps / copy_gbps:.0%}) |", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
