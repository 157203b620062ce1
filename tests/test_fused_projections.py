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
