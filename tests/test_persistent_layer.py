"""bench/persistent_layer.py's whole-layer persistent kernel against plain PyTorch: in Triton's interpreter with
one program (the only grid that passes a barrier there), dealt every item of every phase; on a GPU with the
whole grid resident. The residual after the layers, and the caches the attention phase wrote, must match."""

import pytest
import torch

from tests.kernel_check import run_check

# (hidden, query heads, KV heads, intermediate); head dim 128. Position 300 in a 512-position window: four
# chunks of keys per KV head, one of them holding the token (it writes the key and value first), positions
# after it stale and large (never attended).
TINY = (256, 4, 2, 256)

_CHECK = r"""
import json, sys, torch
from bench import persistent_layer as layer
cases, device = json.loads(sys.argv[1]), sys.argv[2]
out = []
for dims, layers, cache_len, position, programs, per_layer, block_n, warps, *prefetch in cases:
    problem = layer.make_problem(tuple(dims), layers, cache_len, position, device)
    want, want_keys, want_values = layer.reference(problem)
    bufs = layer.buffers(problem)
    keys, values = problem["keys"].clone(), problem["values"].clone()
    layer.run_layers(problem, bufs, keys, values, programs, per_layer, block_n, warps, check_fit=True,
                     prefetch_mb=prefetch[0] if prefetch else 0.0)
    got = bufs["h"][-dims[0]:]
    out.append({"err": float(((got - want).abs().max() / want.abs().max()).item()),
                "keys": float((keys.float() - want_keys.float()).abs().max().item()),
                "values": float((values.float() - want_values.float()).abs().max().item()),
                "barriers": int(bufs["bar"].item()),
                "counters": int(bufs["locks"].abs().sum().item() + bufs["tile_locks"].abs().sum().item())})
print(json.dumps(out))
"""


def _check(cases, device: str, interpret: bool) -> list[dict]:
    rows = run_check(_CHECK, cases, device, interpret)
    assert len(rows) == len(cases)
    for case, row in zip(cases, rows):
        # fp16 products in the GEMVs (int4_half2.py), bf16 queries and probabilities in the attention
        assert row["err"] < 2e-2 and row["keys"] < 0.05 and row["values"] < 0.05, (case, row)
        assert row["counters"] == 0, (case, row)  # every attention and SiLU counter reset for the next step
    return rows


def test_the_persistent_layer_equals_plain_pytorch_in_the_interpreter():
    """Two layers, in one launch and in one launch each."""
    pytest.importorskip("triton")
    rows = _check([[TINY, 2, 512, 300, 1, False, 16, 1], [TINY, 2, 512, 300, 1, True, 16, 1]], "cpu", interpret=True)
    # a barrier after each of the 5 phases but a launch's last: 9 in one launch for two layers, 4 in the last of two
    assert [row["barriers"] for row in rows] == [9, 4]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_persistent_layer_equals_plain_pytorch_on_the_gpu():
    """The 1.8B's layer shape at position 600 (window 1,024, chunks of 128), the whole grid resident; the 7B's with
    the attention phase's idle programs asking the L2 for o's and gate/up's weights."""
    from bench.persistent_layer import SHAPES

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = _check([[TINY, 2, 512, 300, 4, False, 16, 4], [SHAPES["1.8b"], 2, 4160, 600, sms, False, 512, 4],
                   [SHAPES["1.8b"], 2, 4160, 600, 2 * sms, True, 256, 4],
                   [SHAPES["7b"], 2, 4160, 600, 2 * sms, False, 256, 4, 24.0]],  # idle programs asking the L2
                  "cuda", interpret=False)
    assert [row["barriers"] for row in rows] == [4 * 9, sms * 9, 2 * sms * 4, 2 * sms * 9]


def test_the_persistent_layer_compiles_for_hopper_without_spills():
    """Compiled for sm_90 at the kernel's tiles and the app's head layouts (no GPU needed): at most a few bytes spilled."""
    import os
    import re

    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("compiles for a GPU")
    import triton
    import triton.compiler as tc
    from triton.backends.compiler import GPUTarget

    from bench.int4_sass import resource_usage
    from bench import persistent_kernels as layer
    from models.kernels.split_k import attention_rows
    from tests.kernel_check import on_every_core

    pointers = {"bar_ptr": "*i32", "lock_ptr": "*i32", "tile_lock_ptr": "*i32", "k_ptr": "*bf16", "v_ptr": "*bf16",
                "mask_ptr": "*i1", "pos_ptr": "*i64", "bias_ptr": "*bf16", "gamma_in_ptr": "*bf16",
                "gamma_post_ptr": "*bf16", "ones_ptr": "*bf16", "cos_ptr": "*bf16", "sin_ptr": "*bf16"}

    def kind(name: str) -> str:
        if re.fullmatch(r"w[qogd]", name):
            return "*i32"
        if re.fullmatch(r"[so][qogd]", name):
            return "*bf16"
        if name.endswith("_ptr"):
            return pointers.get(name, "*fp32")
        return "fp32" if name in ("scaling", "eps") else "i32"

    def usage(case):
        (hq, hkv, bias), (block_n, warps) = case
        constexprs = dict(Q_HEADS=hq, KV_HEADS=hkv, ROWS=attention_rows(hq, hkv), HEAD_DIM=128,
                          BLOCK_L=layer.BLOCK_L, DOT_FP32=False, BLOCK_N=block_n, ASM=True, HAS_BIAS=bias)
        signature = {name: "constexpr" if name in constexprs else kind(name) for name in layer.layer_kernel.arg_names}
        source = tc.ASTSource(fn=layer.layer_kernel, constexprs=constexprs, signature=signature, attrs={})
        return resource_usage(triton.compile(source, target=GPUTarget("cuda", 90, 32),
                                             options={"num_warps": warps, "num_stages": 1}))
    # the 1.8B's and 7B's heads; Qwen2.5-7B's, whose q/k/v has a bias
    cases = [(heads, tile) for heads in ((16, 8, False), (32, 8, False), (28, 4, True)) for tile in layer.TILES]
    for case, used in zip(cases, on_every_core(usage, cases)):
        # 255 registers a thread (the attention's): a few values may go to the stack (8-32 bytes with the norms'
        # weights loaded in the GEMVs), not the kilobytes a 128-key attention step or 2 warps spilled
        assert used["stack"] <= 32, (case, used)
