"""The greedy token as one kernel: the index of the largest of one row of logits (torch.argmax's answer).

Why: torch's argmax over one row runs as one reduction kernel whose speed depends on the length. On an H100 it
took 20.1 µs over InternLM2's 92,544 logits (1.9 % of the 1.8B's decode step) and 7.2 over Qwen2.5's 151,936
(bench/results/sample_speed_h100_s32.txt). Two short torch reductions (the largest of each row of 128, then
of those) took 13.8 and 14.2 µs: six kernels with the padding and the gather. Here each program takes BLOCK
logits and folds its largest into one 64-bit key with an atomic max. The last program to finish (counted
with an atomic, as the split-K GEMV does) writes the index and resets the key and the count, so the same
two words serve every call and a CUDA graph's replays. That is one kernel and no memset.

The key orders as torch.argmax does: the value in the high 32 bits (its float bits made to order as signed
integers; a NaN counts as the largest, -0 as +0), and n - 1 - index in the low 32, so that of equal values
the first wins.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton (a CPU-only install): torch.argmax answers
    triton = None

BLOCK = 4096  # logits a program: 23 programs over InternLM2's 92,544, 38 over Qwen2.5's 151,936
KEY_FLOOR = -(1 << 63)  # below every key: what the state's key is reset to

if triton is not None:
    @triton.jit
    def _argmax_kernel(x_ptr, state_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        inside = offs < n
        bits = tl.load(x_ptr + offs, mask=inside, other=0.0).to(tl.float32).to(tl.int32, bitcast=True)
        bits = tl.where((bits & 0x7FFFFFFF) > 0x7F800000, 0x7FC00000, bits)  # any NaN: the largest
        bits = tl.where(bits == -2147483648, 0, bits)  # -0 ties with +0, as in torch
        ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # negative floats: larger magnitude, smaller key
        key = (ordered.to(tl.int64) << 32) | (n - 1 - offs).to(tl.int64)
        key = tl.where(inside, key, -9223372036854775807 - 1)
        tl.atomic_max(state_ptr, tl.max(key, axis=0), sem="relaxed", scope="gpu")
        tl.debug_barrier()  # this program's max is in before the release below
        count = tl.atomic_add(state_ptr + 1, 1, sem="acq_rel", scope="gpu")
        if count == tl.num_programs(0) - 1:
            best = tl.atomic_xchg(state_ptr, -9223372036854775807 - 1, sem="acq_rel", scope="gpu")
            tl.store(out_ptr, n - 1 - (best & 0xFFFFFFFF))
            tl.atomic_xchg(state_ptr + 1, 0, sem="relaxed", scope="gpu")


def new_state(device: torch.device) -> torch.Tensor:
    """The two words a call needs (the key, reset to KEY_FLOOR, and the count of programs done), for one device
    and one stream of calls at a time (a decoder owns one)."""
    return torch.tensor([KEY_FLOOR, 0], dtype=torch.int64, device=device)


def argmax(logits: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """The index [1] (int64) of the largest of `logits` ([1, V] or [V], float), the first of equal ones, a NaN the
    largest: torch.argmax's answer. The kernel runs on CUDA with Triton (and in Triton's interpreter, for the
    tests); elsewhere torch.argmax does."""
    row = logits.reshape(-1)
    if triton is None or not (row.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        return row.argmax().view(1)
    out = torch.empty(1, dtype=torch.int64, device=row.device)
    _argmax_kernel[(triton.cdiv(row.numel(), BLOCK),)](row, state, out, row.numel(), BLOCK=BLOCK)
    return out
