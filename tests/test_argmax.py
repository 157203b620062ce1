"""The one-kernel argmax (models/kernels/argmax.py) gives torch.argmax's answer: in Triton's interpreter on the CPU,
compiled on a GPU."""

from __future__ import annotations

import pytest
import torch

from tests.kernel_check import IN_THE_INTERPRETER_AND_ON_THE_GPU, run_check

_CHECK = r"""
import json, sys, torch
from models.kernels import argmax as am
cases, device = json.loads(sys.argv[1]), sys.argv[2]
state = am.new_state(torch.device(device))
out = []
for n, case, seed in cases:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * 4
    if case == "ties":  # few values: many equal largest, the first must win
        x = torch.randint(-3, 3, (n,), generator=g).float()
    elif case == "negative":
        x = -x.abs() - 1
    elif case == "nan":  # a NaN counts as the largest
        x[n // 2] = float("nan")
        x[n // 3] = float("nan")
    elif case == "all -inf":
        x[:] = float("-inf")
    elif case == "signed zeros":  # -0 and +0 are equal: the first of them wins
        x[:] = -1.0
        x[n // 2] = -0.0
        x[-1] = 0.0
    x = x.to(torch.bfloat16 if case == "bf16" else torch.float32)
    want = int(x.argmax())
    got = [int(am.argmax(x.view(1, -1).to(device), state)) for _ in range(2)]  # again: the state was reset
    out.append({"n": n, "case": case, "want": want, "got": got, "state": state.tolist()})
print(json.dumps(out))
"""

CASES = [[n, case, seed] for seed, n in enumerate([1, 5, 4096, 4097, 92544, 151936])
         for case in ("random", "ties", "negative", "nan", "all -inf", "signed zeros", "bf16")]


def _check(device: str, interpret: bool) -> None:
    for row in run_check(_CHECK, CASES, device, interpret):
        assert row["got"] == [row["want"]] * 2, row
        assert row["state"] == [-(1 << 63), 0], row  # the key and the count are reset for the next call


@IN_THE_INTERPRETER_AND_ON_THE_GPU
def test_the_kernel_gives_torchs_argmax(device, interpret):
    _check(device, interpret)


def test_without_the_kernel_torch_answers():
    from models.kernels import argmax

    x = torch.tensor([[0.5, 3.0, 3.0, -1.0]])
    assert argmax.argmax(x, argmax.new_state(torch.device("cpu"))).tolist() == [1]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_decoders_tokens_are_the_same_with_the_kernel_greedy_and_sampled():
    from models.kernels import argmax
    from models.token_sampling import next_token

    state = argmax.new_state(torch.device("cuda", torch.cuda.current_device()))
    temperature, top_p = torch.full((1,), 0.7, device="cuda"), torch.full((1,), 0.9, device="cuda")
    for vocab in (92544, 151936):
        logits = torch.randn(1, vocab, device="cuda") * 4
        assert torch.equal(next_token(logits, True, temperature, top_p, state), next_token(logits, True, temperature, top_p))
        for seed in range(5):  # the same seed draws the same token
            torch.manual_seed(seed)
            drawn = next_token(logits, False, temperature, top_p, state)
            torch.manual_seed(seed)
            assert torch.equal(drawn, next_token(logits, False, temperature, top_p))
