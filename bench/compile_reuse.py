"""A fast-path model loaded again in the same process: how long until its compiled step answers?

    python bench/compile_reuse.py [--folder PATH] [--context 256] [--new-tokens 32] [--out F.jsonl]

Three loads of the same checkpoint in one process, each a new model object and a new FastDecoder
with the background compile on (Inductor's caches in a fresh folder of their own):
- `cold`: the first load; nothing compiled yet, in memory or on disk.
- `again`: a second load, as when a user switches back from the dropdown. dynamo's in-memory
  entry from the first load serves it (one backend for every decoder: background_compile.py).
- `again, dynamo reset`: a third load after torch._dynamo.reset(): what every reload paid before
  that change (dynamo traces the layer again; Inductor's on-disk cache has the kernels).
Per load: the background compile's seconds (trace + Inductor + first run), graph capture, and a greedy
answer's decode speed on the compiled step, with its tokens checked against the first load's.

Runs on the CPU (Inductor's C++ backend; the embedded SmolLM2-135M by default) or on a GPU (CUDA graphs).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def embedded_folder() -> str:
    """The embedded model's unpacked folder (unpacked once into the app's cache)."""
    from models.catalog import load_catalog
    from models.sources import embedded_gguf_path, unpack_gguf, default_cache_dir

    catalog = load_catalog()
    return str(unpack_gguf(embedded_gguf_path(catalog.get(catalog.default_id)), default_cache_dir()))


def one_load(label: str, folder: str, device: str, context: int, new_tokens: int, cache_dir: Path) -> dict:
    """Load `folder`, compile its step in the background, answer greedily; the row."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from models.fast_decode import FastDecoder
    from models.generation import SamplingSettings

    tokenizer = AutoTokenizer.from_pretrained(folder)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    started = time.perf_counter()
    fast = FastDecoder(model, max_context=context, compile=True, compile_cache_dir=cache_dir)
    if fast.use_graphs:
        fast.warm_up()
    fast.start_background_compile()
    fast.wait_compiled()
    full_speed_s = time.perf_counter() - started
    ids = tokenizer("Name three things a small language model is good for.")["input_ids"]
    greedy = SamplingSettings(max_new_tokens=new_tokens, temperature=0)
    final = list(fast.stream(tokenizer, ids, greedy, threading.Event()))[-1]
    row = {"load": label, "device": device, "compile_state": fast.compile_state,
           "compile_s": round(fast.phases.get("compile_trace_and_build_s", float("nan")), 2),
           "capture_s": round(fast.phases.get("compile_capture_s", float("nan")), 2),
           "full_speed_s": round(full_speed_s, 2), "decode_tok_s": round(final.stats.decode_tokens_per_s, 1),
           "tokens": final.token_ids}
    fast.close()
    return row


def markdown(rows: list[dict], machine: str) -> str:
    """The loads as a table."""
    lines = [f"Loads of one checkpoint in one process on {machine}.", "",
             "| load | compile s (trace + Inductor + first run) | capture s | load to full speed s "
             "| decode tok/s | same tokens as the first load |", "|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['load']} | {row['compile_s']:.2f} | {row['capture_s']:.2f} | {row['full_speed_s']:.2f} "
                     f"| {row['decode_tok_s']:.1f} | {'yes' if row['tokens'] == rows[0]['tokens'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the three loads; print (and optionally save) the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", help="a checkpoint folder (default: the embedded model)")
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--out", help="append the rows to this JSONL file")
    parser.add_argument("--md", help="write the table to this file")
    args = parser.parse_args(argv)
    import platform

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    machine = (torch.cuda.get_device_name() if device == "cuda"
               else f"the CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)")
    machine += f", torch {torch.__version__}"
    folder = args.folder or embedded_folder()
    rows = []
    with tempfile.TemporaryDirectory() as cache_dir:
        for label in ("cold", "again", "again, dynamo reset"):
            if label.endswith("reset"):
                torch._dynamo.reset()
            rows.append(one_load(label, folder, device, args.context, args.new_tokens, Path(cache_dir)))
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "tokens"}), flush=True)
    table = markdown(rows, machine)
    print(table)
    if args.out:
        with open(args.out, "a") as f:
            for row in rows:
                f.write(json.dumps({**row, "machine": machine}) + "\n")
    if args.md:
        Path(args.md).write_text(table)
    return rows


if __name__ == "__main__":
    main()
