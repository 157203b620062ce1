"""Fused q/k/v and gate/up projections (models/fused_projections.py): the fused model computes what
transformers' model computes, for Llama and Qwen2 (biases), in full precision and once quantized."""

import pytest
import torch

from models.fused_projections import fuse_projections
from models.kernels.int4 import Int4Linear, quantize, quantize_model


def _tiny(kind: str, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    shape = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = (LlamaForCausalLM(LlamaConfig(**shape)) if kind == "llama" else Qwen2ForCausalLM(Qwen2Config(**shape)))
    with torch.no_grad():  # decisive random weights (and non-zero Qwen2 q/k/v biases)
        for p in model.parameters():
            p.normal_(0, 0.2) if p.dim() == 2 else p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def _logits(model, ids):
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids])).logits


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_fused_model_computes_the_same_logits(kind):
    model = _tiny(kind)
    ids = [5, 17, 42, 7, 99, 3, 250, 11]
    before = _logits(model, ids)
    assert fuse_projections(model) == 2 * model.config.num_hidden_layers
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert not hasattr(attn, "q_proj") and attn.qkv_proj.out_features == 64 + 2 * 32
    assert not hasattr(mlp, "gate_proj") and mlp.gate_up_proj.out_features == 2 * 96
    assert (attn.qkv_proj.bias is not None) == (kind == "qwen2")
    torch.testing.assert_close(_logits(model, ids), before, rtol=1e-5, atol=1e-5)
    assert fuse_projections(model) == 0  # already fused: nothing left to fuse


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_fused_then_quantized_equals_quantized_separately(kind):
    """Int4 groups run along the input: the fused layer's packed weight is the separate ones' side by side,
    bit for bit, so the quantized fused model gives the same greedy tokens as the quantized plain one."""
    plain, fused = _tiny(kind), _tiny(kind)
    fuse_projections(fused)
    layer = plain.model.layers[1].self_attn
    separate = [quantize(getattr(layer, p).weight.detach()) for p in ("q_proj", "k_proj", "v_proj")]
    together = quantize(fused.model.layers[1].self_attn.qkv_proj.weight.detach())
    for i in range(3):
        assert torch.equal(together[i], torch.cat([s[i] for s in separate], dim=1))
    for model in (plain, fused):
        model.to(torch.bfloat16)
        quantize_model(model, torch.device("cpu"))
    assert isinstance(fused.model.layers[0].mlp.gate_up_proj, Int4Linear)
    ids = torch.tensor([[5, 17, 42, 7, 99]])
    with torch.inference_mode():
        outs = [m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
                for m in (plain, fused)]
    assert torch.equal(outs[0], outs[1])


def test_models_it_does_not_know_are_left_alone():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100))
    assert fuse_projections(model) == 0


def _decode_through_layer_loop(model, ids: list[int], layer_fn=None) -> list[torch.Tensor]:
    """Logits of each of `ids` fed one at a time through the fast decoder's layer loop (models/layer_step.py),
    each layer run by `layer_fn` (default: the loop's own, with the norms folded on an int4 model)."""
    from transformers import StaticCache

    from models.layer_step import LayerLoop

    c = model.config
    cache = StaticCache(config=c, max_cache_len=64)
    cache.early_initialization(1, c.num_key_value_heads, c.hidden_size // c.num_attention_heads,
                               model.model.embed_tokens.weight.dtype, torch.device("cpu"))
    loop = LayerLoop(model, cache)
    with torch.inference_mode():
        return [loop.logits(torch.tensor([[t]]), torch.tensor([pos]), torch.arange(64), layer_fn)
                for pos, t in enumerate(ids)]


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_the_decode_step_rotates_writes_and_attends_in_one_op_and_equals_the_model(kind, monkeypatch):
    """With the decode workspace attached, a fused attention's decode step runs decode_attention_qkv (rotation,
    bias, cache write, attention: one kernel on CUDA). Each step's logits equal the model's own forward over
    the whole prefix, uncompiled and compiled by Inductor, and Inductor writes the cache in place (no copy)."""
    from torch._inductor.utils import run_and_get_code

    from models.attention import attach_decode_workspace, use_fast_attention
    from models.layer_step import run_layer

    model = _tiny(kind)
    fuse_projections(model)
    use_fast_attention(model)
    attach_decode_workspace(model, torch.device("cpu"))
    ids = [5, 17, 42, 7, 99, 3]
    want = [_logits(model, ids[:i + 1])[:, -1] for i in range(len(ids))]
    calls = _count_op_calls(monkeypatch)
    for got, expected in zip(_decode_through_layer_loop(model, ids), want):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert len(calls) == len(ids) * model.config.num_hidden_layers

    torch._dynamo.reset()
    compiled = torch.compile(run_layer, fullgraph=True)
    steps, codes = run_and_get_code(lambda: _decode_through_layer_loop(model, ids, compiled))
    for got, expected in zip(steps, want):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    code = "\n".join(codes)
    assert "smallchat.decode_attention_qkv" in code
    assert "copy_(" not in code and "clone" not in code and "index_copy" not in code


def _count_op_calls(monkeypatch) -> list:
    """A list that grows by one at each run of decode_attention_qkv (on the CPU: its plain-PyTorch form)."""
    from models.kernels import decode_attention

    calls, plain = [], decode_attention.qkv_reference
    monkeypatch.setattr(decode_attention, "qkv_reference", lambda *a: calls.append(1) or plain(*a))
    return calls


def test_the_quantized_decode_step_adds_the_bias_inside_the_op(monkeypatch):
    """An Int4Linear q/k/v with a bias (Qwen2) hands the op its unbiased output and the bias: same logits as
    the quantized model's own forward (bf16)."""
    from models.attention import attach_decode_workspace, use_fast_attention

    model = _tiny("qwen2")
    fuse_projections(model)
    model.to(torch.bfloat16)
    quantize_model(model, torch.device("cpu"))
    assert model.model.layers[0].self_attn.qkv_proj.bias is not None
    ids = [5, 17, 42, 7]
    want = [_logits(model, ids[:i + 1])[:, -1].float() for i in range(len(ids))]
    use_fast_attention(model)
    attach_decode_workspace(model, torch.device("cpu"))
    calls = _count_op_calls(monkeypatch)
    steps = _decode_through_layer_loop(model, ids)
    assert len(calls) == len(ids) * model.config.num_hidden_layers
    from models.folded_norms import folds_norms

    assert folds_norms(model)  # the step with the norms folded into the GEMVs hands the op the bias too
    for got, expected in zip(steps, want):
        # bf16: the op adds the bias and rotates in fp32 and rounds once, the model after each op (measured:
        # up to 1.3 % of the largest logit; without the bias, far more)
        assert (got - expected).abs().max() < 0.03 * expected.abs().max()
