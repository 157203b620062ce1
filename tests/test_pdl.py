"""Programmatic dependent launch (models/kernels/pdl.py): which level runs where, what the compiled kernels do
before their wait (read without a GPU, from the sm_90 PTX and SASS), and on a Hopper GPU a decode-like chain
of early-launched kernels in a CUDA graph computing what the plain launches compute."""

import logging
import os
import re
import sys
from pathlib import Path

import pytest
import torch

from models.kernels import pdl
from tests.kernel_check import on_every_core

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("value, level", [("0", 0), ("1", 1), ("2", 2), ("", 0), (" 2 ", 2), ("3", 0), ("on", 0)])
def test_the_requested_level_is_read_from_the_environment(monkeypatch, caplog, value, level):
    pdl._parse.cache_clear()
    monkeypatch.setenv(pdl.ENV, value)
    with caplog.at_level(logging.WARNING):
        assert pdl.requested() == level
        assert pdl.requested() == level  # read at every launch, logged once
    assert caplog.text.count("is not 0, 1 or 2") == (value.strip() not in ("", "0", "1", "2"))


def test_without_a_capable_gpu_every_kernel_launches_plainly(monkeypatch):
    """Off by default; on the CPU, in Triton's interpreter and before Hopper (Ampere and Ada: the 8 GB cards)
    whatever is asked; on Hopper what is asked."""
    monkeypatch.delenv(pdl.ENV, raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(pdl, "gdc_wait", pdl.gdc_wait or object())  # the logic, also where Triton is missing
    hopper = {0: True, 1: False}
    monkeypatch.setattr(pdl, "_has_dependent_launch", lambda index: hopper[index])
    cuda0, cuda1 = torch.device("cuda", 0), torch.device("cuda", 1)
    assert pdl.level(cuda0) == 0  # not asked
    monkeypatch.setenv(pdl.ENV, "2")
    assert pdl.level(cuda0) == 2 and pdl.level(cuda1) == 0 and pdl.level(torch.device("cpu")) == 0
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert pdl.level(cuda0) == 0
    assert pdl.launch_options(0) == {"PDL": 0, "launch_pdl": False}
    assert pdl.launch_options(2) == {"PDL": 2, "launch_pdl": True}


def test_the_stored_tile_choices_are_kept_per_launch_level(monkeypatch):
    """Tiles are timed back to back, where an early launch overlaps them: choices made at another level are
    not taken (gemv_tiles reads {} for another signature and times again)."""
    pytest.importorskip("triton")
    from models.kernels import gemv_tiles

    monkeypatch.setattr(pdl, "level", lambda device: 2)
    early = gemv_tiles._signature(torch.device("cpu"))
    monkeypatch.setattr(pdl, "level", lambda device: 0)
    assert gemv_tiles._signature(torch.device("cpu")) != early and early["pdl"] == 2


def _compiled_gpu_code():
    """(compile for sm_90, SASS of a compiled kernel, its resources, its main loop) or a skip."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("compiles for a GPU")
    sys.path.insert(0, str(ROOT))
    from bench.int4_sass import compile_for_hopper, main_loop, resource_usage, sass_of

    return compile_for_hopper, sass_of, resource_usage, main_loop


def _before_the_wait(ptx: str) -> list[str]:
    """The PTX instructions a program runs before griddepcontrol.wait (after checking the order of the two)."""
    lines = ptx.splitlines()
    start = next(i for i, line in enumerate(lines) if "griddepcontrol.launch_dependents" in line)
    wait = next(i for i, line in enumerate(lines) if "griddepcontrol.wait" in line)
    assert start < wait, "the next kernel is let go before this one waits"
    assert sum("griddepcontrol.wait" in line for line in lines) == 1  # once, unconditionally (not in a branch)
    return lines[:wait]


def test_an_early_gemv_touches_only_its_weights_before_its_wait():
    """Compiled for sm_90 (no GPU needed), for every app tile: before the wait no store, no atomic (the
    split-K workspace and counters are shared by all GEMVs) and no load but the prefetching tiles' first
    group of weights (not the residual, nor the norm's sums, which the packed-fp16 tiles read before their
    loop); level 2 asks the L2 for weights there. The loop over the weights is the plain GEMV's, with no
    more registers and no spills."""
    compile_for_hopper, sass, resource_usage, main_loop = _compiled_gpu_code()
    from models.kernels import int4_epilogue, int4_triton

    def compiled(case):
        config, level = case
        # the epilogue that reads most before the loop: the norm's scale (packed fp16), the residual (fp32)
        epilogue = int4_epilogue.SCALED if config.kwargs.get("HALF2") else int4_epilogue.RESIDUAL_NORM
        constexprs = {"PREFETCH": True, **config.kwargs, "EVEN": True, "EPILOGUE": epilogue, "PDL": level}
        kernel = compile_for_hopper(int4_triton._gemv_body.fn, constexprs, config.num_warps)
        return epilogue, kernel.asm["ptx"], main_loop(sass(kernel)), resource_usage(kernel)
    cases = [(config, level) for config in int4_triton._GEMV_CONFIGS for level in (0, 1, 2)]
    kernels = dict(zip(cases, on_every_core(compiled, cases)))
    for config in int4_triton._GEMV_CONFIGS:
        epilogue, plain_ptx, plain_loop, plain_usage = kernels[config, 0]
        assert "griddepcontrol" not in plain_ptx
        for level in (1, 2):
            _, ptx, loop, usage = kernels[config, level]
            early = _before_the_wait(ptx)
            where = (config.kwargs, epilogue, level)
            assert not [line for line in early if re.search(r"\b(st|atom|red)\.", line)], where
            loads = [line for line in early if re.search(r"\bld\.global", line)]
            # the first group's words: 16 rows of a thread's columns (4 or 8 in a vector load)
            assert (len(loads) > 0) == config.kwargs["PREFETCH"] and len(loads) <= 16, (where, loads)
            prefetches = [line for line in early if "prefetch.global.L2" in line]
            assert (len(prefetches) > 0) == (level == 2), where
            assert usage["stack"] == 0 and usage["registers"] <= plain_usage["registers"] + 8, (where, usage)
            assert abs(len(loop) - len(plain_loop)) <= 0.01 * len(plain_loop), (where, len(loop), len(plain_loop))


def test_an_early_decode_attention_waits_before_it_reads_the_step():
    """Both attention kernels, compiled for sm_90: before the wait only L2 prefetches of the chunk's keys and
    values (level 2); every load, store and atomic after it; no more registers than the plain launch (+ 8)."""
    import triton
    import triton.compiler as tc
    from triton.backends.compiler import GPUTarget

    _compiled_gpu_code()
    from bench.int4_sass import resource_usage
    from models.kernels import decode_attention as fused
    from models.kernels import split_k

    signature = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "mask_ptr": "*i1", "out_ptr": "*bf16",
                 "ws_ptr": "*fp32", "lock_ptr": "*i32", "W": "i32", "CHUNK_KEYS": "i32", "SPLITS": "i32",
                 "stride_kh": "i32", "stride_kl": "i32", "stride_vh": "i32", "stride_vl": "i32", "scaling": "fp32"}
    qkv_signature = {"qkv_ptr": "*bf16", "bias_ptr": "*bf16", "cos_ptr": "*bf16", "sin_ptr": "*bf16", "pos_ptr": "*i64",
                     **{name: kind for name, kind in signature.items() if name != "q_ptr"}}
    constexprs = {"GROUP": 4, "ROWS": split_k.attention_rows(32, 8), "HEAD_DIM": 128, "BLOCK_L": fused.BLOCK_L,
                  "DOT_FP32": False}
    for fn, sig, consts in [(fused._decode_attention_kernel, signature, constexprs),
                            (fused._decode_attention_qkv_kernel, qkv_signature,
                             dict(constexprs, Q_HEADS=32, KV_HEADS=8, HAS_BIAS=False))]:
        aligned = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in sig
                   if name.endswith("_ptr") and name != "mask_ptr" or name.startswith("stride")}

        def compiled(level):
            source = tc.ASTSource(fn=fn, constexprs={**consts, "PDL": level}, attrs=aligned,
                                  signature=dict(sig, **{name: "constexpr" for name in {**consts, "PDL": level}}))
            kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                                    options={"num_warps": fused.NUM_WARPS, "num_stages": fused.NUM_STAGES})
            return kernel.asm["ptx"], resource_usage(kernel)
        (_, plain), *early_ones = on_every_core(compiled, [0, 1, 2])
        for level, (ptx, usage) in zip((1, 2), early_ones):
            early = _before_the_wait(ptx)
            assert not [line for line in early if re.search(r"\b(ld\.global|st\.|atom\.|red\.)", line)], (fn, level)
            assert any("prefetch.global.L2" in line for line in early) == (level == 2), (fn, level)
            assert usage["stack"] <= plain["stack"] and usage["registers"] <= plain["registers"] + 8, (fn, level, usage)
    # a head narrower than a 128-byte line (the tests' tiny models): the prefetch asks for one line a key
    # (its first version asked for none there, a zero-length arange, and failed to compile on the H200)
    fn, consts = fused._decode_attention_qkv_kernel, dict(constexprs, HEAD_DIM=32, Q_HEADS=32, KV_HEADS=8, PDL=2,
                                                            HAS_BIAS=True)
    source = tc.ASTSource(fn=fn, constexprs=consts, attrs={},
                          signature=dict(qkv_signature, **{name: "constexpr" for name in consts}))
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": fused.NUM_WARPS, "num_stages": fused.NUM_STAGES})
    assert any("prefetch.global.L2" in line for line in _before_the_wait(kernel.asm["ptx"]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                    reason="needs a Hopper (or later) GPU")
@pytest.mark.parametrize("level", [1, 2])
@pytest.mark.parametrize("kernel", ["triton", "mma"])
def test_a_chain_of_early_kernels_in_a_graph_computes_what_plain_launches_do(monkeypatch, level, kernel):
    """A layer's kernels as decode runs them, each reading the one before: a torch kernel writes x, GEMVs of
    two tiles (Triton: a prefetching fp32 one, a packed-fp16 one; int4_mma: a global split of K and a
    cluster's), the q/k/v GEMV, the attention (which writes the cache at the step's position), the o GEMV.
    Captured in a CUDA graph with early launches, replayed with a new x and position each time: every output
    equals the plain launches' on the same inputs."""
    from models.kernels import decode_attention as fused
    from models.kernels import int4, int4_triton
    from models.kernels.int4 import quantize

    torch.manual_seed(0)
    hidden, hq, hkv, d, length = 1024, 8, 2, 128, 512
    dev = torch.device("cuda")
    fp32_tile = next(i for i, c in enumerate(int4_triton._GEMV_CONFIGS) if c.kwargs["PREFETCH"])
    half2_tile = next(i for i, c in enumerate(int4_triton._GEMV_CONFIGS) if c.kwargs.get("HALF2"))
    weights = [quantize(torch.randn(n, k, device=dev, dtype=torch.bfloat16) / k ** 0.5)
               for n, k in [(hidden, hidden), (hidden, hidden), ((hq + 2 * hkv) * d, hidden), (hidden, hq * d)]]
    tiles = [fp32_tile, half2_tile, half2_tile, fp32_tile]
    if kernel == "mma":
        from models.kernels import int4_mma

        first = len(int4_triton._GEMV_CONFIGS)
        split_tile = first + next(i for i, t in enumerate(int4_mma.TILES) if not t[3])
        cluster_tile = first + next(i for i, t in enumerate(int4_mma.TILES) if t[3])
        tiles = [split_tile, cluster_tile, cluster_tile, split_tile]
    ws = int4.new_workspace(max(w[1].shape[1] for w in weights), dev)
    attention_ws = fused.new_workspace(hq, hkv, d, dev)
    cos, sin = torch.randn(d, device=dev, dtype=torch.bfloat16), torch.randn(d, device=dev, dtype=torch.bfloat16)

    def layer(source, position, key, value, x):
        torch.mul(source, 2.0, out=x)  # a kernel (as the step's first-norm sums are), not a memcpy: see below
        h = x
        outputs = []
        for i, (q, s, o) in enumerate(weights[:3]):
            h = int4_triton.gemv(h, q, s, o, h.shape[1], ws, int4_triton.tile_config(tiles[i]))
            outputs.append(h)
        mask = torch.arange(length, device=dev) <= position  # recomputed from the position tensor each replay
        att = fused.decode_attention_qkv(h.view(-1), None, cos, sin, position, key, value, mask, d ** -0.5, hq,
                                         *attention_ws)
        q, s, o = weights[3]
        outputs.append(int4_triton.gemv(att.reshape(1, -1), q, s, o, hq * d, ws, int4_triton.tile_config(tiles[3])))
        return outputs

    def fresh_cache():
        torch.manual_seed(1)
        return (torch.randn(1, hkv, length, d, device=dev, dtype=torch.bfloat16),
                torch.randn(1, hkv, length, d, device=dev, dtype=torch.bfloat16))

    monkeypatch.setenv(pdl.ENV, str(level))
    source = torch.empty(1, hidden, device=dev, dtype=torch.bfloat16)
    position = torch.zeros(1, device=dev, dtype=torch.long)
    x = torch.empty_like(source)
    key, value = fresh_cache()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compiled before the capture
        layer(source.normal_(), position, key.clone(), value.clone(), x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = layer(source, position, key, value, x)
    plain_key, plain_value = fresh_cache()
    for step in range(12):
        source.normal_()
        position.fill_(100 + 37 * step)
        monkeypatch.setenv(pdl.ENV, str(level))
        graph.replay()
        torch.cuda.synchronize()
        monkeypatch.setenv(pdl.ENV, "0")
        expected = layer(source.clone(), position.clone(), plain_key, plain_value, torch.empty_like(x))
        for got, want in zip(outputs, expected):
            assert torch.equal(got, want), (step, float((got.float() - want.float()).abs().max()))
        assert torch.equal(key, plain_key) and torch.equal(value, plain_value), step


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                    reason="needs a Hopper (or later) GPU")
def test_an_early_gemv_right_after_a_device_copy_in_a_graph_reads_the_copy(monkeypatch):
    """A GEMV launched early (level 2) whose x comes from a device-to-device copy (a memcpy node in the graph,
    not a kernel): the graph captures, and every replay sees the new x."""
    from models.kernels import int4, int4_triton
    from models.kernels.int4 import dequantize_reference, quantize

    monkeypatch.setenv(pdl.ENV, "2")
    torch.manual_seed(0)
    n = k = 2048
    q, s, o = quantize(torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5)
    w = dequantize_reference(q, s, o, k, torch.float32)
    ws = int4.new_workspace(n, torch.device("cuda"))
    source = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    x = torch.empty_like(source)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        x.copy_(source)
        int4_triton.gemv(x, q, s, o, k, ws, int4_triton.tile_config(0))
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        x.copy_(source)
        y = int4_triton.gemv(x, q, s, o, k, ws, int4_triton.tile_config(0))
    for _ in range(10):
        source.normal_()
        graph.replay()
        ref = source.float() @ w.T
        assert float((y.float() - ref).norm() / ref.norm()) < 1e-2
