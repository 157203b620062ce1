"""Predicted vs measured peak VRAM, per model shape and quantization (run on the GPU machine).

For InternLM2-1.8B- and InternLM2.5-7B-shaped random-weight checkpoints, at each
quantization, each config in a fresh process (as a user starting the app):
  predicted = the app's fit plan (weights + KV cache + workspace + CUDA context)
  measured  = GPU memory this process holds at its peak: torch's peak reserved pool
              + what the process holds outside torch (CUDA context, kernels), read from
              cudaMemGetInfo against the device's use before the process started.
Also loads the 7B 4-bit under an 8 GiB budget and prints the VRAM panel's figures
beside torch.cuda.mem_get_info, and 7B fp16 offloaded under 8 GiB.

    python bench/gpu_memory.py --out results.jsonl     # prints a table at the end
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {"1.8b": "internlm2-chat-1.8b", "7b": "internlm2.5-7b-chat", "qwen7b": "qwen2.5-7b-instruct"}
MiB = 1024**2
GiB = 1024**3


def measure(folder: str, quant: str, contexts: list[int], budget_gib: float | None, new_tokens: int) -> list[dict]:
    """Load once, then for each context length: prefill + decode, and compare peak with the plan."""
    import torch
    from transformers import DynamicCache

    from models.catalog import load_catalog
    from models.engine import Engine
    from models.generation import SamplingSettings, stream_generate
    from models.loading import LoadSettings
    from models.quant import Quant

    engine = Engine(load_catalog())
    baseline = engine._baseline_used  # device use before this process touched the GPU
    budget = int(budget_gib * GiB) if budget_gib else None
    settings = LoadSettings(quant=Quant(quant), context_tokens=max(contexts), gpu_budget_bytes=budget)
    runtime_at_start = engine.cuda_runtime_bytes()
    plans = {c: engine.plan(folder, LoadSettings(**{**settings.__dict__, "context_tokens": c}))[1] for c in contexts}
    started = time.perf_counter()
    report = engine.load(folder, settings)
    load_s = time.perf_counter() - started
    loaded = report.loaded
    after_load = {"allocated": torch.cuda.memory_allocated(), "reserved": torch.cuda.memory_reserved(),
                  "max_reserved": torch.cuda.max_memory_reserved()}
    rows = []
    for context in contexts:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        ids = torch.randint(0, loaded.shape.vocab_size - 2, (context - new_tokens,)).tolist()
        cache = DynamicCache(config=loaded.model.config)
        final = list(stream_generate(loaded.model, loaded.tokenizer, ids,
                                     SamplingSettings(max_new_tokens=new_tokens, temperature=0),
                                     threading.Event(), cache))[-1]
        torch.cuda.synchronize()
        free, total = torch.cuda.mem_get_info()
        snap = engine.memory()
        # Outside torch's pool (CUDA context, kernel images, cuBLAS): NVML's figure for this
        # process minus torch's reserved bytes, as the VRAM panel shows it.
        runtime = snap.runtime
        kv = sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers)
        peak = torch.cuda.max_memory_reserved() + runtime
        plan = plans[context]
        rows.append({
            "shape": loaded.shape.num_layers, "quant": quant, "budget_gib": budget_gib, "context": context,
            "verdict": plan.verdict, "gpu_layers": loaded.split["gpu"], "cpu_layers": loaded.split["cpu"],
            "predicted_peak": plan.predicted_peak_bytes, "measured_peak": peak,
            "error_pct": 100 * (plan.predicted_peak_bytes - peak) / peak,
            "pred_weights": plan.gpu_weights_bytes, "meas_weights": loaded.weights_bytes,
            "pred_kv": plan.kv_bytes, "meas_kv": kv, "pred_work": plan.workspace_bytes,
            "pred_ctx": plan.cuda_context_bytes, "runtime_at_start": runtime_at_start, "runtime_after": runtime,
            "max_reserved": torch.cuda.max_memory_reserved(), "max_allocated": torch.cuda.max_memory_allocated(),
            "after_load": after_load, "load_s": load_s, "ttft_s": final.stats.ttft_s,
            "decode_tok_s": final.stats.decode_tokens_per_s, "new_tokens": final.stats.new_tokens,
            "mem_get_info_used": total - free, "mem_get_info_free": free, "baseline_used": baseline,
            "panel": {"weights": snap.weights, "kv": snap.kv_cache, "other_allocator": snap.other_allocator,
                      "runtime": snap.runtime, "others": snap.other_processes, "free": snap.free, "total": snap.total},
            "device": torch.cuda.get_device_name(),
        })
        del cache
    return rows


def child(args) -> None:
    """One configuration in this (child) process; prints its row as JSON."""
    rows = measure(args.folder, args.quant, args.contexts, args.budget, args.new_tokens)
    with open(args.out, "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def parent(args) -> None:
    """Run every configuration in its own child process and collect the rows."""
    from bench.synth import write_random_llama
    from models.catalog import load_catalog

    catalog = load_catalog()
    work = Path(args.workdir)
    folders = {}
    for key in args.shapes:
        folder = work / f"random-{key}"
        if not (folder / "config.json").exists():
            t0 = time.perf_counter()
            write_random_llama(folder, catalog.get(SHAPES[key]).shape)
            print(f"wrote {folder} in {time.perf_counter() - t0:.1f} s", flush=True)
        folders[key] = folder
    runs = [(k, q, None) for k in args.shapes for q in args.quants]
    if "7b" in folders:
        runs += [("7b", "4bit", 8.0), ("7b", "none", 8.0)]
    for key, quant, budget in runs:
        cmd = [sys.executable, __file__, "--child", "--folder", str(folders[key]), "--quant", quant,
               "--out", args.out, "--new-tokens", str(args.new_tokens), "--contexts", *map(str, args.contexts)]
        if budget:
            cmd += ["--budget", str(budget)]
        t0 = time.perf_counter()
        result = subprocess.run(cmd, capture_output=True, text=True)
        print(f"{key} {quant} budget={budget}: rc={result.returncode} in {time.perf_counter() - t0:.0f} s", flush=True)
        if result.returncode:
            print(result.stderr[-3000:], flush=True)
    print_table(args.out)


def print_table(path: str) -> None:
    """Print the results file as a table."""
    rows = [json.loads(line) for line in open(path)]
    print(f"\n{'model':>6} {'quant':>5} {'budget':>6} {'ctx':>5} {'layers gpu/cpu':>14} {'pred GiB':>9} "
          f"{'meas GiB':>9} {'err %':>6} {'weights p/m MiB':>17} {'ctx p/m MiB':>12} {'tok/s':>6}")
    for r in rows:
        name = {24: "1.8B", 32: "7B", 28: "Qwen7B"}.get(r["shape"], str(r["shape"]))
        budget = f"{r['budget_gib']:.0f}" if r["budget_gib"] else "-"
        print(f"{name:>6} {r['quant']:>5} {budget:>6} {r['context']:>5} {r['gpu_layers']:>7}/{r['cpu_layers']:<6} "
              f"{r['predicted_peak'] / GiB:9.3f} {r['measured_peak'] / GiB:9.3f} {r['error_pct']:6.1f} "
              f"{r['pred_weights'] / MiB:8.0f}/{r['meas_weights'] / MiB:<8.0f} "
              f"{r['pred_ctx'] / MiB:5.0f}/{r['runtime_after'] / MiB:<6.0f} {r['decode_tok_s'] or 0:6.1f}")
    panel = [r for r in rows if r["budget_gib"] and r["quant"] == "4bit"]
    for r in panel[-1:]:
        p = r["panel"]
        print("\n7B 4-bit under an 8 GiB budget, VRAM panel vs torch.cuda.mem_get_info:")
        print(f"  panel: weights {p['weights'] / MiB:.0f} MiB, KV {p['kv'] / MiB:.0f} MiB, other allocator "
              f"{p['other_allocator'] / MiB:.0f} MiB, CUDA context {p['runtime'] / MiB:.0f} MiB, other processes "
              f"{p['others'] / MiB:.0f} MiB, free {p['free'] / MiB:.0f} MiB, total {p['total'] / MiB:.0f} MiB")
        print(f"  mem_get_info: used {r['mem_get_info_used'] / MiB:.0f} MiB, free {r['mem_get_info_free'] / MiB:.0f} MiB;"
              f" device used before start {(r['baseline_used'] or 0) / MiB:.0f} MiB")


def main() -> None:
    """Command-line entry point."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", action="store_true")
    p.add_argument("--folder")
    p.add_argument("--quant", default="4bit")
    p.add_argument("--quants", nargs="+", default=["none", "8bit", "4bit"])
    p.add_argument("--shapes", nargs="+", default=["1.8b", "7b"])
    p.add_argument("--contexts", nargs="+", type=int, default=[1024, 4096])
    p.add_argument("--budget", type=float)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--workdir", default="/tmp/smallchat-bench")
    p.add_argument("--out", default="gpu_memory.jsonl")
    args = p.parse_args()
    child(args) if args.child else parent(args)


if __name__ == "__main__":
    main()
