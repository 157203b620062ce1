"""InternLM2.5-7B-shaped checkpoint in InternLM2's own format: conversion time and peak RAM,
then a 4-bit load under an 8 GiB GPU budget through the app's engine (run on the GPU machine).

The checkpoint has random weights under the real key names and fused wqkv layout, in
8 shards like the hub's, with a small trained sentencepiece tokenizer (the vocabulary
size only changes the embedding's size, which is the real one). Conversion runs in a
child process so its peak RSS (ru_maxrss) is its own; the baseline is the child's RSS
after imports, so "extra" is what converting added, to compare with the largest shard.

    python bench/internlm2_convert.py --workdir /tmp/ilm --out results.jsonl
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
GiB = 1024**3
MiB = 1024**2


def write_checkpoint(folder: Path, shards: int = 8, layers: int | None = None) -> Path:
    """A 7B-shaped InternLM2 folder, written shard by shard (never the whole model in RAM)."""
    import torch
    from safetensors.torch import save_file

    from internlm2_fixture import write_internlm2_checkpoint
    from models.catalog import load_catalog

    shape = load_catalog().get("internlm2.5-7b-chat").shape
    if layers:  # a quick check of this script on a small machine
        from dataclasses import replace

        shape = replace(shape, num_layers=layers)
    h, heads, kv, inter = shape.hidden_size, shape.num_heads, shape.num_kv_heads, shape.intermediate_size
    head_dim = h // heads
    # Tokenizer and config files from the test fixture (a tiny one-tensor state keeps it cheap).
    dims = dict(hidden_size=h, intermediate_size=inter, num_hidden_layers=shape.num_layers,
                num_attention_heads=heads, num_key_value_heads=kv, vocab_size=shape.vocab_size,
                max_position_embeddings=shape.max_context)
    write_internlm2_checkpoint(folder, {**dims, "vocab_size": 512}, num_shards=1, state={"placeholder": torch.zeros(1)},
                               rope_scaling={"type": "dynamic", "factor": 2.0}, torch_dtype="bfloat16")
    (folder / "model.safetensors").unlink()
    # The tokenizer is trained small; the embedding has the real vocabulary's rows (as padded hub models do).
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "vocab_size": shape.vocab_size}, indent=2))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=device).manual_seed(0)

    def w(*size):
        return (torch.randn(*size, generator=gen, device=device) * 0.02).to(torch.bfloat16).cpu()

    layers_per_shard = -(-shape.num_layers // shards)
    weight_map = {}
    for s in range(shards):
        part = {}
        if s == 0:
            part["model.tok_embeddings.weight"] = w(shape.vocab_size, h)
        for i in range(s * layers_per_shard, min(shape.num_layers, (s + 1) * layers_per_shard)):
            p = f"model.layers.{i}."
            part[p + "attention.wqkv.weight"] = w(kv * (heads // kv + 2) * head_dim, h)
            part[p + "attention.wo.weight"] = w(h, h)
            part[p + "feed_forward.w1.weight"] = w(inter, h)
            part[p + "feed_forward.w3.weight"] = w(inter, h)
            part[p + "feed_forward.w2.weight"] = w(h, inter)
            part[p + "attention_norm.weight"] = torch.ones(h, dtype=torch.bfloat16)
            part[p + "ffn_norm.weight"] = torch.ones(h, dtype=torch.bfloat16)
        if s == shards - 1:
            part["model.norm.weight"] = torch.ones(h, dtype=torch.bfloat16)
            part["output.weight"] = w(shape.vocab_size, h)
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file(part, folder / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
        del part
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def convert_child(src: str, cache: str, out: str) -> None:
    """Convert in this process and report time and RSS (runs as a child)."""
    import psutil

    from models.internlm2 import ensure_converted

    baseline = psutil.Process().memory_info().rss
    anon_base = _anon_bytes()
    peak_anon = [anon_base]
    done = threading.Event()

    def sample() -> None:  # anonymous memory is what conversion needs; mapped shard pages are page cache
        while not done.wait(0.02):
            peak_anon[0] = max(peak_anon[0], _anon_bytes())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    dest = ensure_converted(Path(src), Path(cache))
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    largest = max(p.stat().st_size for p in Path(src).glob("*.safetensors"))
    Path(out).write_text(json.dumps({"convert_s": seconds, "peak_rss": peak, "baseline_rss": baseline,
                                     "extra_rss": peak - baseline, "extra_anon": peak_anon[0] - anon_base,
                                     "largest_shard": largest, "dest": str(dest)}))


def _anon_bytes() -> int:
    """This process's anonymous resident memory (RssAnon), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def load_4bit(src: str, cache_dir: Path, budget_gib: float) -> dict:
    """Load the converted model in 4-bit under the budget, answer briefly, read the VRAM panel."""
    import torch

    from models.catalog import load_catalog
    from models.engine import Engine
    from models.generation import SamplingSettings
    from models.loading import LoadSettings
    from models.quant import Quant

    engine = Engine(load_catalog(), cache_dir=cache_dir)  # finds the conversion made above
    settings = LoadSettings(quant=Quant.NF4, gpu_budget_bytes=int(budget_gib * GiB), context_tokens=4096)
    _, plan = engine.plan(src, settings)
    loaded = engine.load(src, settings).loaded
    final = list(engine.chat([{"role": "user", "content": "Hello world"}],
                             SamplingSettings(max_new_tokens=32, temperature=0), threading.Event()))[-1]
    snap = engine.memory()
    free, total = torch.cuda.mem_get_info()
    return {"verdict": plan.verdict, "predicted_peak": plan.predicted_peak_bytes, "measured_peak": snap.peak,
            "weights": loaded.weights_bytes, "load_s": loaded.load_seconds, "split": loaded.split,
            "decode_tok_s": final.stats.decode_tokens_per_s, "new_tokens": final.stats.new_tokens,
            "panel": {"weights": snap.weights, "kv": snap.kv_cache, "other_allocator": snap.other_allocator,
                      "runtime": snap.runtime, "others": snap.other_processes, "free": snap.free},
            "mem_get_info_used": total - free, "device": torch.cuda.get_device_name()}


def main() -> None:
    """Command-line entry point."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="/tmp/smallchat-internlm2")
    p.add_argument("--budget", type=float, default=8.0)
    p.add_argument("--out", default="internlm2_convert.jsonl")
    p.add_argument("--child", nargs=3, metavar=("SRC", "CACHE", "OUT"))
    p.add_argument("--layers", type=int, help="fewer layers, to try the script on a small machine")
    args = p.parse_args()
    if args.child:
        convert_child(*args.child)
        return
    work = Path(args.workdir)
    src = work / "internlm2_5-7b-shaped"
    t0 = time.perf_counter()
    write_checkpoint(src, layers=args.layers)
    print(f"wrote {src} in {time.perf_counter() - t0:.0f} s", flush=True)
    report = work / "convert.json"
    converted = work / "cache" / "converted"  # where the engine looks, given cache_dir=work/cache
    subprocess.run([sys.executable, __file__, "--child", str(src), str(converted), str(report)], check=True)
    row = json.loads(report.read_text())
    # A second call must go straight to the cache.
    t0 = time.perf_counter()
    from models.internlm2 import ensure_converted

    ensure_converted(src, converted)
    row["cached_s"] = time.perf_counter() - t0
    import torch

    if torch.cuda.is_available():
        row["load_4bit"] = load_4bit(str(src), work / "cache", args.budget)
    with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(f"convert {row['convert_s']:.1f} s (cached: {row['cached_s']:.2f} s); peak RSS {row['peak_rss'] / GiB:.2f} GiB, "
          f"{row['extra_rss'] / GiB:.2f} GiB above the process baseline (anonymous: {row['extra_anon'] / GiB:.2f} GiB); largest shard {row['largest_shard'] / GiB:.2f} GiB")
    if "load_4bit" in row:
        r = row["load_4bit"]
        print(f"4-bit under {args.budget} GiB: {r['verdict']}, predicted peak {r['predicted_peak'] / MiB:.0f} MiB, "
              f"measured {r['measured_peak'] / MiB:.0f} MiB, weights {r['weights'] / MiB:.0f} MiB, load {r['load_s']:.1f} s, "
              f"{r['decode_tok_s'] or 0:.1f} tok/s, split {r['split']}")


if __name__ == "__main__":
    main()
