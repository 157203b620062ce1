"""The next token from logits (models/token_sampling.next_token): greedy is the argmax, and top-p draws
follow the nucleus distribution: the smallest set of most probable tokens whose mass reaches top_p,
renormalized, at the given temperature; nothing outside it is ever drawn."""

import math

import pytest
import torch

from models.token_sampling import next_token

# Probabilities at temperature 1, in a shuffled vocabulary order (the draw must map back to token ids).
PROBS = torch.tensor([0.04, 0.25, 0.06, 0.5, 0.15])


def nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """The expected draw distribution: keep a token when the mass of the more probable ones is <= top_p."""
    above = torch.tensor([probs[probs > p].sum() for p in probs])
    kept = torch.where(above <= top_p + 1e-6, probs, torch.zeros_like(probs))
    return kept / kept.sum()


def test_greedy_is_the_argmax():
    logits = PROBS.log().view(1, -1)
    assert next_token(logits, True, torch.ones(1), torch.ones(1)).tolist() == [3]


@pytest.mark.parametrize("temperature, top_p", [(1.0, 0.8), (0.5, 0.9), (1.0, 1.0), (2.0, 0.6)])
def test_draws_follow_the_nucleus_distribution(temperature, top_p):
    torch.manual_seed(0)
    logits = PROBS.log().view(1, -1)
    tempered = torch.softmax(logits[0] / temperature, -1)
    expected = nucleus(tempered, top_p)
    draws = 6000
    counts = torch.zeros_like(PROBS)
    for _ in range(draws):
        counts[next_token(logits, False, torch.tensor([temperature]), torch.tensor([top_p]))] += 1
    for token, (n, p) in enumerate(zip(counts.tolist(), expected.tolist())):
        if p == 0:
            assert n == 0, f"token {token} lies outside the nucleus and was drawn {n} times"
        else:  # within 4.5 binomial standard deviations
            assert abs(n - draws * p) <= 4.5 * math.sqrt(draws * p * (1 - p)), (token, n, draws * p)


def test_a_tiny_top_p_keeps_only_the_most_likely_token():
    logits = PROBS.log().view(1, -1)
    picks = {next_token(logits, False, torch.ones(1), torch.tensor([1e-6])).item() for _ in range(50)}
    assert picks == {3}


def test_given_the_same_random_numbers_it_draws_what_the_sort_softmax_form_drew():
    """The unnormalized weights (no softmax) pick the token the plain form picked, draw by draw."""
    from bench.sample_speed import plain

    logits = torch.randn(1, 3000) * 3
    for seed in range(200):
        temperature, top_p = torch.tensor([0.3 + seed % 7 * 0.2]), torch.tensor([0.5 + seed % 5 * 0.1])
        torch.manual_seed(seed)
        ours = next_token(logits, False, temperature, top_p)
        torch.manual_seed(seed)
        assert ours.tolist() == plain(logits, False, temperature, top_p).tolist(), seed


def test_the_two_step_argmax_candidate_finds_the_argmax():
    """bench/sample_speed.two_step_argmax (a greedy candidate to time) against torch's argmax: vocabularies that
    are and are not a multiple of its 128-logit rows, the largest logit in the padded last row and at 0."""
    from bench.sample_speed import two_step_argmax

    gen = torch.Generator().manual_seed(0)
    for vocab in (92544, 151936, 1000, 129, 128):
        for _ in range(5):
            logits = torch.randn(1, vocab, generator=gen)
            assert two_step_argmax(logits).item() == logits.argmax(-1).item()
        for where in (0, vocab - 1):
            logits = torch.zeros(1, vocab)
            logits[0, where] = 1.0
            assert two_step_argmax(logits).item() == where
