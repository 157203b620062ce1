"""The fused decode attention (models/kernels/decode_attention.py) against the plain matmul-softmax-matmul
form over many head layouts, windows and positions: in Triton's interpreter on the CPU, compiled on a GPU;
and how the fast decoder's attention (models/attention.py) routes a decode step to it."""

import os
import sys
from pathlib import Path

import pytest
import torch

from models.attention import WORKSPACE_ATTR, _decode_attention, attach_decode_workspace
from models.kernels import decode_attention as fused
from models.kernels import split_k
from tests.kernel_check import on_every_core, run_check

ROOT = Path(__file__).resolve().parents[1]

# (query heads, KV heads, head dim, cache length, window, position, chunk or None for the app's split)
SMALL = [
    (4, 1, 16, 128, 64, 10, None),  # one chunk, most keys masked
    (8, 2, 32, 256, 192, 191, 64),  # three chunks, all attended
    (7, 1, 16, 128, 128, 0, 64),  # a group of 7 (Qwen's 28/4) padded to 16 rows; one key: the rest all masked
    (16, 8, 64, 320, 256, 100, 64),  # chunks after the position: nothing to attend
    (2, 2, 16, 64, 64, 63, None),  # no grouping
    (32, 8, 16, 256, 192, 130, 128),  # an uneven last chunk
]
GPU = SMALL + [
    (32, 8, 128, 4160, 512, 300, None),  # InternLM2.5-7B, short chat
    (32, 8, 128, 4160, 4096, 4000, None),  # ... the whole window
    (16, 8, 128, 4160, 1024, 1023, None),  # InternLM2-1.8B
    (28, 4, 128, 4160, 2048, 1500, None),  # Qwen2.5-7B
    (32, 8, 128, 33000, 32768, 20000, None),  # a window long enough for chunks longer than CHUNK
    (32, 8, 128, 4160, 4096, 4095, 64),  # the most chunks the workspace holds
]

_CHECK = r"""
import json, sys, torch
from models.kernels import decode_attention as fused
cases, device = json.loads(sys.argv[1]), sys.argv[2]
torch.manual_seed(0)
out = []
for hq, hkv, d, length, window, pos, chunk in cases:
    for dtype in (torch.float32, torch.bfloat16):
        q = torch.randn(1, hq, d, device=device).to(dtype)
        k = torch.randn(1, hkv, length, d, device=device).to(dtype)
        v = torch.randn(1, hkv, length, d, device=device).to(dtype)
        k[:, :, pos + 1:] *= 50  # stale entries past the position: large, and invisible
        v[:, :, pos + 1:] *= 50
        mask = torch.arange(window, device=device) <= pos
        ws = fused.new_workspace(hq, hkv, d, device)
        ref = fused.reference(q.float(), k.float(), v.float(), mask, d ** -0.5)
        got = fused._run_kernel(q, k, v, mask, d ** -0.5, *ws, chunk=chunk)
        again = fused._run_kernel(q, k, v, mask, d ** -0.5, *ws, chunk=chunk)  # the counters were reset
        out.append({"case": [hq, hkv, d, window, pos, chunk], "dtype": str(dtype),
                    "err": float((got.float() - ref).abs().max() / ref.abs().max()),
                    "same_again": bool(torch.equal(got, again)), "counters": int(ws[1].abs().sum())})
print(json.dumps(out))
"""


def _check(cases, device: str, interpret: bool) -> None:
    rows = run_check(_CHECK, cases, device, interpret, old_interpreter_skips=True)
    assert len(rows) == 2 * len(cases)
    for row in rows:
        # fp32: the kernel's order of sums (on a GPU its dots run in TF32: 10-bit mantissas);
        # bf16: the output's rounding and the probabilities in bf16
        fp32_tolerance = 1e-5 if interpret else 3e-3
        assert row["err"] < (fp32_tolerance if row["dtype"] == "torch.float32" else 1.5e-2), row
        assert row["same_again"] and row["counters"] == 0, row


# The q/k/v form (decode_attention_qkv): rotation, bias and the cache write in the same kernel.
_CHECK_QKV = r"""
import json, sys, torch
from models.kernels import decode_attention as fused
cases, device = json.loads(sys.argv[1]), sys.argv[2]
torch.manual_seed(0)
out = []
for hq, hkv, d, length, window, pos, chunk in cases:
    for dtype in (torch.float32, torch.bfloat16):
        for with_bias in (False, True):
            qkv = torch.randn((hq + 2 * hkv) * d, device=device).to(dtype)
            bias = (torch.randn((hq + 2 * hkv) * d, device=device) * 0.3).to(dtype) if with_bias else None
            angle = torch.rand(d // 2, device=device) * 6.28
            cos, sin = torch.cat([angle.cos()] * 2).to(dtype), torch.cat([angle.sin()] * 2).to(dtype)
            k = torch.randn(1, hkv, length, d, device=device).to(dtype)
            v = torch.randn(1, hkv, length, d, device=device).to(dtype)
            k[:, :, pos + 1:] *= 50  # stale entries past the position: large, and invisible
            v[:, :, pos + 1:] *= 50
            k_ref, v_ref = k.float(), v.float()
            mask = torch.arange(window, device=device) <= pos
            if with_bias:  # a mask that lets everything through: nothing after the position is read all the same
                mask = torch.ones(window, dtype=torch.bool, device=device)
            position = torch.tensor([pos], device=device)
            ws = fused.new_workspace(hq, hkv, d, device)
            ref = fused.qkv_reference(qkv.float(), None if bias is None else bias.float(), cos.float(), sin.float(),
                                      position, k_ref, v_ref, mask, d ** -0.5, hq)
            k_before, v_before = k.clone(), v.clone()
            got = fused._run_qkv_kernel(qkv, bias, cos, sin, position, k, v, mask, d ** -0.5, hq, *ws, chunk=chunk)
            again = fused._run_qkv_kernel(qkv, bias, cos, sin, position, k, v, mask, d ** -0.5, hq, *ws, chunk=chunk)
            others = torch.ones(length, dtype=torch.bool, device=device)
            others[pos] = False
            out.append({"case": [hq, hkv, d, window, pos, chunk], "dtype": str(dtype), "bias": with_bias,
                        "err": float((got.float() - ref).abs().max() / ref.abs().max()),
                        "k_err": float((k[:, :, pos].float() - k_ref[:, :, pos]).abs().max() / k_ref[:, :, pos].abs().max()),
                        "v_err": float((v[:, :, pos].float() - v_ref[:, :, pos]).abs().max() / v_ref[:, :, pos].abs().max()),
                        "rest_untouched": bool(torch.equal(k[:, :, others], k_before[:, :, others])
                                               and torch.equal(v[:, :, others], v_before[:, :, others])),
                        "same_again": bool(torch.equal(got, again)), "counters": int(ws[1].abs().sum())})
print(json.dumps(out))
"""


def _check_qkv(cases, device: str, interpret: bool) -> None:
    rows = run_check(_CHECK_QKV, cases, device, interpret, old_interpreter_skips=True)
    assert len(rows) == 4 * len(cases)
    for row in rows:
        bf16 = row["dtype"] == "torch.bfloat16"
        # bf16: q and k rounded once (one bf16 step: 2**-8 of the largest), then as _check
        assert row["err"] < (2e-2 if bf16 else 1e-5 if interpret else 3e-3), row
        assert row["k_err"] < (2**-7 if bf16 else 1e-6) and row["v_err"] < (2**-7 if bf16 else 1e-6), row
        assert row["rest_untouched"] and row["same_again"] and row["counters"] == 0, row


def test_the_qkv_kernel_rotates_writes_and_attends_like_the_plain_form_in_the_interpreter():
    """With and without a bias: the token's key and value land at its position and nowhere else, and the
    attention sees them (the position's chunk writes, then reads its chunk); the (large) stale keys after
    the position are never attended, even where the mask would let them through."""
    pytest.importorskip("triton")
    _check_qkv(SMALL, "cpu", interpret=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_qkv_kernel_rotates_writes_and_attends_like_the_plain_form_on_the_gpu():
    _check_qkv(GPU, "cuda", interpret=False)


def test_the_kernel_equals_the_plain_form_in_the_interpreter():
    """Grouped heads padded to 16 rows, several chunks a head, chunks with nothing to attend, stale keys."""
    pytest.importorskip("triton")
    _check(SMALL, "cpu", interpret=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_kernel_equals_the_plain_form_on_the_gpu():
    """The same check compiled, with the app's real head layouts and windows up to 32k positions."""
    _check(GPU, "cuda", interpret=False)


def test_splits_cover_the_window_within_the_workspace():
    for window in [64, 128, 192, 512, 4096, 8192, 8256, 32768, 131072]:
        splits, chunk = fused.splits_for(window)
        assert splits <= split_k.ATTENTION_MAX_SPLITS and chunk % fused.BLOCK_L == 0 and chunk >= fused.CHUNK
        assert (splits - 1) * chunk < window <= splits * chunk, (window, splits, chunk)
    assert fused.splits_for(512) == (4, fused.CHUNK) and fused.splits_for(4096) == (16, fused.LONG_CHUNK)
    assert split_k.attention_rows(28, 4) == 16 and split_k.attention_rows(64, 2) == 32 and split_k.attention_rows(1, 1) == 16


def test_decode_step_attention_goes_through_the_op_and_equals_the_plain_form():
    """On the CPU the op is the plain form; a batch of two (no workspace path) gives the same rows."""
    torch.manual_seed(1)
    hq, hkv, d, length, window = 8, 2, 16, 96, 64

    class Attention(torch.nn.Module):
        layer_idx, num_key_value_groups = 0, hq // hkv

    module = Attention()
    q, k, v = torch.randn(2, hq, 1, d), torch.randn(2, hkv, length, d), torch.randn(2, hkv, length, d)
    mask = (torch.arange(window) <= 40).view(1, 1, 1, -1).expand(2, 1, 1, window)
    plain, _ = _decode_attention(module, q, k, v, mask, scaling=0.25)
    assert plain.shape == (2, 1, hq, d)
    setattr(module, WORKSPACE_ATTR, fused.new_workspace(hq, hkv, d, "cpu"))
    one, _ = _decode_attention(module, q[:1], k[:1], v[:1], mask[:1], scaling=0.25)
    ref = fused.reference(q[:1].view(1, hq, d), k[:1], v[:1], mask[0].view(-1), 0.25)
    assert torch.equal(one.view(1, hq, d), ref) and torch.equal(one, plain[:1])


def test_the_fused_attention_is_precompiled_for_the_model_that_will_run_it(tiny_llama):
    """A model with fused q/k/v projections names its attention layout (heads, KV heads, head dim, bias) to the
    precompile, which plans two compiles of the q/k/v kernel (the two specializations its windows take);
    one without fused projections plans none. Nothing is compiled without CUDA."""
    from transformers import AutoModelForCausalLM

    from models.fused_projections import fuse_projections
    from models.kernels import int4, int4_precompile

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    assert int4.attention_layout(model) is None
    fuse_projections(model)
    config = model.config
    layout = int4.attention_layout(model)
    assert layout == (config.num_attention_heads, config.num_key_value_heads,
                      config.hidden_size // config.num_attention_heads, False)
    if fused.triton is not None:
        assert len(fused.qkv_compile_jobs(*layout, torch.bfloat16)) == 2
    if not torch.cuda.is_available():
        assert int4_precompile.precompile([(64, 64)], torch.bfloat16, layout) == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_after_the_precompile_the_first_decode_steps_compile_no_attention_kernel():
    """The precompile's guess of the q/k/v kernel's specializations is the launch's: for the 7B's heads, a
    step at a 512-position window and one at 4,096 find their kernels compiled."""
    from models.kernels import int4_precompile

    device = torch.cuda.current_device()
    cache = fused._decode_attention_qkv_kernel.device_caches[device][0]
    cache.clear()
    hq, hkv, d, length = 32, 8, 128, 4160
    from models.kernels import attention_cluster

    cluster_jobs = len(attention_cluster.compile_jobs(hq, hkv, d, False, torch.bfloat16, 0, torch.device("cuda", device)))
    futures = int4_precompile.precompile([], torch.bfloat16, (hq, hkv, d, False))
    assert len(futures) == 2 + cluster_jobs and int4_precompile.wait_precompiled(futures) == 0
    compiled = len(cache)
    assert compiled == 2
    key = torch.randn(1, hkv, length, d, device="cuda", dtype=torch.bfloat16)
    value = torch.randn_like(key)
    ws = fused.new_workspace(hq, hkv, d, key.device)
    angle = torch.rand(d // 2, device="cuda")
    cos = torch.cat([angle.cos()] * 2).bfloat16()
    sin = torch.cat([angle.sin()] * 2).bfloat16()
    for window, pos in [(512, 300), (4096, 3000)]:
        qkv = torch.randn((hq + 2 * hkv) * d, device="cuda", dtype=torch.bfloat16)
        mask = torch.arange(window, device="cuda") <= pos
        fused._run_qkv_kernel(qkv, None, cos, sin, torch.tensor([pos], device="cuda"), key, value, mask, d ** -0.5,
                              hq, *ws)
    torch.cuda.synchronize()
    assert len(cache) == compiled, "a decode step compiled an attention kernel the precompile did not"


def test_every_attention_module_shares_one_workspace(tiny_llama):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    size = attach_decode_workspace(model, torch.device("cpu"))
    spaces = [getattr(layer.self_attn, WORKSPACE_ATTR) for layer in model.model.layers]
    assert len(spaces) == model.config.num_hidden_layers and all(s is spaces[0] for s in spaces)
    c = model.config
    assert size == 4 * split_k.attention_partial_floats(c.num_attention_heads, c.num_key_value_heads,
                                                        c.hidden_size // c.num_attention_heads) + 4 * c.num_key_value_heads


@pytest.mark.parametrize("capability", [86, 89, 90])  # the 8 GB cards' Ampere and Ada, and Hopper
def test_the_kernel_compiles_for_consumer_gpus_within_their_shared_memory(capability):
    """The app's tile compiles for Ampere, Ada and Hopper (no GPU needed), for every head grouping, in
    less shared memory than a consumer card gives a block (99 KiB on sm_86/89). It runs at the
    register limit: a 128 x 128 key tile and its values pass through registers on their way to the
    tensor cores. The tile the H200 timed spills a few registers (24 bytes on sm_90 under Triton 3.6);
    more than 64 bytes would be a regression to look at."""
    triton = pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("compiles for a GPU")
    import triton.compiler as tc
    from triton.backends.compiler import GPUTarget

    sys.path.insert(0, str(ROOT))
    from bench.int4_sass import resource_usage

    signature = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "mask_ptr": "*i1", "out_ptr": "*bf16",
                 "ws_ptr": "*fp32", "lock_ptr": "*i32", "W": "i32", "CHUNK_KEYS": "i32", "SPLITS": "i32",
                 "stride_kh": "i32", "stride_kl": "i32", "stride_vh": "i32", "stride_vl": "i32", "scaling": "fp32"}
    qkv_signature = {"qkv_ptr": "*bf16", "bias_ptr": "*bf16", "cos_ptr": "*bf16", "sin_ptr": "*bf16", "pos_ptr": "*i64",
                     **{name: kind for name, kind in signature.items() if name != "q_ptr"}}
    cases = []
    for hq, hkv in [(32, 8), (16, 8), (28, 4), (12, 2), (32, 2)]:  # InternLM2.5-7B, 1.8B, Qwen 7B, 1.5B, InternLM3-8B
        constexprs = {"GROUP": hq // hkv, "ROWS": split_k.attention_rows(hq, hkv), "HEAD_DIM": 128,
                      "BLOCK_L": fused.BLOCK_L, "DOT_FP32": False, "PDL": 0}  # no dependent launch before Hopper
        qkv_constexprs = dict(constexprs, Q_HEADS=hq, KV_HEADS=hkv, HAS_BIAS=hkv == 4)  # the q/k/v form; Qwen's bias
        cases += [(fused._decode_attention_kernel, signature, constexprs),
                  (fused._decode_attention_qkv_kernel, qkv_signature, qkv_constexprs)]

    def compiled(case):
        fn, sig, consts = case
        source = tc.ASTSource(fn=fn, constexprs=consts, attrs={}, signature=dict(sig, **{name: "constexpr" for name in consts}))
        kernel = triton.compile(source, target=GPUTarget("cuda", capability, 32),
                                options={"num_warps": fused.NUM_WARPS, "num_stages": fused.NUM_STAGES})
        return kernel.metadata.shared, resource_usage(kernel)
    for (fn, _, consts), (shared, usage) in zip(cases, on_every_core(compiled, cases)):
        assert shared <= 99 * 1024 and usage["stack"] <= 64, (fn, capability, consts, usage)
