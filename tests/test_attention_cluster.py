"""The cluster decode attention (models/kernels/attention_cluster.py): compiled on the CPU, checked on a Hopper GPU."""

from __future__ import annotations

import pytest
import torch

from models.kernels import attention_cluster, decode_attention
from tests.cuda_compile import nvrtc_13_installed, registers_and_stack

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)
D = 128


@pytest.mark.skipif(not nvrtc_13_installed(), reason="NVRTC 13 is not installed (scripts/setup.sh --dev installs it)")
@pytest.mark.parametrize("group", [1, 2, 4, 7])
def test_the_kernel_compiles_for_hopper_without_spills(group):
    """Group sizes the catalog's models have (1.8B 2, 7B 4, Qwen2.5-7B 7), with and without the q/k/v bias and the
    early launch, and the long windows' 16 warps where the step takes them: no stack (a spill would put the rows in
    flight in local memory)."""
    builds = [(False, False, 8), (True, True, 8)] + ([(True, False, 16)] if group <= attention_cluster.MAX_GROUP else [])
    for bias, dependent, warps in builds:
        _, stack = registers_and_stack(attention_cluster.source_for(group, D, bias, dependent, warps),
                                       "attention_cluster", (9, 0))
        # 16 warps cap a thread at 128 registers: a group of 4 spills 24 bytes there (timed, and still faster)
        assert stack == 0 or (warps == 16 and group >= 4 and stack <= 32), (group, bias, warps, stack)
    assert attention_cluster.shared_bytes(16, D) <= 227 * 1024


def _case(hq, hkv, length, pos, bias, generator):
    width = (hq + 2 * hkv) * D
    qkv = torch.randn(width, device="cuda", generator=generator).to(torch.bfloat16)
    b = (0.3 * torch.randn(width, device="cuda", generator=generator)).to(torch.bfloat16) if bias else None
    angle = torch.rand(D // 2, device="cuda", generator=generator) * 6.28
    cos, sin = (torch.cat([f(angle)] * 2).to(torch.bfloat16) for f in (torch.cos, torch.sin))
    k = torch.randn(1, hkv, length, D, device="cuda", generator=generator).to(torch.bfloat16)
    v = torch.randn(1, hkv, length, D, device="cuda", generator=generator).to(torch.bfloat16)
    k[:, :, pos + 1:] *= 50  # stale entries past the position: large, and never to be read
    v[:, :, pos + 1:] *= 50
    return qkv, b, cos, sin, k, v


def test_it_takes_no_cpu_tensors_and_no_other_dtypes():
    qkv = torch.zeros((16 + 16) * D, dtype=torch.bfloat16)
    key = torch.zeros(1, 8, 64, D, dtype=torch.bfloat16)
    args = (qkv, None, torch.zeros(D, dtype=torch.bfloat16), torch.zeros(1, dtype=torch.long), key, key.clone(),
            torch.ones(64, dtype=torch.bool), 16)
    assert not attention_cluster.takes(*args)
    assert not attention_cluster.available(torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="needs a Hopper (or later) GPU")
@pytest.mark.parametrize("heads", [(16, 8), (32, 8), (28, 4), (12, 2), (32, 2), (8, 8)])
def test_it_matches_the_plain_form_and_writes_the_token(heads):
    """Against decode_attention.qkv_reference over windows, positions (the first, inside the first share, the
    window's last), masks with holes and the q/k/v bias: the output within bf16's rounding of q and k (as the
    Triton kernel's test), the token's key and value written at its position, nothing else of the cache
    touched, and the same bits when run again."""
    hq, hkv = heads
    gen = torch.Generator(device="cuda").manual_seed(hq * 100 + hkv)
    for window, pos, bias, holes in [(512, 0, False, False), (512, 5, True, False), (512, 511, False, True),
                                     (1024, 600, True, True), (2048, 1500, False, False), (4096, 4095, True, True),
                                     (4096, 77, False, True)]:
        qkv, b, cos, sin, k, v = _case(hq, hkv, window + 64, pos, bias, gen)
        mask = torch.ones(window, dtype=torch.bool, device="cuda")
        if holes:  # padding the model never attends to (never the token itself)
            mask[torch.randperm(window, device="cuda", generator=gen)[: window // 5]] = False
            mask[pos] = True
        position = torch.tensor([pos], device="cuda")
        # the step takes it for groups of up to 4 (measured); the kernel is right for any (up to 16)
        assert attention_cluster.takes(qkv, b, cos, position, k, v, mask, hq) == (hq // hkv <= attention_cluster.MAX_GROUP)
        k_ref, v_ref = k.float(), v.float()
        ref = decode_attention.qkv_reference(qkv.float(), None if b is None else b.float(), cos.float(), sin.float(),
                                             position, k_ref, v_ref, mask, D ** -0.5, hq)
        before_k, before_v = k.clone(), v.clone()
        got = attention_cluster.attention_qkv(qkv, b, cos, sin, position, k, v, mask, D ** -0.5, hq)
        again = attention_cluster.attention_qkv(qkv, b, cos, sin, position, k, v, mask, D ** -0.5, hq)
        where = (heads, window, pos, bias, holes)
        assert float((got.float() - ref).abs().max() / ref.abs().max()) < 2e-2, where
        assert torch.equal(got, again), where
        for cache, want in ((k, k_ref), (v, v_ref)):
            assert float((cache[:, :, pos].float() - want[:, :, pos]).abs().max() / want[:, :, pos].abs().max()) < 2**-7
        others = torch.ones(window + 64, dtype=torch.bool, device="cuda")
        others[pos] = False
        assert torch.equal(k[:, :, others], before_k[:, :, others]) and torch.equal(v[:, :, others], before_v[:, :, others])


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="needs a Hopper (or later) GPU")
def test_the_step_op_runs_it_in_a_graph_as_the_position_moves(monkeypatch):
    """decode_attention_qkv (the op the decode step calls) takes this kernel on Hopper; captured once in a CUDA
    graph and replayed at 20 positions it equals the Triton kernel it replaces (SMALLCHAT_CLUSTER_ATTENTION=0)
    on the same inputs, cache writes included, up to rounding."""
    hq, hkv, window = 16, 8, 1024
    gen = torch.Generator(device="cuda").manual_seed(3)
    qkv, b, cos, sin, k, v = _case(hq, hkv, window + 64, window - 1, True, gen)
    k.normal_(generator=gen)
    v.normal_(generator=gen)
    mask = torch.ones(window, dtype=torch.bool, device="cuda")
    position = torch.zeros(1, dtype=torch.long, device="cuda")
    ws = decode_attention.new_workspace(hq, hkv, D, "cuda")
    k_triton, v_triton = k.clone(), v.clone()

    def step(key, value):
        return decode_attention.decode_attention_qkv(qkv, b, cos, sin, position, key, value, mask, D ** -0.5, hq, *ws)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step(k.clone(), v.clone())
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step(k, v)
    for n in range(20):
        position.fill_(3 + 50 * n)
        qkv.normal_(generator=gen)
        graph.replay()
        monkeypatch.setenv(decode_attention.CLUSTER_ENV, "0")
        want = step(k_triton, v_triton)
        monkeypatch.delenv(decode_attention.CLUSTER_ENV)
        assert float((out.float() - want.float()).abs().max() / want.float().abs().max()) < 2e-2, n
        for mine, theirs in ((k, k_triton), (v, v_triton)):  # the same rotation, up to how each rounds its fp32
            assert float((mine.float() - theirs.float()).abs().max()) <= 2**-7 * float(theirs.float().abs().max()), n


def test_the_load_precompiles_the_block_shapes_the_step_will_launch(monkeypatch):
    """int4_precompile's jobs for a head layout the step gives this kernel: one compile a block shape (short and long
    windows) with the layout's group, bias and launch mode; none for a layout it leaves to Triton."""
    calls = []
    monkeypatch.setattr(attention_cluster, "available", lambda device: True)
    monkeypatch.setattr(attention_cluster, "_kernel", lambda *key: calls.append(key))
    device = torch.device("cuda", 0)
    for job in attention_cluster.compile_jobs(32, 8, D, True, torch.bfloat16, 2, device):
        job()
    assert calls == [(4, D, True, True, attention_cluster.WARPS, attention_cluster.CLUSTER, device),
                     (4, D, True, True, attention_cluster.LONG_WARPS, attention_cluster.CLUSTER, device)]
    assert attention_cluster.compile_jobs(28, 4, D, True, torch.bfloat16, 0, device) == []  # a group of 7
    assert attention_cluster.compile_jobs(16, 8, 64, False, torch.bfloat16, 0, device) == []
    assert attention_cluster.compile_jobs(16, 8, D, False, torch.float16, 0, device) == []


def test_a_kernel_that_cannot_be_built_leaves_the_step_to_triton(monkeypatch, caplog):
    """No NVRTC, or a compile or module load that fails: `builds` says so (logged once), so `takes` is false and the
    step runs the Triton kernel instead of raising; a kernel that builds is taken."""
    attention_cluster.builds.cache_clear()
    device = torch.device("cuda", 0)

    def no_nvrtc(*key):
        raise OSError("NVRTC (libnvrtc.so.13) was not found")
    monkeypatch.setattr(attention_cluster, "_kernel", no_nvrtc)
    with caplog.at_level("WARNING", logger=attention_cluster.__name__):
        assert not attention_cluster.builds(2, D, False, False, 8, device)
        assert not attention_cluster.builds(2, D, False, False, 8, device)
    assert sum("Triton kernel runs instead" in r.getMessage() for r in caplog.records) == 1
    monkeypatch.setattr(attention_cluster, "_kernel", lambda *key: object())
    assert attention_cluster.builds(2, D, False, False, 16, device)
    attention_cluster.builds.cache_clear()
