"""Does writing the int4 store in a thread slow a decode loop down? The host side of it, without a GPU.

Why: on the H200 a shape's first load streamed its decode 30 % below its own graph step twice (sessions
28 and 29), both times while loading._keep_int4's thread was writing the freshly quantized model
(int4_store.write: safetensors). The suspect is that thread holding the GIL while the decode loop, back
from waiting on the GPU, needs it to enqueue the next step. This measures exactly that mechanism: a loop
that waits with the GIL released for a GPU step's time (time.sleep releases it as a CUDA synchronize
does) and then runs a little Python, alone and while int4_store.write stores a snapshot of the given size
in a thread. If the loop's steps per second hold while the writer runs, the writer is not the cause here.

    python bench/store_write_stall.py [--gb 1.0] [--step-ms 2.4]

It prints the safetensors version: the GIL behaviour is the library's, so run it where the GPU runs too.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models import int4_store  # noqa: E402


def decode_like_loop(stop: threading.Event, step_s: float) -> dict:
    """Steps per second and the worst step of a loop that waits step_s without the GIL, then runs Python."""
    steps, worst = 0, 0.0
    started = last = time.perf_counter()
    while not stop.is_set():
        time.sleep(step_s)  # the host waiting on the GPU's step, the GIL released
        sum(range(200))  # what the loop does per token with the GIL: the next replay, the token's bookkeeping
        now = time.perf_counter()
        worst, last, steps = max(worst, now - last), now, steps + 1
    elapsed = time.perf_counter() - started
    return {"steps_per_s": steps / elapsed, "worst_step_ms": 1e3 * worst, "expected_steps_per_s": 1 / step_s}


def snapshot(gb: float) -> tuple[dict[str, torch.Tensor], dict]:
    """A snapshot shaped like a 7B's: packed int32 layer weights, and one large bf16 table (the lm_head's kind)."""
    words = int(gb * 1e9 * 0.8) // 4
    layer = 4096 * 1024
    tensors = {f"layers.{i}.qweight": torch.randint(-2**31, 2**31 - 1, (layer,), dtype=torch.int32)
               for i in range(max(1, words // layer))}
    tensors["lm_head.weight"] = torch.randn(int(gb * 1e9 * 0.2) // 2 // 4096, 4096, dtype=torch.bfloat16)
    return tensors, {"format": int4_store.FORMAT, "dtype": "bfloat16", "aliases": {}, "int4": {}}


def measure(gb: float, step_ms: float, idle_s: float = 3.0) -> list[dict]:
    """The loop alone (idle_s), beside the write, and alone again for the write's duration."""
    import safetensors

    snap = snapshot(gb)
    nbytes = sum(t.numel() * t.element_size() for t in snap[0].values())
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        for writing in (False, True, False):
            stop, result = threading.Event(), {}
            loop = threading.Thread(target=lambda: result.update(decode_like_loop(stop, step_ms / 1e3)))
            loop.start()
            started = time.perf_counter()
            if writing:
                int4_store.write(snap, Path(cache), f"probe{len(rows)}")
            else:
                time.sleep(rows[-1]["seconds"] if rows else idle_s)
            seconds = time.perf_counter() - started
            stop.set()
            loop.join()
            rows.append({"writing": writing, "seconds": seconds, "gb": nbytes / 1e9, "step_ms": step_ms,
                         "safetensors": safetensors.__version__, **result})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gb", type=float, default=1.0, help="bytes of the snapshot written")
    p.add_argument("--step-ms", type=float, default=2.4, help="the GPU step the loop waits for (a 7B's: 2.4 ms)")
    a = p.parse_args()
    rows = measure(a.gb, a.step_ms)
    print(f"\nsafetensors {rows[0]['safetensors']}, {rows[1]['gb']:.2f} GB written in {rows[1]['seconds']:.1f} s; "
          f"a loop of {a.step_ms} ms steps (at most {rows[0]['expected_steps_per_s']:.0f} a second):\n")
    print("| while | steps a second | worst step ms |\n|---|---|---|")
    for row, label in zip(rows, ("idle", "the int4 store is written", "idle again")):
        print(f"| {label} | {row['steps_per_s']:.0f} | {row['worst_step_ms']:.1f} |")


if __name__ == "__main__":
    main()
