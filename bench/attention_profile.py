"""The q/k/v decode attention as decode runs it, timed and (under ncu) profiled: why a layer takes ~11 us.

For the 7B's and 1.8B's head layouts, at a token position in a window (600 in 1,024: what decode_speed's
step measures; 3,000 in 4,096), the kernel runs over a cache per layer in one CUDA graph (microseconds a
layer), then, with --ncu-region, one launch of each between cudaProfilerStart/Stop for
`ncu --profile-from-start off` to read its counters (stall reasons, occupancy, DRAM throughput).

    python bench/attention_profile.py
    ncu --profile-from-start off --section WarpStateStats ... python bench/attention_profile.py --ncu-region
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.decode_attention import HEAD_DIM, LAYOUTS, graph_us  # noqa: E402
from models.kernels import decode_attention as fused  # noqa: E402

CASES = [(600, 1024), (3000, 4096)]  # (token position, window)
CACHE = 4096 + 64
SHAPES = ("7B", "1.8B")  # of bench/decode_attention.py's head layouts


def layer_inputs(hq: int, hkv: int, position: int, window: int) -> dict:
    """One layer's arguments of decode_attention_qkv: a random q/k/v row, a filled cache, the window's mask."""
    d = HEAD_DIM
    shape = (1, hkv, CACHE, d)
    return dict(qkv=torch.randn((hq + 2 * hkv) * d, device="cuda", dtype=torch.bfloat16),
                bias=None, cos=torch.rand(d, device="cuda", dtype=torch.bfloat16),
                sin=torch.rand(d, device="cuda", dtype=torch.bfloat16),
                position=torch.tensor([position], device="cuda"),
                key=torch.randn(shape, device="cuda", dtype=torch.bfloat16),
                value=torch.randn(shape, device="cuda", dtype=torch.bfloat16),
                mask=torch.ones(window, device="cuda", dtype=torch.bool), scaling=d ** -0.5, query_heads=hq)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ncu-region", action="store_true")
    a = p.parse_args()
    print(json.dumps({"gpu": torch.cuda.get_device_name()}), flush=True)
    for name in SHAPES:
        hq, hkv, layers = LAYOUTS[name]
        workspace = fused.new_workspace(hq, hkv, HEAD_DIM, "cuda")
        for position, window in CASES:
            inputs = [layer_inputs(hq, hkv, position, window) for _ in range(layers)]
            run = [lambda args=args: fused.decode_attention_qkv(**args, partials=workspace[0], counters=workspace[1])
                   for args in inputs]
            run[0]()  # compiled outside the region
            torch.cuda.synchronize()
            if a.ncu_region:
                torch.cuda.cudart().cudaProfilerStart()
                run[1]()
                torch.cuda.synchronize()
                torch.cuda.cudart().cudaProfilerStop()
                print(json.dumps({"layout": name, "position": position, "window": window, "profiled": True}), flush=True)
                continue
            us = graph_us(lambda i: run[i](), layers)
            splits, chunk = fused.splits_for(window)
            print(json.dumps({"layout": name, "position": position, "window": window, "chunks": splits,
                              "keys_per_chunk": chunk, "us_per_layer": round(us, 2)}), flush=True)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
