"""RMSNorms folded into the int4 GEMVs (models/kernels/int4_epilogue.py, int4_folded.py, models/folded_norms.py):
the GEMV's two epilogues against plain PyTorch over many shapes and tiles (Triton's interpreter on the
CPU, compiled on a GPU), the ops' CPU form, and a quantized tiny model whose decode step folds its norms
giving the logits and greedy tokens of the unfolded step."""

import threading

import pytest
import torch

from tests.kernel_check import IN_THE_INTERPRETER_AND_ON_THE_GPU, run_check

# (N, K, RMS of x): a hidden size of 64 ... 1000, ragged N and K among them; x as large as a residual
# stream's outliers (2e5: the packed-fp16 loop's sums would overflow fp16 if x were not scaled as loaded)
SHAPES = [(64, 128, 1.0), (48, 200, 0.02), (130, 256, 1.0), (96, 1000, 2e5), (256, 384, 30.0)]

_EPILOGUE_CHECK = r"""
import json, sys, torch
from models.kernels import int4, int4_epilogue, int4_mma, int4_triton
from models.kernels.split_k import split_fits
torch.manual_seed(0)
shapes, device = json.loads(sys.argv[1]), sys.argv[2]
if device == "cpu":  # the interpreter: small tiles, split and not, and the packed-fp16 loop
    configs = [dict(BLOCK_N=16, SPLIT=2), dict(BLOCK_N=32, SPLIT=1), dict(BLOCK_N=16, SPLIT=3, HALF2=True)]
    configs = [dict(c, num_warps=1, num_stages=1) for c in configs]
else:  # the app's tiles: Triton's, and the tensor-core GEMV's (int4_mma.py) where the GPU has them
    configs = [int4_triton.tile_config(i) for i in range(int4_triton.tile_count())]


def to_bf16(t):  # fp32 to bf16 as the kernel rounds: to nearest even on a GPU; Triton's interpreter truncates
    if device != "cpu":
        return t.bfloat16()
    return (t.float().view(torch.int32) & -65536).view(torch.float32).bfloat16()


out = []
for n, k, x_size in shapes:
    q, s, o = int4.quantize(torch.randn(n, k, device=device))
    w = int4.dequantize_reference(q, s, o, k, torch.float32)
    # x as the GEMV after a folded norm sees it: h * g, h not normalized (x_size: its RMS)
    x = (x_size * torch.randn(1, k, device=device)).bfloat16()
    residual = (3 * torch.randn(1, n, device=device)).bfloat16()
    gamma = (1 + 0.3 * torch.randn(n, device=device)).bfloat16()
    sums_in = (x.float().square().sum() / 5 * (0.5 + torch.rand(5, device=device))).contiguous()
    eps = 1e-6
    y = x.float() @ w.T
    h_ref = (residual.float() + y.bfloat16().float()).bfloat16()
    scaled_ref = y * torch.rsqrt(sums_in.sum() / k + eps)
    errs = []
    for config in configs:
        if not split_fits(config["SPLIT"], n):
            continue
        if "MMA" in config and not int4_mma.tile_fits(config["MMA"], n, torch.device(device)):
            continue
        ws = int4.new_workspace(n, device)
        normed = torch.empty(1, n, dtype=torch.bfloat16, device=device)
        h = torch.empty_like(normed)
        sums = torch.full((-(-n // config["BLOCK_N"]),), float("nan"), device=device)
        int4_triton.launch(x, q, s, o, k, normed, ws, config, (residual, gamma, h, sums, sums.numel(), 0.0),
                           int4_epilogue.RESIDUAL_NORM)
        scaled = torch.empty(1, n, dtype=torch.bfloat16, device=device)
        int4_triton.launch(x, q, s, o, k, scaled, ws, config, (scaled, scaled, scaled, sums_in, 5, eps),
                           int4_epilogue.SCALED)
        activated = torch.full((1, n // 2), float("nan"), dtype=torch.bfloat16, device=device)
        int4_triton.launch(x, q, s, o, k, activated, ws, config, (activated,) * 3 + (sums_in, 5, eps),
                           int4_epilogue.SCALED_SILU_MUL)
        # the rows as gate, up, gate, up, ...: SiLU(gate) * up of the scaled rows, rounded where the model rounds
        pairs = scaled.float().view(1, n // 2, 2)  # every N here is even, as a fused gate/up is
        silu = to_bf16(pairs[..., 0] / (1 + torch.exp(-pairs[..., 0]))).float()
        activated_want = to_bf16(silu * pairs[..., 1])
        # The plain GEMV with the same tile sums the same partials in the same order: the residual add and
        # the norm's input are then exact, bit for bit, in bf16.
        plain = int4_triton.gemv(x, q, s, o, k, ws, config)
        h_plain = to_bf16(residual.float() + plain.float())
        errs.append({"config": str(config),
                     "h_exact": bool(torch.equal(h, h_plain)),
                     "normed_exact": bool(torch.equal(normed, to_bf16(h.float() * gamma.float()))),
                     "sums": abs(sums.sum().item() - h.float().square().sum().item()) / h.float().square().sum().item(),
                     "h_vs_reference": ((h.float() - h_ref.float()).abs().max() / h_ref.float().abs().max()).item(),
                     "scaled": ((scaled.float() - scaled_ref).abs().max() / scaled_ref.abs().max()).item(),
                     # the same scaled rows (the same tile and sums) through SiLU-mul: one bf16 step at most
                     "silu_mul": ((activated.float() - activated_want.float()).abs().max()
                                  / activated_want.float().abs().max()).item(),
                     "counters_zero": bool((ws[1] == 0).all())})
    out.append(errs)
print(json.dumps(out))
"""


def _check_epilogues(device: str, interpret: bool) -> None:
    rows = run_check(_EPILOGUE_CHECK, SHAPES, device, interpret)
    assert len(rows) == len(SHAPES)
    for (n, k, _), errs in zip(SHAPES, rows):
        assert errs, (n, k)
        for e in errs:
            where = (n, k, e["config"])
            assert e["counters_zero"], where  # the split-K counters are left for the next call
            assert e["h_exact"] and e["normed_exact"], (where, e)
            assert e["sums"] < 1e-5 and e["silu_mul"] <= 2 ** -7, (where, e)
            # against the dequantized weight: the GEMV's own tolerance (bf16 output, the fp16 loop's sums);
            # h is rounded twice (y, then the sum), each a bf16 step at most (the interpreter truncates)
            assert e["scaled"] < 1e-2 and e["h_vs_reference"] < 2 ** -6, (where, e)


@IN_THE_INTERPRETER_AND_ON_THE_GPU
def test_the_folded_norm_epilogues_equal_plain_pytorch(device, interpret):
    _check_epilogues(device, interpret)


def test_the_ops_cpu_form_is_the_norm_around_the_linear():
    from models.kernels.int4 import Int4Linear
    from models.kernels.int4_folded import residual_norm, scaled

    torch.manual_seed(0)
    o_proj = Int4Linear.from_linear(torch.nn.Linear(96, 64, bias=False))
    q_proj = Int4Linear.from_linear(torch.nn.Linear(64, 80, bias=False))
    norm = torch.nn.RMSNorm(64, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_(1, 0.2)
    x, residual = torch.randn(1, 96), torch.randn(1, 64)
    h, normed, sums = residual_norm(o_proj, x, residual, norm.weight.detach())
    torch.testing.assert_close(h, residual + o_proj(x))
    torch.testing.assert_close(sums, h.square().sum().reshape(1))
    with torch.no_grad():
        torch.testing.assert_close(scaled(q_proj, normed, sums, 1e-5), q_proj(norm(h)), atol=1e-4, rtol=1e-4)
        gate_up = q_proj(norm(h))  # rows as gate, up, gate, up, ...
        torch.testing.assert_close(scaled(q_proj, normed, sums, 1e-5, silu_mul=True),
                                   torch.nn.functional.silu(gate_up[:, 0::2]) * gate_up[:, 1::2], atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def tiny_int4_model(tiny_llama):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from models.fused_projections import fuse_projections
    from models.kernels.int4 import quantize_model

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.bfloat16).eval()
    fuse_projections(model)
    quantize_model(model, torch.device("cpu"))
    return model, AutoTokenizer.from_pretrained(tiny_llama)


def test_a_decode_step_with_folded_norms_equals_the_unfolded_one(tiny_int4_model):
    from models.fast_decode import FastDecoder
    from models.folded_norms import folds_norms
    from models.generation import SamplingSettings
    from models.layer_step import LayerLoop

    model, tokenizer = tiny_int4_model
    fast = FastDecoder(model, max_context=128)
    assert folds_norms(model) and fast._layer_loop.folded
    from models.kernels.int4_epilogue import RESIDUAL_NORM, SCALED, SCALED_SILU_MUL

    layer = model.model.layers[0]  # each linear knows the epilogue its tile is to be timed with
    assert (layer.self_attn.qkv_proj.epilogue, layer.self_attn.o_proj.epilogue, layer.mlp.gate_up_proj.epilogue,
            layer.mlp.down_proj.epilogue, model.lm_head.epilogue) == (SCALED, RESIDUAL_NORM, SCALED_SILU_MUL,
                                                                     RESIDUAL_NORM, SCALED)
    folded, unfolded = fast._layer_loop, LayerLoop(model, fast.cache, fold_norms=False)
    positions = torch.arange(fast.windows[-1])
    with torch.inference_mode():
        for pos, token in ((0, 5), (1, 17), (2, 99)):  # each step reads the keys/values the earlier ones wrote
            at = torch.tensor([pos])
            want = unfolded.logits(torch.tensor([[token]]), at, positions)
            got = folded.logits(torch.tensor([[token]]), at, positions)
            # bf16 activations: the folded norm rounds its output once less
            torch.testing.assert_close(got, want, atol=0.05 * want.abs().max().item(), rtol=0)
            assert int(got.argmax()) == int(want.argmax())
    ids = tokenizer("Hello world, this is a test")["input_ids"]
    greedy = SamplingSettings(max_new_tokens=16, temperature=0)
    answer = list(fast.stream(tokenizer, ids, greedy, threading.Event()))[-1].token_ids
    with torch.inference_mode():
        want = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              max_new_tokens=16, do_sample=False)[0, len(ids):].tolist()
    assert answer == want


def test_models_without_int4_projections_keep_their_norms(tiny_llama):
    from transformers import AutoModelForCausalLM

    from models.fast_decode import FastDecoder
    from models.folded_norms import folds_norms

    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    assert not folds_norms(model)
    assert not FastDecoder(model, max_context=64)._layer_loop.folded


@pytest.mark.parametrize("capability", [90, 89, 86])
def test_the_epilogues_compile_without_spilling_and_leave_the_gemv_loop_as_it_was(capability):
    """Hopper, and the 8 GB cards' Ada and Ampere, compiled here (no GPU needed): with either folded-norm epilogue the GEMV
    fits the register file without spilling, and its loop over the weights is the plain GEMV's (as many
    instructions within 1 %: ptxas picks between equivalent forms, IMAD.SHL for SHF.L, differently each time)."""
    pytest.importorskip("triton")
    import os
    import sys
    from pathlib import Path

    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the interpreter's tile list is not the app's")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench.int4_sass import compile_for_hopper, main_loop, resource_usage, sass_of
    from models.kernels import int4_epilogue, int4_triton
    from tests.kernel_check import on_every_core

    def loop_and_usage(config, epilogue, even=True):
        constexprs = {"PREFETCH": True, **config.kwargs, "EVEN": even, "EPILOGUE": epilogue}
        kernel = compile_for_hopper(int4_triton._gemv_body.fn, constexprs, config.num_warps, capability=capability)
        return [op for op, _ in main_loop(sass_of(kernel))], resource_usage(kernel)

    fp32_tile = next(c for c in int4_triton._GEMV_CONFIGS if not c.kwargs.get("HALF2"))
    half2_tile = next(c for c in int4_triton._GEMV_CONFIGS if c.kwargs.get("HALF2"))
    epilogues = (int4_epilogue.SCALED, int4_epilogue.RESIDUAL_NORM, int4_epilogue.SCALED_SILU_MUL)
    cases = [(config, epilogue, True) for config in (fp32_tile, half2_tile)
             for epilogue in (int4_epilogue.STORE, *epilogues)]
    cases.append((half2_tile, int4_epilogue.SCALED, False))  # ragged rows, as a 92,544-row lm_head has on these tiles
    compiled = dict(zip(cases, on_every_core(lambda case: loop_and_usage(*case), cases)))
    for config in (fp32_tile, half2_tile):
        plain_loop, plain_usage = compiled[config, int4_epilogue.STORE, True]
        assert len(plain_loop) > 50
        for epilogue in epilogues:
            loop, usage = compiled[config, epilogue, True]
            where = (capability, config.kwargs, epilogue, usage, plain_usage)
            # a few more registers at most (measured: up to 20 on sm_86, for the x scale the packed-fp16
            # loop takes as an argument); the tile timing times each shape with its epilogue
            assert usage["stack"] == 0 and usage["registers"] <= min(255, plain_usage["registers"] + 24), where
            assert abs(len(loop) - len(plain_loop)) <= 0.01 * len(plain_loop), (where, len(loop), len(plain_loop))
    _, usage = compiled[cases[-1]]
    assert usage["stack"] == 0 and usage["registers"] <= 255, usage


def test_precompile_builds_each_projection_with_the_epilogue_decode_runs_it_with(tiny_llama):
    from transformers import AutoModelForCausalLM

    from models.fused_projections import fuse_projections
    from models.kernels.int4 import precompile_shapes
    from models.kernels.int4_epilogue import RESIDUAL_NORM, SCALED, SCALED_SILU_MUL

    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    c = model.config
    assert all(len(shape) == 2 for shape in precompile_shapes(model))  # unfused projections: no folding
    fuse_projections(model)
    head_dim = c.hidden_size // c.num_attention_heads
    qkv = (c.num_attention_heads + 2 * c.num_key_value_heads) * head_dim
    assert set(precompile_shapes(model)) == {
        (qkv, c.hidden_size, SCALED), (c.hidden_size, c.hidden_size, RESIDUAL_NORM),
        (2 * c.intermediate_size, c.hidden_size, SCALED_SILU_MUL), (c.hidden_size, c.intermediate_size, RESIDUAL_NORM),
        (c.vocab_size, c.hidden_size, SCALED)}


def test_each_layer_of_the_folded_step_is_five_ops_and_nothing_between_them(tiny_int4_model):
    """On a GPU each op is one kernel: q/k/v (scaled), attention (rotation, cache write), o (+ residual and
    norm), gate/up (scaled, SiLU * up), down (+ residual and norm); the lm_head (scaled) after the last layer.
    Nothing else computes between them: no norm, residual add or activation kernel, only views."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from models.fast_decode import FastDecoder

    views = {"aten.view", "aten.reshape", "aten._unsafe_view", "aten.unsqueeze", "aten.select", "aten.slice",
             "aten.split", "aten.unbind", "aten.alias", "aten.expand", "aten.detach"}

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    model, _ = tiny_int4_model
    fast = FastDecoder(model, max_context=64)
    with torch.inference_mode(), Ops() as ops:
        fast._layer_loop.logits(torch.tensor([[5]]), torch.tensor([3]), torch.arange(fast.windows[-1]))
    ours = [i for i, name in enumerate(ops.names) if name.startswith("smallchat.")]
    between = [name for name in ops.names[ours[0]:ours[-1] + 1] if name not in views]
    layer = ["smallchat.int4_linear_scaled", "smallchat.decode_attention_qkv", "smallchat.int4_linear_residual_norm",
             "smallchat.int4_linear_scaled", "smallchat.int4_linear_residual_norm"]
    assert between == layer * model.config.num_hidden_layers + ["smallchat.int4_linear_scaled"]


def test_a_tied_lm_head_takes_the_final_norms_scale_in_plain_pytorch(tiny_llama):
    # Qwen2.5-1.5B ties its lm_head to the embeddings: it stays a plain Linear on the int4 path (the table
    # must stay a lookup), so the final norm's scale is applied before it, not in a GEMV epilogue.
    from transformers import AutoModelForCausalLM

    from models.fast_decode import FastDecoder
    from models.fused_projections import fuse_projections
    from models.kernels.int4 import Int4Linear, quantize_model
    from models.layer_step import LayerLoop

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.bfloat16).eval()
    model.lm_head.weight = model.model.embed_tokens.weight
    fuse_projections(model)
    quantize_model(model, torch.device("cpu"))
    assert type(model.lm_head) is torch.nn.Linear and not isinstance(model.lm_head, Int4Linear)
    fast = FastDecoder(model, max_context=64)
    assert fast._layer_loop.folded
    unfolded = LayerLoop(model, fast.cache, fold_norms=False)
    positions = torch.arange(fast.windows[-1])
    with torch.inference_mode():
        for pos, token in ((0, 9), (1, 33)):
            at = torch.tensor([pos])
            want = unfolded.logits(torch.tensor([[token]]), at, positions)
            got = fast._layer_loop.logits(torch.tensor([[token]]), at, positions)
            torch.testing.assert_close(got, want, atol=0.05 * want.abs().max().item(), rtol=0)
            assert int(got.argmax()) == int(want.argmax())


def test_a_folded_step_that_fails_falls_back_to_separate_norms_and_still_answers(tiny_int4_model):
    # The epilogue kernels are the step's newest: if one fails on a GPU (a compile error, say), the
    # decoder runs the norms as kernels of their own, as before, instead of failing the load.
    from models.fast_decode import FastDecoder
    from models.generation import SamplingSettings

    model, tokenizer = tiny_int4_model

    def broken(*args, **kwargs):
        raise RuntimeError("an epilogue that does not compile here")

    fast = FastDecoder(model, max_context=64)
    fast._layer_loop.layer_fn = broken  # the folded layer, as this GPU would run it
    assert fast.norms_folded
    fast.warm_up()
    assert not fast.norms_folded
    ids = tokenizer("Hello world")["input_ids"]
    answer = list(fast.stream(tokenizer, ids, SamplingSettings(max_new_tokens=8, temperature=0),
                              threading.Event()))[-1].token_ids
    with torch.inference_mode():
        want = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              max_new_tokens=8, do_sample=False)[0, len(ids):].tolist()
    assert answer == want
