"""Time to first token of a new turn with a long history: KV-cache reuse vs full re-prefill.

The same engine, model and chat in the same run. For each repetition a fresh session
answers the history (so its cache holds it), then the next turn is timed twice:
  reuse   - through the session: only the new turn's tokens are prefilled;
  prefill - with no session: the whole chat is prefilled, as apps without reuse do.
TTFT is wall time from the chat() call (templating and context fitting included) to the
first streamed token. Also prints the context the memory budget allows at each KV
precision and the decode speed of each.

    python bench/kv_reuse.py                                   # CPU: embedded model, ~1.5k tokens
    python bench/kv_reuse.py --model /path/7b --quant 4bit --gpu-budget 8 --history 4096   # GPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PARAGRAPH = (
    "Small language models can run on a consumer graphics card when their weights are quantized. "
    "The key and value cache grows with every token of the conversation, so a long chat needs memory "
    "beyond the weights, and re-reading the whole history for every new turn costs time. "
)


def build_history(tokenizer, target_tokens: int, vocab_size: int | None) -> list[dict]:
    """Alternating user/assistant turns adding up to about `target_tokens` of chat-template tokens."""
    import random

    rng = random.Random(0)
    history: list[dict] = []

    def filler(n_words: int) -> str:
        if vocab_size:  # random-weight checkpoints have a word-level "t123" vocabulary
            return " ".join(f"t{rng.randrange(vocab_size - 2)}" for _ in range(n_words))
        return (PARAGRAPH * (1 + n_words // 40))[: n_words * 6]

    i = 0
    while True:
        history += [{"role": "user", "content": f"Question {i}: " + filler(40)},
                    {"role": "assistant", "content": filler(160)}]
        i += 1
        n = len(tokenizer.apply_chat_template(history, tokenize=True, return_dict=True)["input_ids"])
        if n >= target_tokens:
            return history


def first_token(engine, messages, sampling, session, kv) -> tuple[float, object]:
    """(seconds from the call to the first token, final update)."""
    started = time.perf_counter()
    ttft = None
    final = None
    for update in engine.chat(messages, sampling, threading.Event(), session=session, kv=kv):
        if ttft is None and update.stats.new_tokens > 0:
            ttft = time.perf_counter() - started
        final = update
    return ttft, final


def run(args) -> list[dict]:
    """Measure TTFT of the next turn with and without reuse for each KV precision."""
    import torch

    from models.catalog import load_catalog
    from models.engine import Engine
    from models.local_answer import kv_token_bytes
    from models.kv_cache import KVPrecision
    from models.generation import SamplingSettings
    from models.loading import LoadSettings
    from models.memory import GiB
    from models.quant import Quant

    engine = Engine(load_catalog())
    budget = int(args.gpu_budget * GiB) if args.gpu_budget and engine.device == "cuda" else None
    context = args.history + 1024
    report = engine.load(args.model, LoadSettings(quant=Quant(args.quant), gpu_budget_bytes=budget,
                                                  context_tokens=context))
    loaded = report.loaded
    random_vocab = loaded.shape.vocab_size if args.random_vocab else None
    history = build_history(loaded.tokenizer, args.history, random_vocab)
    question = {"role": "user", "content": "And what does that mean for a chat app?" if not random_vocab else "t1 t2 t3 t4"}
    sampling = SamplingSettings(max_new_tokens=args.new_tokens, temperature=0.0)
    device = torch.cuda.get_device_name() if engine.device == "cuda" else "CPU"
    rows = []
    for kv in args.kv:
        reuse, full, reused_tokens, prompt_tokens = [], [], 0, 0
        first_token(engine, history + [question], sampling, None, kv)  # warm-up
        for _ in range(args.repeats):
            session = uuid.uuid4().hex
            _, prior = first_token(engine, history[:-1], sampling, session, kv)  # the cache now holds the history
            if args.scenario == "regenerate":  # the same chat again: the cache must be cropped back
                messages = history[:-1]
            else:  # the next turn: the answer and a new question on top of the cache
                messages = history[:-1] + [{"role": "assistant", "content": prior.text}, question]
            t_reuse, update = first_token(engine, messages, sampling, session, kv)
            reuse.append(t_reuse)
            reused_tokens, prompt_tokens = update.stats.reused_tokens, update.stats.prompt_tokens
            if loaded.fast is not None:  # the fast decoder reuses whatever it answered last: make it forget
                loaded.fast.token_ids = []
            t_full, full_update = first_token(engine, messages, sampling, None, kv)
            assert full_update.stats.reused_tokens == 0
            full.append(t_full)
            engine.drop_session(session)
        decode_sampling = SamplingSettings(max_new_tokens=64, temperature=0.0)
        _, decoded = first_token(engine, history + [question], decode_sampling, None, kv)
        rows.append({
            "device": device, "model": loaded.ref.label, "quant": args.quant, "kv": kv, "scenario": args.scenario,
            "history_tokens": prompt_tokens, "reused_tokens": reused_tokens,
            "ttft_reuse_s": statistics.median(reuse), "ttft_prefill_s": statistics.median(full),
            "speedup": statistics.median(full) / statistics.median(reuse),
            "max_context": engine.context_limit(kv=kv),
            # What memory alone allows (the user's context setting aside): KV room / bytes per token.
            "memory_context": engine.kv_budget_bytes() // kv_token_bytes(loaded, KVPrecision(kv)),
            "decode_tok_s": decoded.stats.decode_tokens_per_s,
            "budget_gib": args.gpu_budget if budget else None, "repeats": args.repeats,
        })
    return rows


def print_table(rows: list[dict]) -> None:
    """Markdown table of the rows."""
    print("| device | model | quant | KV | turn | history tokens | reused | TTFT reuse | TTFT re-prefill | speed-up "
          "| context limit | memory allows | decode tok/s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['device']} | {r['model']} | {r['quant']} | {r['kv']} | {r.get('scenario', 'next')} | {r['history_tokens']} | {r['reused_tokens']} "
              f"| {1000 * r['ttft_reuse_s']:.0f} ms | {1000 * r['ttft_prefill_s']:.0f} ms | {r['speedup']:.1f}x "
              f"| {r['max_context']} | {r.get('memory_context', '–')} | {r['decode_tok_s'] or 0:.1f} |")


def main() -> None:
    """Command-line entry point."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="", help="catalog id or folder (default: the embedded model)")
    p.add_argument("--quant", default="none")
    p.add_argument("--gpu-budget", type=float, help="GiB (GPU only)")
    p.add_argument("--history", type=int, default=1536, help="tokens of chat history before the timed turn")
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--scenario", choices=["next", "regenerate"], default="next",
                   help="time the next turn (default) or regenerating the last answer (needs a cache crop)")
    p.add_argument("--kv", nargs="+", default=["full"], help="KV precisions to measure: full fp8 offload")
    p.add_argument("--random-vocab", action="store_true", help="the model is a bench/synth.py random checkpoint")
    p.add_argument("--out", help="append rows as JSON lines")
    args = p.parse_args()
    rows = run(args)
    if args.out:
        with open(args.out, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    print_table(rows)


if __name__ == "__main__":
    main()
