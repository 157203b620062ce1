"""bench/persistent_probe.py's persistent GEMV chain against plain PyTorch: its arithmetic in Triton's
interpreter (one program, which alone can pass a grid barrier there, dealt every item), the whole grid
with its barriers and L2 requests compiled on a GPU."""

import pytest
import torch

from tests.kernel_check import run_check

# (K, N) per phase; each phase reads the first K of the one before, the first the layer before's last
TINY = [(128, 256), (256, 128), (128, 512), (512, 128)]

_CHECK = r"""
import json, sys, torch
from bench import persistent_probe as probe
cases, device = json.loads(sys.argv[1]), sys.argv[2]
out = []
for linears, layers, programs, block_n, warps, phases_per_launch, ask_next, splits in cases:
    linears = [tuple(l) for l in linears]
    chain = probe.random_chain(linears, layers, device)
    x = torch.randn(linears[0][0], generator=torch.Generator().manual_seed(1)).to(device)
    want = probe.reference(x, chain, layers)
    got = torch.full((layers, sum(n for _, n in linears)), float("nan"), device=device)
    bar = torch.zeros(1, dtype=torch.int32, device=device)
    if splits is None:
        probe.persistent_step(x, chain, got, bar, programs, layers, phases_per_launch, block_n, warps, ask_next)()
    else:  # chosen slices, some uneven or empty (3 slices of 4 groups: 2, 2, 0)
        got.zero_()
        probe.run_persistent(x, chain, got, bar, programs, 0, 4 * layers, block_n, warps, ask_next, splits)
    err = float(((got - want).abs().max() / want.abs().max()).item())
    out.append({"err": err, "barriers": int(bar.item()), "finite": bool(torch.isfinite(got).all())})
print(json.dumps(out))
"""


def _check(cases, device: str, interpret: bool, tolerance: float) -> list[dict]:
    rows = run_check(_CHECK, cases, device, interpret)
    assert len(rows) == len(cases)
    for case, row in zip(cases, rows):
        # fp16 products of the packed-fp16 loop (int4_half2.py), summed in fp32, over 2-3 chained GEMVs
        assert row["finite"] and row["err"] < tolerance, (case, row)
    return rows


def test_the_persistent_chain_equals_plain_pytorch_in_the_interpreter():
    """Every phase of two layers, in one launch, one per layer and one per phase, with K split 1-4 ways (an
    empty slice too)."""
    pytest.importorskip("triton")
    cases = [
        [TINY, 2, 1, 16, 1, 8, False, None],
        [TINY, 2, 1, 16, 1, 4, False, None],
        [TINY, 2, 1, 16, 1, 1, False, None],
        [TINY, 2, 1, 32, 1, 8, False, [2, 1, 4, 3]],
    ]
    rows = _check(cases, "cpu", interpret=True, tolerance=1e-2)
    # one barrier after each phase but the launch's last (a one-program grid): 4 phases x 2 layers - 1 in one
    # launch, 3 in the last of two, none in a launch of one phase
    assert [row["barriers"] for row in rows] == [7, 3, 0, 7]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_persistent_chain_equals_plain_pytorch_on_the_gpu():
    """The whole grid resident, barriers between phases, with and without asking the L2 ahead: the 1.8B's
    layer shapes and the tiny chain."""
    from bench.int4_kernels import LAYERS, fused

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    real = fused(LAYERS["1.8b"][1])
    cases = [[TINY, 2, 4, 16, 1, 8, True, None], [real, 2, sms, 256, 2, 8, True, None],
             [real, 2, 2 * sms, 128, 1, 4, False, None], [real, 3, sms, 512, 4, 12, False, None],
             [real, 2, 4 * sms, 256, 2, 1, False, None]]
    rows = _check(cases, "cuda", interpret=False, tolerance=1e-2)
    assert [row["barriers"] for row in rows] == [4 * 7, sms * 7, 2 * sms * 3, sms * 11, 0]


def test_the_persistent_kernel_compiles_for_hopper_without_spills():
    """Compiled for sm_90 at the bench's tiles (no GPU needed): no more registers than the app's packed-fp16
    tile of the same rows (128: one phase's worth, so as many programs fit an SM), nothing spilled, each
    program's arrival at a barrier counted once with release semantics over the GPU, and L2 requests for
    the next phase's weights exactly where asked for."""
    import os
    import re

    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("compiles for a GPU")
    import triton
    import triton.compiler as tc
    from triton.backends.compiler import GPUTarget

    from bench import persistent_probe as probe
    from bench.int4_sass import resource_usage

    kinds = {"x_ptr": "*fp32", "out_ptr": "*fp32", "bar_ptr": "*i32"}
    signature = {name: kinds.get(name) or ("*i32" if re.fullmatch(r"w\d", name) else "*bf16" if re.fullmatch(r"[so]\d", name)
                                           else "constexpr" if name.isupper() or name == "BLOCK_N" else "i32")
                 for name in probe._layers_kernel.arg_names}
    for block_n, warps, ask_next in [(256, 2, False), (256, 2, True), (512, 4, True)]:
        constexprs = {"BLOCK_N": block_n, "ASK_NEXT": ask_next, "ASM": True}
        source = tc.ASTSource(fn=probe._layers_kernel, constexprs=constexprs, signature=signature, attrs={})
        kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": 1})
        usage = resource_usage(kernel)
        assert usage["stack"] == 0 and usage["registers"] <= 128, (block_n, warps, ask_next, usage)
        ptx = kernel.asm["ptx"]
        arrivals = [line for line in ptx.splitlines() if re.search(r"\b(red|atom)\.global\.gpu\.release\.add\.u32", line)]
        assert len(arrivals) == 1 and arrivals[0].strip().startswith("@"), arrivals  # one thread's, predicated
        assert ("prefetch.global.L2" in ptx) == ask_next


def test_the_random_chain_keeps_its_size_through_the_benchs_layers():
    """The packed-fp16 loop takes x in fp16's range (|x| < 4e6 after its 2**-6 scale): the bench's weights keep
    each phase's output about its input's size through the layers of a real shape (biased weights grew ~800x a
    layer: three layers show it; the bench runs eight)."""
    from bench import persistent_probe as probe
    from bench.int4_kernels import LAYERS, fused

    linears = fused(LAYERS["1.8b"][1])
    chain = probe.random_chain(linears, 3, "cpu")
    out = probe.reference(torch.randn(linears[0][0], generator=torch.Generator().manual_seed(0)), chain, 3)
    sizes = out.abs().amax(1)
    assert sizes.max() < 20 and sizes.min() > 0.2, sizes
