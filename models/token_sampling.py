"""The next token from one row of logits, on the device and without a host sync: greedy or top-p.

Why a module of its own: the fast decoder's captured step ends with it (models/fast_decode.py), and
bench/sample_speed.py times it alone, greedy against sampled, since the app samples by default
(temperature 0.7, top-p 0.9) while decode_speed's step figures are greedy.

What it costs, and why it is written as it is (NVIDIA H200, InternLM2's 92,544 logits, in a CUDA
graph; bench/results/sample_speed_h200_s29.txt): the plain form, sort + softmax + cumsum + argmax,
took 124.6 us a token against 20.8 greedy, 4 % of a 7B step and 9 % of a 1.8B one. Of that, torch's
softmax of one row ran in a single thread block (25 us) and its argmax over 92,544 values 20 us (6.6
over Qwen's larger 151,936). So the sorted logits are exponentiated against their first (the largest)
and compared with top_p times their total instead of normalized, and an argmax over a row whose length
has a factor of 128 is taken in two short reductions.
"""

from __future__ import annotations

import torch

ARGMAX_ROW = 128  # the two-step argmax's row length


def argmax(values: torch.Tensor) -> torch.Tensor:
    """Index [1] of the largest of values [1, V] (the first one on ties, as torch.argmax)."""
    v = values.shape[-1]
    if v % ARGMAX_ROW or v < 2 * ARGMAX_ROW:
        return values.argmax(-1)
    best, within = values.reshape(v // ARGMAX_ROW, ARGMAX_ROW).max(-1)  # first largest of each row
    row = best.argmax(-1, keepdim=True)  # first row holding the largest
    return (row * ARGMAX_ROW + within.gather(0, row)).view(1)


def next_token(logits: torch.Tensor, greedy: bool, temperature: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Next token id [1] from logits [1, V]: the argmax, or a draw at `temperature` from the smallest
    set of most probable tokens whose mass reaches `top_p` (both [1] tensors, read on the device)."""
    if greedy:
        return argmax(logits)
    sorted_logits, order = (logits / temperature).sort(-1, descending=True)
    weights = (sorted_logits - sorted_logits[:, :1]).exp()  # probabilities times the softmax's total
    mass = weights.cumsum(-1)
    # Keep the smallest set of tokens whose mass reaches top_p (the first is always kept).
    weights = weights.masked_fill(mass - weights > top_p * mass[:, -1:], 0.0)
    # argmax(p / Exp(1)) is a draw from p (normalization not needed), with no host sync.
    choice = argmax(weights / torch.empty_like(weights).exponential_(1))
    return order.view(-1).gather(0, choice)
