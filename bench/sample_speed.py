"""The decode step's last op alone: the next token from one row of logits, greedy against top-p sampled.

The app samples by default (temperature 0.7, top-p 0.9); decode_speed's step figures are greedy. Per
vocabulary (InternLM2's 92,544, Qwen2.5's 151,936), models/token_sampling.next_token and `plain` (the
form it replaced: torch's argmax, and sort + softmax + cumsum) are captured in CUDA graphs and replayed
(microseconds a token), and their kernels are listed (torch.profiler); for greedy also the candidates
two_step_argmax and kernel_argmax (models/kernels/argmax.py: one kernel, checked against torch's answer here).

    python bench/sample_speed.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.int4_kernels import graph_ms  # noqa: E402
from models.token_sampling import next_token  # noqa: E402

VOCABS = {"internlm2": 92544, "qwen2.5": 151936}


def plain(logits: torch.Tensor, greedy: bool, temperature: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """The baseline: the next token as the fast decoder drew it until session 29."""
    if greedy:
        return logits.argmax(-1)
    sorted_logits, order = (logits / temperature).sort(-1, descending=True)
    probs = sorted_logits.softmax(-1)
    probs = probs.masked_fill(probs.cumsum(-1) - probs > top_p, 0.0)
    choice = (probs / torch.empty_like(probs).exponential_(1)).argmax(-1, keepdim=True)
    return order.gather(-1, choice).view(1)


def two_step_argmax(logits: torch.Tensor, greedy: bool = True, temperature=None, top_p=None) -> torch.Tensor:
    """Greedy only: the argmax as two short reductions, the largest of each row of 128 logits and then of
    those. A candidate: torch's argmax took 20 us over InternLM2's 92,544 logits and 6.6 over Qwen's larger
    151,936 on the H200 (session 29), so its one-row reduction is the suspect; to be timed before use."""
    vocab = logits.shape[-1]
    rows = torch.nn.functional.pad(logits.view(-1), (0, -vocab % 128), value=float("-inf")).view(-1, 128)
    best, column = rows.max(-1)
    row = best.argmax().view(1)
    return row * 128 + column.gather(0, row)  # gather, not column[row]: indexing by a tensor syncs (no capture)


def kernel_argmax(state: torch.Tensor):
    """Greedy only: models/kernels/argmax.py's one-kernel argmax, with its two words of state."""
    from models.kernels.argmax import argmax

    return lambda logits, greedy=True, temperature=None, top_p=None: argmax(logits, state)


def main() -> None:
    from torch.profiler import ProfilerActivity, profile

    print(json.dumps({"gpu": torch.cuda.get_device_name()}), flush=True)
    temperature = torch.full((1,), 0.7, device="cuda")
    top_p = torch.full((1,), 0.9, device="cuda")
    from models.kernels.argmax import new_state

    state = new_state(torch.device("cuda", torch.cuda.current_device()))
    for name, vocab in VOCABS.items():
        logits = torch.randn(1, vocab, device="cuda") * 4
        logits[0, vocab // 3] = logits[0, 2 * vocab // 3] = logits.max() + 1  # a tie: the first must win
        want = int(logits.argmax())
        for form in (two_step_argmax, kernel_argmax(state)):
            assert int(form(logits)) == want, (name, form)
        for greedy in (True, False):
            forms = [("plain", plain), ("next_token", next_token)]
            if greedy:
                forms += [("two_step_argmax", two_step_argmax), ("kernel_argmax", kernel_argmax(state))]
            for name_of_form, form in forms:
                us = graph_ms(lambda: form(logits, greedy, temperature, top_p), 200) * 1e3
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    for _ in range(10):
                        form(logits, greedy, temperature, top_p)
                    torch.cuda.synchronize()
                kernels = [{"kernel": e.key[:70], "calls": e.count // 10, "us": round(e.device_time_total / 10, 2)}
                           for e in sorted(prof.key_averages(), key=lambda e: -e.device_time_total) if e.device_time_total]
                print(json.dumps({"vocab": name, "size": vocab, "greedy": greedy, "form": name_of_form,
                                  "us_in_graph": round(us, 2), "kernels": kernels}), flush=True)


if __name__ == "__main__":
    main()
