"""Two sessions with different quantizations of one model, answering alternately: the cost of the switch.

Wall time from chat() to the first token of each session's turn, when both models are resident (the
switch is a dictionary lookup) against when the other session's turn had to load its model again (what
the old one-model-for-everyone app paid on every switch, and what LRU eviction still costs here).

    python bench/per_user_switch.py                       # CPU: the embedded model, none vs bf16
    python bench/per_user_switch.py --quants none 4bit    # any two quantizations of the model
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def first_token_s(engine, spec, session: str) -> tuple[float, str]:
    """Seconds from chat() to the first streamed answer text, and the model that wrote it."""
    from models.facade import SamplingSettings

    started, first, model = time.perf_counter(), None, ""
    for update in engine.chat([{"role": "user", "content": "What is the capital of France?"}],
                              SamplingSettings(max_new_tokens=4, temperature=0.0), threading.Event(),
                              session=session, spec=spec):
        if update.text and first is None:
            first = time.perf_counter() - started
        model = update.stats.model or model
    return first if first is not None else float("nan"), model


def main(argv: list[str] | None = None) -> int:
    """Print the median first-token time of a turn with both resident vs with a reload first."""
    from models.facade import Engine, LoadSettings, ModelSpec, load_catalog

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--quants", nargs=2, default=["none", "bf16"])
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args(argv)
    engine = Engine(load_catalog())
    a, b = (ModelSpec(args.model, LoadSettings.from_user(q, context_tokens=1024)) for q in args.quants)
    first_token_s(engine, a, "a"), first_token_s(engine, b, "b")  # both loaded once
    resident, reload = [], []
    for i in range(args.repeat):
        for spec, session in ((a, "a"), (b, "b")):
            seconds, _ = first_token_s(engine, spec, f"{session}-{i}")  # a new session each time: no KV reuse
            resident.append(seconds)
    for i in range(args.repeat):
        for spec, session in ((a, "a"), (b, "b")):
            # This session's model unloaded meanwhile (as an LRU eviction under a small budget does): its turn loads it.
            key = engine.model_key(spec.choice, spec.settings)
            engine.run_exclusive(lambda: engine._unload_locked(key))
            seconds, _ = first_token_s(engine, spec, f"{session}-reload-{i}")
            reload.append(seconds)
    print(f"{args.model} {args.quants[0]} vs {args.quants[1]}, {engine.device}: first token after a switch, "
          f"both resident {statistics.median(resident):.3f} s; with a reload first {statistics.median(reload):.3f} s "
          f"(median of {len(resident)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
