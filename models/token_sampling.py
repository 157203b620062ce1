"""The next token from one row of logits, on the device and without a host sync: greedy or top-p.

Why a module of its own: the fast decoder's captured step ends with it (models/fast_decode.py), and
bench/sample_speed.py times it alone, greedy against sampled, since the app samples by default
(temperature 0.7, top-p 0.9) while decode_speed's step figures are greedy.

What it costs, and why it is written as it is (InternLM2's 92,544 logits, in a CUDA graph): on an H200 the
plain form, sort + softmax + cumsum + argmax, took 124.6 us a token against 20.8 greedy, 4 % of a 7B step and
9 % of a 1.8B one (bench/results/sample_speed_h200_s29_plain.txt). Of that, torch's softmax of one row ran in a
single thread block (25 us) and its argmax 20 us. So the sorted logits are exponentiated against their first
(the largest) and compared with top_p times their total instead of normalized: one elementwise kernel for the
one-block softmax. Both argmaxes (the greedy token, and the draw's) are kernels/argmax.py's one kernel where a
state for it is given: on an H100 5.2 us in a graph against torch's 21.0 (InternLM2) and 9.1 (Qwen2.5's
151,936) (bench/results/sample_speed_h100_s35.txt).
"""

from __future__ import annotations

import torch

from .kernels.argmax import argmax


def next_token(logits: torch.Tensor, greedy: bool, temperature: torch.Tensor, top_p: torch.Tensor,
               argmax_state: torch.Tensor | None = None) -> torch.Tensor:
    """Next token id [1] from logits [1, V]: the argmax, or a draw at `temperature` from the smallest
    set of most probable tokens whose mass reaches `top_p` (both [1] tensors, read on the device).
    `argmax_state` (kernels/argmax.new_state): the argmaxes run as one kernel each (torch's otherwise)."""
    def largest(values: torch.Tensor) -> torch.Tensor:  # index [1] of the largest of one row
        return values.argmax(-1).view(1) if argmax_state is None else argmax(values, argmax_state)

    if greedy:
        return largest(logits)
    sorted_logits, order = (logits / temperature).sort(-1, descending=True)
    weights = (sorted_logits - sorted_logits[:, :1]).exp()  # probabilities times the softmax's total
    mass = weights.cumsum(-1)
    # Keep the smallest set of tokens whose mass reaches top_p (the first is always kept).
    weights = weights.masked_fill(mass - weights > top_p * mass[:, -1:], 0.0)
    # argmax(p / Exp(1)) is a draw from p (normalization not needed), with no host sync.
    choice = largest(weights / torch.empty_like(weights).exponential_(1)).view(1, 1)
    return order.gather(-1, choice).view(1)
