"""Asking the L2 for the decode step's next weights (models/kernels/l2_ahead.py): the plan and the kernel's compile on
the CPU, the step's results unchanged on a GPU."""

from __future__ import annotations

import random
import threading

import pytest
import torch

from models.kernels import l2_ahead
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


def test_the_budget_is_off_unless_asked_for_and_never_on_a_cpu(monkeypatch, caplog):
    cpu = torch.device("cpu")
    monkeypatch.delenv(l2_ahead.ENV, raising=False)
    assert l2_ahead.budget_bytes(cpu) == 0
    monkeypatch.setenv(l2_ahead.ENV, "16")
    assert l2_ahead.budget_bytes(cpu) == 0
    monkeypatch.setenv(l2_ahead.ENV, "sixteen")
    assert l2_ahead.budget_bytes(cpu) == 0 and "not a number" in caplog.text
    if torch.cuda.is_available():
        monkeypatch.setenv(l2_ahead.ENV, "1000")  # at most half the L2
        cuda = torch.device("cuda", 0)
        assert 0 < l2_ahead.budget_bytes(cuda) <= torch.cuda.get_device_properties(cuda).L2_cache_size // 2


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


@pytest.fixture(scope="module")
def cpu_int4_model(tiny_llama):
    from transformers import AutoModelForCausalLM

    from models.fused_projections import fuse_projections
    from models.kernels.int4 import quantize_model

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.bfloat16).eval()
    fuse_projections(model)
    quantize_model(model, torch.device("cpu"))
    return model


def test_a_cpu_step_asks_nothing_and_its_gemvs_are_left_as_they_were(cpu_int4_model, monkeypatch):
    from models.folded_norms import ask_l2_ahead, decode_gemvs

    model = cpu_int4_model
    monkeypatch.setenv(l2_ahead.ENV, "16")
    monkeypatch.delattr(model, "smallchat_l2_ahead", raising=False)
    assert ask_l2_ahead(model, torch.device("cpu")) is None
    gemvs = decode_gemvs(model)
    assert len(gemvs) == 4 * model.config.num_hidden_layers + 1  # q/k/v, o, gate/up, down a layer; lm_head
    assert all(g.l2_ahead is None for g in gemvs)


def test_a_kernel_that_cannot_be_built_leaves_the_step_without_asks(cpu_int4_model, monkeypatch, caplog):
    from models.folded_norms import ask_l2_ahead

    def no_nvrtc(bulk, device):
        raise OSError("NVRTC (libnvrtc.so.13) was not found")
    monkeypatch.setattr(l2_ahead, "budget_bytes", lambda device: 16 << 20)
    monkeypatch.setattr(l2_ahead, "_kernel", no_nvrtc)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.delattr(cpu_int4_model, "smallchat_l2_ahead", raising=False)
    l2_ahead.builds.cache_clear()
    try:
        assert ask_l2_ahead(cpu_int4_model, torch.device("cpu")) is None
        assert "cannot be asked ahead" in caplog.text and "libnvrtc" in caplog.text
    finally:
        l2_ahead.builds.cache_clear()


def _gpu_int4_model(tiny_llama):
    from transformers import AutoModelForCausalLM

    from models.fused_projections import fuse_projections
    from models.kernels.int4 import quantize_model

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.bfloat16).eval().cuda()
    fuse_projections(model)
    quantize_model(model, torch.device("cuda"))
    return model


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_asking_ahead_changes_no_bit_of_the_step_eager_in_a_graph_or_compiled(tiny_llama, monkeypatch):
    from transformers import AutoTokenizer

    from models.fast_decode import FastDecoder
    from models.folded_norms import decode_gemvs
    from models.generation import SamplingSettings

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    ids = tokenizer("Hello world, this is a test")["input_ids"]
    results = {}
    for mb in ("0", "1"):
        monkeypatch.setenv(l2_ahead.ENV, mb)
        model = _gpu_int4_model(tiny_llama)
        fast = FastDecoder(model, max_context=128, compile=False)
        assert (fast._layer_loop.l2_ahead is not None) == (mb == "1") and fast._layer_loop.folded
        if mb == "1":  # every GEMV of the step asks, with a table of the same shape (one compiled layer for all)
            tables = [g.l2_ahead for g in decode_gemvs(model)]
            assert all(t is not None and t.shape == tables[0].shape for t in tables)
        fast.warm_up()  # captures the step's graphs, with the second stream forked and joined in each
        positions = torch.arange(fast.windows[-1], device="cuda")
        loop = fast._layer_loop
        with torch.inference_mode():
            eager = [loop.logits(torch.tensor([[t]], device="cuda"), torch.tensor([p], device="cuda"), positions)
                     for p, t in ((0, 5), (1, 17), (2, 99))]
            compiled_layer = torch.compile(loop.layer_fn, fullgraph=True)
            compiled = loop.logits(torch.tensor([[7]], device="cuda"), torch.tensor([3], device="cuda"), positions,
                                   compiled_layer)
        greedy = SamplingSettings(max_new_tokens=24, temperature=0)
        answer = list(fast.stream(tokenizer, ids, greedy, threading.Event()))[-1].token_ids
        torch.cuda.synchronize()
        results[mb] = (eager, compiled, answer)
        fast.close()
    for want, got in zip(results["0"][0] + [results["0"][1]], results["1"][0] + [results["1"][1]]):
        assert torch.equal(want, got)
    assert results["0"][2] == results["1"][2]


def test_one_compiled_layer_serves_every_layer_with_its_own_tables(cpu_int4_model):
    """The tables are inputs of the compiled layer, not constants: no layer compiles again, and none asks with
    another's table."""
    from models.fast_decode import FastDecoder
    from models.folded_norms import decode_gemvs

    model = cpu_int4_model
    gemvs = decode_gemvs(model)
    inputs = []

    def backend(graph_module, example_inputs):
        inputs.append([n.name for n in graph_module.graph.nodes if n.op == "placeholder" and "l2_ahead" in n.name])
        return graph_module.forward
    try:
        for i, gemv in enumerate(gemvs):
            gemv.l2_ahead = torch.full((4, 2), i, dtype=torch.int64)
        fast = FastDecoder(model, max_context=64, compile=False)
        loop = fast._layer_loop
        torch._dynamo.reset()
        compiled = torch.compile(loop.layer_fn, fullgraph=True, backend=backend)
        with torch.inference_mode():
            loop.logits(torch.tensor([[5]]), torch.tensor([3]), torch.arange(fast.windows[-1]), compiled)
    finally:
        for gemv in gemvs:
            gemv.l2_ahead = None
        torch._dynamo.reset()
    assert len(inputs) == 1 and len(inputs[0]) == 4  # one graph for the 4 layers; q/k/v, o, gate/up, down's tables


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_tile_chooser_times_each_tile_with_the_asks_the_step_makes(tiny_llama, monkeypatch):
    from models.folded_norms import decode_gemvs, mark_epilogues
    from models.kernels import gemv_tiles

    monkeypatch.setenv(l2_ahead.ENV, "1")
    model = _gpu_int4_model(tiny_llama)
    mark_epilogues(model)
    group = [g for g in decode_gemvs(model) if g is not model.lm_head][::4]  # each layer's q/k/v
    candidates = gemv_tiles.candidate_tiles(group[0].out_features, group[0].qweight.device)
    timings = gemv_tiles.time_tiles(group, candidates)
    assert set(timings) <= set(candidates) and len(timings) >= 1 and all(us > 0 for us in timings.values())
    assert gemv_tiles._signature(group[0].qweight.device)["l2_ahead"] == 1 << 20
