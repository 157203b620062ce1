"""Switching models from the dropdown, as the app does it: one process, one Engine, a sequence of loads.

    python bench/switch_speed.py --sequence 7b 1.8b 7b 1.8b [--quant int4] [--budget 8] [--out F.jsonl] [--md F.md]

Each step is Engine.load (the Chat tab's switch: the previous model unloaded, then the new one loaded),
then one greedy answer. Per step: seconds until the model answers (the switch), until the fast path's
compiled step is swapped in (full speed), the answer's first-token time and decode speed, and whether
the int4 weights came from the store and the compile cache was warm. The first visit of a shape is a
cold load; a later visit is what a user comparing sizes waits for. bench/decode_speed.py measures a
second load in a fresh process (an app restart); this measures it in the running app.

Shapes are random-weight checkpoints with the real sizes (bench/synth.py), or any folder given as
--folder KEY=PATH (the CPU test runs a tiny model through it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GiB = 1024**3
SHAPES = {"1.8b": "internlm2-chat-1.8b", "7b": "internlm2.5-7b-chat", "qwen7b": "qwen2.5-7b-instruct"}


def checkpoint(key: str, folders: dict[str, str], workdir: Path) -> str:
    """The folder of shape `key`: given on the command line, or a random-weight checkpoint written once."""
    if key in folders:
        return folders[key]
    from bench.synth import write_random_llama
    from models.catalog import load_catalog

    folder = workdir / f"random-{key}"
    if not (folder / "config.json").exists():
        write_random_llama(folder, load_catalog().get(SHAPES[key]).shape)
    return str(folder)


def switch(engine, key: str, folder: str, settings, prompt_tokens: int, new_tokens: int) -> dict:
    """One dropdown switch to `folder` and one greedy answer; its row."""
    import torch

    from models.generation import SamplingSettings, stream_generate

    started = time.perf_counter()
    report = engine.load(folder, settings)
    loaded = report.loaded
    row = {"step": key, "switch_s": time.perf_counter() - started, "quant": settings.quant.value,
           "freed_gib": sum(u.freed_bytes for u in report.unloaded) / GiB,
           "int4_stored": loaded.int4_stored, "device": str(loaded.model.device)}
    ids = torch.randint(0, loaded.tokenizer.vocab_size - 2, (prompt_tokens,),
                        generator=torch.Generator().manual_seed(0)).tolist()
    greedy = SamplingSettings(max_new_tokens=new_tokens, temperature=0)
    if loaded.fast is not None:
        row["phases"] = {k: round(v, 2) for k, v in loaded.fast.phases.items()}
        first = list(loaded.fast.stream(loaded.tokenizer, ids, greedy, threading.Event()))[-1]
        row.update(ready_ttft_ms=1e3 * first.stats.ttft_s, ready_tok_s=first.stats.decode_tokens_per_s)
        loaded.fast.wait_compiled()
        row["full_speed_s"] = time.perf_counter() - started
        row["compile_state"] = loaded.fast.compile_status()
        loaded.fast.token_ids = []  # a fresh prompt, not a continuation of the one above
        final = list(loaded.fast.stream(loaded.tokenizer, ids, greedy, threading.Event()))[-1]
    else:
        final = list(stream_generate(loaded.model, loaded.tokenizer, ids, greedy, threading.Event()))[-1]
    row.update(ttft_ms=1e3 * final.stats.ttft_s, decode_tok_s=final.stats.decode_tokens_per_s,
               tokens=len(final.token_ids))
    return row


def markdown(rows: list[dict], gpu: str) -> str:
    """The sequence as a table."""
    lines = [f"Switches in one app process on {gpu}; quant {rows[0]['quant'] if rows else '?'}.", "",
             "| # | model | answers after s | full speed after s | int4 from store | TTFT ms | decode tok/s | freed GiB |",
             "|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(rows, 1):
        full = f"{r['full_speed_s']:.1f}" if "full_speed_s" in r else "–"
        lines.append(f"| {i} | {r['step']} | {r['switch_s']:.1f} | {full} | {'yes' if r['int4_stored'] else 'no'} | "
                     f"{r['ttft_ms']:.0f} | {r['decode_tok_s']:.1f} | {r['freed_gib']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    """Command-line entry point: run the sequence, print the table; the rows."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sequence", nargs="+", default=["7b", "1.8b", "7b", "1.8b"])
    p.add_argument("--quant", default="int4")
    p.add_argument("--budget", type=float, default=8.0, help="GPU budget, GiB")
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--prompt", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--folder", action="append", default=[], help="KEY=PATH: a checkpoint for KEY")
    p.add_argument("--workdir", default="/tmp/smallchat-bench")
    p.add_argument("--out", default="")
    p.add_argument("--md", default="")
    args = p.parse_args(argv)
    import torch

    from models.catalog import load_catalog
    from models.engine import Engine
    from models.loading import LoadSettings
    from models.quant import parse_quant

    folders = dict(item.split("=", 1) for item in args.folder)
    engine = Engine(load_catalog())
    settings = LoadSettings(quant=parse_quant(args.quant), context_tokens=args.context,
                            gpu_budget_bytes=int(args.budget * GiB))
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "the CPU"
    rows = []
    try:
        for key in args.sequence:
            folder = checkpoint(key, folders, Path(args.workdir))
            rows.append(switch(engine, key, folder, settings, args.prompt, args.new_tokens))
            print(json.dumps(rows[-1]), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps({"gpu": gpu, **rows[-1]}) + "\n")
    finally:
        engine.unload()
    table = markdown(rows, gpu)
    print(table)
    if args.md:
        Path(args.md).write_text(table)
    return rows


if __name__ == "__main__":
    main()
