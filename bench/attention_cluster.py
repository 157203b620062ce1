"""The decode step's attention: the cluster kernel (attention_cluster.py) against the Triton kernel it replaces.

For each head layout and window, one CUDA graph runs decode_attention_qkv's work (bias, rotation, the token's
key and value written, attention over the positions up to it) for every layer of a step, each layer over a
cache of its own (as decode does: the caches do not fit in the L2), and is replayed. Positions: the middle of
the window's upper half (a chat that has grown into it) and its last. Each kernel is checked against the
plain form (decode_attention.qkv_reference) on one layer first.

    python bench/attention_cluster.py [--windows 512 1024 2048 4096 8192] [--out rows.jsonl]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.int4_kernels import graph_ms  # noqa: E402
from models.kernels import attention_cluster, decode_attention  # noqa: E402

# query heads, KV heads, layers
LAYOUTS = {"1.8B": (16, 8, 24), "7B": (32, 8, 32), "Qwen-7B": (28, 4, 28), "Qwen-1.5B": (12, 2, 28),
           "InternLM3-8B": (32, 2, 48)}
HEAD_DIM = 128


def inputs(hq: int, hkv: int, layers: int, length: int, bias: bool):
    """Per-layer caches (bf16, random), one token's q/k/v and its bias, a rotation, the Triton kernel's workspace."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    keys = [torch.randn(1, hkv, length, HEAD_DIM, device="cuda", generator=gen).to(torch.bfloat16)
            for _ in range(layers)]
    values = [torch.randn_like(k) for k in keys]
    width = (hq + 2 * hkv) * HEAD_DIM
    qkv = torch.randn(width, device="cuda", generator=gen).to(torch.bfloat16)
    b = (0.3 * torch.randn(width, device="cuda", generator=gen)).to(torch.bfloat16) if bias else None
    angle = torch.rand(HEAD_DIM // 2, device="cuda", generator=gen) * 6.28
    cos, sin = (torch.cat([f(angle)] * 2).to(torch.bfloat16) for f in (torch.cos, torch.sin))
    return keys, values, qkv, b, cos, sin, decode_attention.new_workspace(hq, hkv, HEAD_DIM, "cuda")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--windows", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    p.add_argument("--layouts", nargs="*", default=list(LAYOUTS))
    p.add_argument("--variants", nargs="*", default=[], metavar="WARPS,CLUSTER",
                   help="also time the cluster kernel with these (warps a block, blocks a KV head)")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    gpu = torch.cuda.get_device_name()
    print(f"# {gpu}; torch {torch.__version__}", flush=True)
    rows = []
    for name in a.layouts:
        hq, hkv, layers = LAYOUTS[name]
        keys, values, qkv, bias, cos, sin, ws = inputs(hq, hkv, layers, max(a.windows) + 64, name.startswith("Qwen"))
        scale = HEAD_DIM ** -0.5
        for window in a.windows:
            mask = torch.ones(window, dtype=torch.bool, device="cuda")
            for pos in (window // 2 + window // 4 + 88 if window > 512 else 300, window - 1):
                position = torch.tensor([pos], device="cuda")
                kernels = {
                    "triton": lambda i: decode_attention._run_qkv_kernel(
                        qkv, bias, cos, sin, position, keys[i], values[i], mask, scale, hq, *ws),
                    "cluster": lambda i: attention_cluster.attention_qkv(
                        qkv, bias, cos, sin, position, keys[i], values[i], mask, scale, hq)}
                for variant in a.variants:
                    warps, cluster = map(int, variant.split(","))
                    kernels[f"cluster_{warps}x{cluster}"] = lambda i, w=warps, c=cluster: attention_cluster.attention_qkv(
                        qkv, bias, cos, sin, position, keys[i], values[i], mask, scale, hq, w, c)
                k_ref, v_ref = keys[0].clone(), values[0].clone()
                ref = decode_attention.qkv_reference(qkv, bias, cos, sin, position, k_ref, v_ref, mask, scale, hq)
                row = {"gpu": gpu, "layout": name, "window": window, "position": pos}
                for kind, run in kernels.items():
                    got = run(0).float()
                    row[f"{kind}_err"] = round(float((got - ref.float()).abs().max() / ref.float().abs().max()), 5)
                    row[f"{kind}_us"] = round(graph_ms(lambda: [run(i) for i in range(layers)], 30) * 1e3 / layers, 2)
                row["taken"] = attention_cluster.takes(qkv, bias, cos, position, keys[0], values[0], mask, hq)
                if "cluster_us" in row:
                    row["speedup"] = round(row["triton_us"] / row["cluster_us"], 2)
                rows.append(row)
                print(json.dumps(row), flush=True)
        keys = values = None
        torch.cuda.empty_cache()
    if a.out:
        Path(a.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    extra = [f"cluster_{v.replace(',', 'x')}" for v in a.variants]
    print("| layout | window | position | Triton µs a layer | cluster µs | × | errors (Triton / cluster) | taken |"
          + "".join(f" {e} µs |" for e in extra))
    print("|---|---|---|---|---|---|---|---|" + "---|" * len(extra))
    for r in rows:
        print(f"| {r['layout']} | {r['window']} | {r['position']} | {r['triton_us']} | {r.get('cluster_us', '–')} | "
              f"{r.get('speedup', '–')} | {r['triton_err']} / {r.get('cluster_err', '–')} | {r['taken']} |"
              + "".join(f" {r.get(e + '_us', '–')} |" for e in extra))


if __name__ == "__main__":
    main()
