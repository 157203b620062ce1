"""The one-token step as persistent layers (models/persistent_step.py) against the default folded step, on quantized
tiny models with 128-wide heads: a Llama, and a Qwen2 whose q/k/v has a bias. In Triton's interpreter on the CPU
(one program: the only grid that passes a barrier there), compiled on a GPU; a launch a layer, and one for
the whole step (the layers' tensors found through a table of addresses). Logits agree within bf16 rounding
(the persistent step keeps the residual in fp32), step after step over the keys and values the steps wrote, and
greedy answers through FastDecoder take the model's own greedy choice at every token, up to rounding."""

import threading

import pytest
import torch

from tests.kernel_check import run_check

# (architecture, hidden, intermediate, query heads, KV heads, launches): heads of 128, widths in multiples of 256
CASES = [["llama", 256, 512, 2, 1, "layer"], ["llama", 256, 512, 2, 1, "step"], ["qwen2", 256, 512, 4, 2, "step"]]

_CHECK = r"""
import json, sys, tempfile, threading, torch
from pathlib import Path
from tests.tiny import write_tokenizer
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config
from models.fast_decode import FastDecoder
from models.fused_projections import fuse_projections
from models.generation import SamplingSettings
from models.kernels.int4 import quantize_model
from models.layer_step import LayerLoop

cases, device = json.loads(sys.argv[1]), sys.argv[2]
out = []
for arch, hidden, inter, hq, hkv, mode in cases:
    folder = Path(tempfile.mkdtemp())
    tokenizer = write_tokenizer(folder)
    shape = dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=inter, num_hidden_layers=2,
                 num_attention_heads=hq, num_key_value_heads=hkv, head_dim=128, max_position_embeddings=512,
                 eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    config = LlamaConfig(**shape) if arch == "llama" else Qwen2Config(**shape)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # decisive logits: two paths' rounding does not decide a greedy token
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
        for layer in model.model.layers:
            if getattr(layer.self_attn.q_proj, "bias", None) is not None:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight.normal_(1, 0.2)
    model = model.to(torch.bfloat16).to(device).eval()
    fuse_projections(model)
    quantize_model(model, torch.device(device))
    fast = FastDecoder(model, max_context=128, persistent=mode, compile=False)
    row = {"persistent": fast._persistent is not None and fast._persistent.mode == mode
                         and fast.compile_status().startswith("persistent-layer"),
           "errors": [], "same_argmax": []}
    folded = LayerLoop(model, fast.cache)
    keys = [c.keys.clone() for c in fast.cache.layers]
    values = [c.values.clone() for c in fast.cache.layers]
    positions = torch.arange(fast.windows[-1], device=device)
    with torch.inference_mode():
        for pos, token in ((0, 5), (1, 17), (2, 99), (3, 42)):
            at = torch.tensor([pos], device=device)
            tok = torch.tensor([[token]], device=device)
            for c, k, v in zip(fast.cache.layers, keys, values):  # the default step from the same cache
                k.copy_(c.keys); v.copy_(c.values)
            got = fast._persistent.logits(tok, at, positions)
            written = [(c.keys.clone(), c.values.clone()) for c in fast.cache.layers]
            for c, k, v in zip(fast.cache.layers, keys, values):
                c.keys.copy_(k); c.values.copy_(v)
            want = folded.logits(tok, at, positions)
            row["errors"].append(float((got - want).abs().max() / want.abs().max()))
            row["same_argmax"].append(int(got.argmax()) == int(want.argmax()))
            row.setdefault("cache", []).append(max(float((w[0].float() - c.keys.float()).abs().max()
                                                         / c.keys[:, :, pos].float().abs().max())
                                                   for w, c in zip(written, fast.cache.layers)))
    ids = tokenizer("Hello world, this is a test")["input_ids"]
    greedy = SamplingSettings(max_new_tokens=12, temperature=0)
    answer = list(fast.stream(tokenizer, ids, greedy, threading.Event()))[-1].token_ids
    # Each token the step chose must be the model's own greedy choice, up to rounding: its logit (one forward of
    # the whole answer, plain PyTorch) within 1 % of the largest logit's size of the best. A random model has
    # near-ties (8.6875 against 8.625, one bf16 step, in the Qwen2 case here) that either path may take.
    with torch.inference_mode():
        seq = torch.tensor([ids + answer], device=device)
        logits = model(seq, attention_mask=torch.ones_like(seq)).logits[0, len(ids) - 1:-1].float()
    chosen = logits.gather(1, torch.tensor(answer, device=device).view(-1, 1)).view(-1)
    row["greedy_gap"] = float(((logits.max(1).values - chosen) / logits.abs().max(1).values).max())
    row["answer_tokens"] = len(answer)
    out.append(row)
print(json.dumps(out))
"""


def _check(device: str, interpret: bool) -> None:
    rows = run_check(_CHECK, CASES, device, interpret)
    for case, row in zip(CASES, rows):
        assert row["persistent"], (case, row)
        # bf16 activations, fp16 products in the GEMVs (emulated with two roundings in the interpreter), the
        # residual in fp32 against bf16: the tolerance of the folded step against the unfolded one
        assert max(row["errors"]) < 0.05 and all(row["same_argmax"]), (case, row)
        assert max(row["cache"]) < 0.05, (case, row)  # the keys each step wrote, against the largest
        assert row["answer_tokens"] == 12 and row["greedy_gap"] < 0.01, (case, row)


def test_persistent_layers_give_the_folded_steps_logits_in_the_interpreter():
    pytest.importorskip("triton")
    _check("cpu", interpret=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_persistent_layers_give_the_folded_steps_logits_on_the_gpu():
    _check("cuda", interpret=False)


def test_the_persistent_step_is_off_unless_asked_for_and_says_why_it_cannot_run(tiny_llama, monkeypatch, caplog):
    """Default off; asked for on a model it cannot take (64-wide heads, no int4), the default step runs and the
    log says why."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from models import persistent_step
    from models.fast_decode import FastDecoder

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.bfloat16).eval()
    monkeypatch.delenv(persistent_step.ENV, raising=False)
    assert not persistent_step.requested()
    assert FastDecoder(model, max_context=64)._persistent is None
    monkeypatch.setenv(persistent_step.ENV, "1")
    assert persistent_step.requested() == "layer"
    with caplog.at_level("WARNING"):
        fast = FastDecoder(model, max_context=64)
    assert fast._persistent is None and "persistent layers asked for, not used: needs the int4 fast path" in caplog.text
    answer = list(fast.stream(AutoTokenizer.from_pretrained(tiny_llama), [1, 2, 3], _greedy(4), threading.Event()))
    assert answer  # still answers


def _greedy(n: int):
    from models.generation import SamplingSettings

    return SamplingSettings(max_new_tokens=n, temperature=0)


def test_a_persistent_step_that_fails_at_warm_up_leaves_the_default_step_answering(tiny_llama, monkeypatch, caplog):
    """A fault injected into the opt-in step (its kernel failing on some GPU): the load's warm-up logs it and the
    default step answers; the status line says which step runs."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from models import persistent_step
    from models.fast_decode import FastDecoder
    from models.fused_projections import fuse_projections
    from models.kernels.int4 import quantize_model

    class Failing:
        programs, mode = 1, "layer"

        def __init__(self, model, cache, mode):
            pass

        def logits(self, *args):
            raise RuntimeError("injected: the kernel failed to launch")

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.bfloat16).eval()
    fuse_projections(model)
    quantize_model(model, torch.device("cpu"))
    monkeypatch.setattr(persistent_step, "why_not", lambda model: None)
    monkeypatch.setattr(persistent_step, "PersistentLayers", Failing)
    fast = FastDecoder(model, max_context=64, persistent=True)
    assert fast.compile_status().startswith("persistent-layer step")
    with caplog.at_level("WARNING"):
        fast.warm_up()
    assert "persistent-layer decode step failed" in caplog.text and "injected" in caplog.text
    assert fast._persistent is None and not fast.compile_status().startswith("persistent")
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    assert list(fast.stream(tokenizer, [1, 2, 3], _greedy(4), threading.Event()))[-1].token_ids
