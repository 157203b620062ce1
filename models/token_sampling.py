"""The next token from one row of logits, on the device and without a host sync: greedy or top-p.

Why a module of its own: the fast decoder's captured step ends with it (models/fast_decode.py), and
bench/sample_speed.py times it alone, greedy against sampled, since the app samples by default
(temperature 0.7, top-p 0.9) while decode_speed's step figures are greedy.
"""

from __future__ import annotations

import torch


def next_token(logits: torch.Tensor, greedy: bool, temperature: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Next token id [1] from logits [1, V]: the argmax, or a draw at `temperature` from the smallest
    set of most probable tokens whose mass reaches `top_p` (both [1] tensors, read on the device)."""
    if greedy:
        return logits.argmax(-1)
    sorted_logits, order = (logits / temperature).sort(-1, descending=True)
    probs = sorted_logits.softmax(-1)
    # Keep the smallest set of tokens whose mass reaches top_p (the first is always kept).
    probs = probs.masked_fill(probs.cumsum(-1) - probs > top_p, 0.0)
    # argmax(p / Exp(1)) is a draw from p (normalization not needed), with no host sync.
    choice = (probs / torch.empty_like(probs).exponential_(1)).argmax(-1, keepdim=True)
    return order.gather(-1, choice).view(1)
