"""The probe that asks the L2 for a decode step's next weights (bench/l2_ahead.py, timed and dropped in session 35):
its plan and its kernel's compile, on the CPU. On a GPU, bench/l2_prefetch.py checks that the asks change no bit."""

from __future__ import annotations

import random

import pytest
import torch

from bench import l2_ahead
from tests.cuda_compile import nvrtc_13_installed, registers_and_stack


def _starts_and_ends(sizes):
    starts, ends, at = {}, [], 0
    for k, pieces in enumerate(sizes):
        for p, size in enumerate(pieces):
            starts[(k, p)] = at
            at += size
        ends.append(at)
    return starts, ends, at


@pytest.mark.parametrize("seed", range(40))
def test_each_kernel_asks_once_a_cycle_for_what_starts_within_the_budget_after_it(seed):
    rng = random.Random(seed)
    # a layer's pattern: GEMVs of a few pieces, an attention of none, repeated; sometimes one large lm_head
    layer = [[rng.randint(1, 4) for _ in range(rng.randint(1, 5))] if slot != 1 else [] for slot in range(5)]
    sizes = layer * rng.randint(2, 6) + ([[rng.randint(1, 4)] * rng.randint(5, 20)] if rng.random() < 0.5 else [])
    budget = rng.randint(0, 30)
    capacity = rng.choice([None, rng.randint(5, 60)])
    asks = l2_ahead.plan(sizes, budget, capacity)
    starts, ends, total = _starts_and_ends(sizes)
    budget = min(budget, total // 2)
    # how far each kernel may ask ahead: the budget, or what the L2's capacity leaves beside its own bytes
    ahead = [budget if capacity is None else min(budget, capacity - sum(pieces)) for pieces in sizes]
    asked = [piece for ask in asks for piece in ask]
    assert len(asked) == len(set(asked))  # nothing asked twice a cycle
    for i, ask in enumerate(asks):
        for k, p in ask:
            assert k != i  # never the kernel's own weights: it reads them itself
            assert (starts[(k, p)] - ends[i]) % total < ahead[i]  # within what it may ask ahead
    # everything that starts within what a kernel may ask ahead after its end is asked by one of them
    want = {piece for piece, start in starts.items() for i, end in enumerate(ends) if (start - end) % total < ahead[i]}
    assert set(asked) == want


def test_no_budget_asks_for_nothing():
    assert l2_ahead.plan([[4, 4], [], [4]], 0) == [[], [], []]
    assert l2_ahead.plan([[], []], 8) == [[], []]


def test_a_small_cycle_asks_as_worked_out_by_hand():
    # kernels of 2, 0, 3, 2, 1 bytes in pieces of 1-2; ends 2, 2, 5, 7, 8; one byte ahead
    sizes = [[1, 1], [], [1, 1, 1], [2], [1]]
    assert l2_ahead.plan(sizes, 1) == [[(2, 0)], [], [(3, 0)], [(4, 0)], [(0, 0)]]
    # four bytes ahead (half the cycle): the last kernel asks into the next cycle
    assert l2_ahead.plan(sizes, 4) == [[(2, 2), (3, 0)], [], [(4, 0), (0, 0)], [(0, 1), (2, 0)], [(2, 1)]]
    # an L2 of 3 bytes to count on: the 3-byte kernel and its byte ahead do not fit, so it asks nothing
    assert l2_ahead.plan(sizes, 1, capacity=3) == [[(2, 0)], [], [], [(4, 0)], [(0, 0)]]
    # of 2: the attention (no weights of its own) asks what the 2-byte kernel before it could not
    assert l2_ahead.plan(sizes, 1, capacity=2) == [[], [(2, 0)], [], [], [(0, 0)]]
    # of 5 with 4 ahead: each kernel asks for at most 5 less its own bytes (3 for the 2-byte ones, 2 for the 3-byte
    # one, whose window [13, 15) the attention's [10, 14) already covered up to (4, 0), which starts at 15)
    assert l2_ahead.plan(sizes, 4, capacity=5) == [[(2, 2)], [(3, 0)], [], [(4, 0), (0, 0), (0, 1)], [(2, 0), (2, 1)]]


def test_pieces_are_views_of_the_weights_in_order():
    w = torch.arange(3 * l2_ahead.PIECE // 4, dtype=torch.int32)  # 3 MB: three pieces
    s = torch.ones(10, dtype=torch.bfloat16)
    pieces = l2_ahead.pieces_of([s, w])
    assert [p.numel() for p in pieces] == [20, l2_ahead.PIECE, l2_ahead.PIECE, l2_ahead.PIECE]
    assert pieces[0].data_ptr() == s.data_ptr() and pieces[1].data_ptr() == w.data_ptr()
    assert pieces[3].data_ptr() == w.data_ptr() + 2 * l2_ahead.PIECE


@pytest.mark.skipif(not nvrtc_13_installed(), reason="NVRTC 13 is not installed (scripts/setup.sh --dev installs it)")
@pytest.mark.parametrize("capability,bulk", [((9, 0), True), ((9, 0), False), ((8, 9), False), ((8, 6), False),
                                             ((8, 0), False)])
def test_the_kernel_compiles_for_each_gpu_it_runs_on_and_keeps_its_loads(capability, bulk):
    """Hopper asks with bulk prefetches; Ampere and Ada with loads, which ptxas would drop if nothing read them."""
    import os
    import subprocess
    import tempfile

    from models.kernels import int4_triton, nvrtc

    source = l2_ahead.source_for(bulk)
    registers, stack = registers_and_stack(source, "l2_ahead", capability)
    assert stack == 0 and registers <= 32
    tool = os.path.join(os.path.dirname(int4_triton.triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(nvrtc.compile_cubin(source, "l2_ahead", capability, (), 13))
        f.flush()
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, check=True).stdout
    if bulk:
        assert sass.count("UBLKPF.L2") == 2  # normal and evict-last priority
    else:
        assert sass.count("LDG.E.NA.LTC") == 2  # the 16-byte loads that fetch 128-256 bytes into the L2
