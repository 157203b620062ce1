"""The fused q/k/v projection + attention (bench/qkv_attention_kernel.py, a probe the app does not run): compiled
on the CPU, checked on Hopper."""

from __future__ import annotations

import pytest
import torch

from bench import qkv_attention_kernel as attention_qkv
from models.kernels import decode_attention
from tests.cuda_compile import nvrtc_13_installed, registers_and_stack

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)
D = 128


@pytest.mark.skipif(not nvrtc_13_installed(), reason="NVRTC 13 is not installed (scripts/setup.sh --dev installs it)")
@pytest.mark.parametrize("group", [1, 2, 4])
def test_the_kernel_compiles_for_hopper_without_spills(group):
    """Version 2 (16 warps, a block's whole share of words in flight), over K of 2,048 and 4,096: no stack, but for
    the 24-40 bytes that a group of 4 spills at 16 warps (attention_cluster's attention does too)."""
    for bias, dependent, groups in [(False, False, 16), (True, True, 16), (False, False, 32)]:
        _, stack = registers_and_stack(attention_qkv.source_for(group, bias, dependent, attention_qkv.WARPS, groups),
                                       "qkv_attention", (9, 0))
        assert stack == 0 or (group >= 4 and stack <= 40), (group, bias, groups, stack)
    assert attention_qkv.shared_bytes(group, 4096 // 128, attention_qkv.WARPS) <= 227 * 1024


def _layer(hidden, hq, hkv, length, pos, bias, gen):
    """A quantized q/k/v projection, its input (h * gamma, the sums of h^2 in 16 parts), a rotation and caches."""
    from models.kernels.int4 import quantize

    rows = (hq + 2 * hkv) * D
    weight = (torch.randn(rows, hidden, device="cuda", generator=gen) / hidden ** 0.5).to(torch.bfloat16)
    qweight, scales, offsets = quantize(weight)
    h = torch.randn(hidden, device="cuda", generator=gen)
    gamma = 1 + 0.2 * torch.randn(hidden, device="cuda", generator=gen)
    normed = (h * gamma).to(torch.bfloat16).view(1, hidden)
    sums = (h.float() ** 2).view(16, -1).sum(1)
    b = (0.3 * torch.randn(rows, device="cuda", generator=gen)).to(torch.bfloat16) if bias else None
    angle = torch.rand(D // 2, device="cuda", generator=gen) * 6.28
    cos, sin = (torch.cat([f(angle)] * 2).to(torch.bfloat16) for f in (torch.cos, torch.sin))
    k = torch.randn(1, hkv, length, D, device="cuda", generator=gen).to(torch.bfloat16)
    v = torch.randn(1, hkv, length, D, device="cuda", generator=gen).to(torch.bfloat16)
    return qweight, scales, offsets, normed, sums, b, cos, sin, k, v


def _run(layer, hidden, hq, hkv, position, mask, k, v):
    from models.kernels.int4 import new_workspace

    qweight, scales, offsets, normed, sums, b, cos, sin, *_ = layer
    return attention_qkv.qkv_attention(normed, qweight, scales, offsets, hidden, *new_workspace(qweight.shape[1], "cuda"),
                                       0, sums, 1e-6, b, cos, sin, position, k, v, mask, D ** -0.5, hq,
                                       *decode_attention.new_workspace(hq, hkv, D, "cuda"))


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="needs a Hopper (or later) GPU")
@pytest.mark.parametrize("shape", [(2048, 16, 8), (4096, 32, 8), (1024, 8, 8), (3584, 4, 4), (2048, 8, 2)])
def test_one_kernel_equals_the_two_it_replaces(shape, monkeypatch):
    """Against the q/k/v GEMV (int4_linear_scaled) then decode_attention_qkv, on the same inputs: the output within
    bf16's rounding (the GEMV's sums are added in another order, so a row may round one step apart), the token's key
    and value written alike, nothing else of the cache touched, and the same bits when run again."""
    hidden, hq, hkv = shape
    gen = torch.Generator(device="cuda").manual_seed(hidden + hq)
    for window, pos, bias in [(512, 0, False), (512, 300, True), (1024, 1023, False), (4096, 3000, True)]:
        layer = _layer(hidden, hq, hkv, window + 64, pos, bias, gen)
        *_, k, v = layer
        mask = torch.ones(window, dtype=torch.bool, device="cuda")
        position = torch.tensor([pos], device="cuda")
        assert attention_qkv.takes(layer[3], layer[0], layer[5], layer[6], position, k, v, mask, hq)
        k2, v2, before_k = k.clone(), v.clone(), k.clone()
        got = _run(layer, hidden, hq, hkv, position, mask, k, v)
        again = _run(layer, hidden, hq, hkv, position, mask, k.clone(), v.clone())
        monkeypatch.setenv(attention_qkv.ENV, "0")
        want = _run(layer, hidden, hq, hkv, position, mask, k2, v2)
        monkeypatch.delenv(attention_qkv.ENV)
        where = (shape, window, pos, bias)
        assert float((got.float() - want.float()).abs().max() / want.float().abs().max()) < 2e-2, where
        assert torch.equal(got, again), where
        for mine, theirs in ((k, k2), (v, v2)):
            assert float((mine[:, :, pos].float() - theirs[:, :, pos].float()).abs().max()) <= \
                2**-6 * float(theirs[:, :, pos].float().abs().max()), where
        others = torch.ones(window + 64, dtype=torch.bool, device="cuda")
        others[pos] = False
        assert torch.equal(k[:, :, others], before_k[:, :, others]), where


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="needs a Hopper (or later) GPU")
def test_it_replays_in_a_graph_as_the_position_moves():
    """Captured once in a CUDA graph, replayed at 12 positions with a new input each time: the same bits as eager
    calls of the op on the same inputs and caches."""
    hidden, hq, hkv, window = 2048, 16, 8, 1024
    gen = torch.Generator(device="cuda").manual_seed(7)
    layer = list(_layer(hidden, hq, hkv, window + 64, window - 1, False, gen))
    k, v = layer[-2], layer[-1]
    k_eager, v_eager = k.clone(), v.clone()
    mask = torch.ones(window, dtype=torch.bool, device="cuda")
    position = torch.zeros(1, dtype=torch.long, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        _run(layer, hidden, hq, hkv, position, mask, k.clone(), v.clone())
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = _run(layer, hidden, hq, hkv, position, mask, k, v)
    for n in range(12):
        position.fill_(5 + 80 * n)
        layer[3].copy_(torch.randn(1, hidden, device="cuda", generator=gen).to(torch.bfloat16))
        graph.replay()
        want = _run(layer, hidden, hq, hkv, position, mask, k_eager, v_eager)
        assert torch.equal(out, want), n
        assert torch.equal(k, k_eager) and torch.equal(v, v_eager), n
