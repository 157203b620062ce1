"""InternLM2 checkpoints load as native Llama: exact weight slices, logits equal to an
independent InternLM2 forward, tokenizer and chat format, quantized loads, and a
conversion cache that never serves a half-written or stale folder."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys

import pytest
import torch

from internlm2_fixture import (CORPUS, IM_END, IM_START, TINY_INTERNLM2, load_internlm2_state_dict,
                               random_internlm2_state_dict, write_internlm2_checkpoint)
from models.internlm2_tokenizer import CHATML_TEMPLATE
from models.internlm2 import (MARKER, CheckpointError, convert_internlm2, ensure_converted,
                              is_internlm2_folder)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello world"},
            {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "How are you?"}]


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """A 2-shard safetensors InternLM2 checkpoint with an index, fp32."""
    return write_internlm2_checkpoint(tmp_path_factory.mktemp("internlm2-src"), num_shards=2)


@pytest.fixture(scope="module")
def converted(src, tmp_path_factory):
    return ensure_converted(src, tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def model(converted):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizer(converted):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(converted)


def _ids(n=12, seed=1, vocab=TINY_INTERNLM2["vocab_size"]):
    return torch.randint(10, vocab, (n,), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- an independent InternLM2 forward


def reference_logits(state: dict, cfg: dict, ids: torch.Tensor) -> torch.Tensor:
    """InternLM2's forward written from its fused weights with plain tensor math (float64)."""
    st = {k: v.double() for k, v in state.items()}
    heads, kv, hidden = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["hidden_size"]
    hd, qpk, eps, T = hidden // heads, heads // kv, cfg["rms_norm_eps"], len(ids)

    base, pos = float(cfg["rope_theta"]), torch.arange(T, dtype=torch.float64)
    scaling = cfg.get("rope_scaling") or {}
    if scaling.get("type") == "linear":
        pos = pos / scaling["factor"]
    elif scaling.get("type") == "dynamic" and T > cfg["max_position_embeddings"]:
        f, m = scaling["factor"], cfg["max_position_embeddings"]
        base = base * ((f * T / m) - (f - 1)) ** (hd / (hd - 2))
    inv_freq = 1.0 / base ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    angles = torch.cat([torch.outer(pos, inv_freq)] * 2, dim=-1)
    cos, sin = angles.cos(), angles.sin()

    def rms(x, w):
        return w * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)

    def rope(x):  # x: [T, n, hd]; rotate-half convention
        rotated = torch.cat([-x[..., hd // 2:], x[..., : hd // 2]], dim=-1)
        return x * cos[:, None] + rotated * sin[:, None]

    x = st["model.tok_embeddings.weight"][ids]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms(x, st[p + "attention_norm.weight"])
        qkv = (h @ st[p + "attention.wqkv.weight"].T).view(T, kv, qpk + 2, hd)
        q = rope(qkv[:, :, :qpk].reshape(T, heads, hd))
        k, v = rope(qkv[:, :, -2]), qkv[:, :, -1]
        out = torch.empty(T, heads, hd, dtype=torch.float64)
        for n in range(heads):
            g = n // qpk  # query head n reads the K/V head of its group
            scores = (q[:, n] @ k[:, g].T / math.sqrt(hd)).masked_fill(~causal, float("-inf"))
            out[:, n] = scores.softmax(-1) @ v[:, g]
        x = x + out.reshape(T, hidden) @ st[p + "attention.wo.weight"].T
        h = rms(x, st[p + "ffn_norm.weight"])
        gate, up = h @ st[p + "feed_forward.w1.weight"].T, h @ st[p + "feed_forward.w3.weight"].T
        x = x + (torch.nn.functional.silu(gate) * up) @ st[p + "feed_forward.w2.weight"].T
    return rms(x, st["model.norm.weight"]) @ st["output.weight"].T


# ---------------------------------------------------------------- conversion results


def test_detects_internlm2_folders(src, converted, tmp_path):
    assert is_internlm2_folder(src)
    assert not is_internlm2_folder(converted)
    assert not is_internlm2_folder(tmp_path)


def test_converted_config_is_plain_llama(src, converted, model):
    cfg = json.loads((converted / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    assert "auto_map" not in cfg
    assert cfg["rope_parameters"] == {"rope_type": "default", "rope_theta": 1e6}
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (4, 2, 16)
    assert type(model).__name__ == "LlamaForCausalLM"
    index = json.loads((converted / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 2


def test_weights_are_the_documented_slices(src, model):
    state, got = load_internlm2_state_dict(src), model.state_dict()
    heads, kv, hidden = 4, 2, 64
    hd, qpk = hidden // heads, heads // kv
    for i in range(TINY_INTERNLM2["num_hidden_layers"]):
        p, n = f"model.layers.{i}.", f"model.layers.{i}."
        wqkv = state[p + "attention.wqkv.weight"]

        def head_rows(slot):  # rows of one head: slot counts heads in the fused (kv, qpk+2) order
            return wqkv[slot * hd:(slot + 1) * hd]

        q = torch.cat([head_rows(g * (qpk + 2) + j) for g in range(kv) for j in range(qpk)])
        k = torch.cat([head_rows(g * (qpk + 2) + qpk) for g in range(kv)])
        v = torch.cat([head_rows(g * (qpk + 2) + qpk + 1) for g in range(kv)])
        assert torch.equal(got[n + "self_attn.q_proj.weight"], q)
        assert torch.equal(got[n + "self_attn.k_proj.weight"], k)
        assert torch.equal(got[n + "self_attn.v_proj.weight"], v)
        for old, new in [("attention.wo", "self_attn.o_proj"), ("feed_forward.w1", "mlp.gate_proj"),
                         ("feed_forward.w3", "mlp.up_proj"), ("feed_forward.w2", "mlp.down_proj"),
                         ("attention_norm", "input_layernorm"), ("ffn_norm", "post_attention_layernorm")]:
            assert torch.equal(got[n + new + ".weight"], state[p + old + ".weight"]), old
    assert torch.equal(got["model.embed_tokens.weight"], state["model.tok_embeddings.weight"])
    assert torch.equal(got["model.norm.weight"], state["model.norm.weight"])
    assert torch.equal(got["lm_head.weight"], state["output.weight"])


def test_logits_equal_reference_internlm2_forward(src, model):
    cfg = json.loads((src / "config.json").read_text())
    ids = _ids()
    with torch.no_grad():
        logits = model(ids[None]).logits[0]
    expected = reference_logits(load_internlm2_state_dict(src), cfg, ids)
    torch.testing.assert_close(logits.double(), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("scaling", [{"type": "linear", "factor": 2.0}, {"type": "dynamic", "factor": 2.0}])
def test_rope_scaling_maps_to_the_same_math(tmp_path, scaling):
    # A short max_position_embeddings so 12 tokens exceed it and dynamic NTK really rescales.
    src = write_internlm2_checkpoint(tmp_path / "src", {"max_position_embeddings": 8}, num_shards=1,
                                     rope_scaling=scaling)
    from transformers import AutoModelForCausalLM

    dst = convert_internlm2(src, tmp_path / "llama")
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["rope_parameters"] == {"rope_type": scaling["type"], "factor": 2.0, "rope_theta": 1e6}
    model = AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32).eval()
    ids = _ids()
    with torch.no_grad():
        logits = model(ids[None]).logits[0]
    expected = reference_logits(load_internlm2_state_dict(src), json.loads((src / "config.json").read_text()), ids)
    torch.testing.assert_close(logits.double(), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("num_shards", [1, 3])
def test_pytorch_bin_checkpoints_convert(src, model, tmp_path, num_shards):
    state = load_internlm2_state_dict(src)
    bin_src = write_internlm2_checkpoint(tmp_path / "bin", num_shards=num_shards, weights_format="bin", state=state)
    if num_shards == 1:
        assert [p.name for p in bin_src.glob("*.bin")] == ["pytorch_model.bin"]
    else:  # sharded, with pytorch_model.bin.index.json naming the shard of every tensor
        assert len(list(bin_src.glob("pytorch_model-*.bin"))) == 3 and (bin_src / "pytorch_model.bin.index.json").is_file()
    from transformers import AutoModelForCausalLM

    bin_model = AutoModelForCausalLM.from_pretrained(ensure_converted(bin_src, tmp_path / "cache"),
                                                     dtype=torch.float32).eval()
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(bin_model(ids[None]).logits, model(ids[None]).logits)


# ---------------------------------------------------------------- tokenizer and chat format


def test_tokenizer_matches_sentencepiece(src, tokenizer):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(src / "tokenizer.model"))
    rng = random.Random(0)
    words = " ".join(CORPUS).split()
    # Shuffled corpus words exercise the BPE merge order (a wrong order changes most of these).
    texts = CORPUS + [" ".join(rng.sample(words, 6)) for _ in range(50)] + [
        "  two  spaces and unseen words: zebra Quux 42 €", "line one\nline two"]
    for text in texts:
        ids = tokenizer.encode(text)
        assert ids == [sp.bos_id()] + sp.encode(text), text
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer.convert_tokens_to_ids([IM_START, IM_END]) == [sp.piece_to_id(IM_START), sp.piece_to_id(IM_END)]
    assert tokenizer.encode(f"{IM_START}user", add_special_tokens=False)[0] == sp.piece_to_id(IM_START)


def test_chat_template_renders_chatml_turns(tokenizer):
    text = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert text == ("<s><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello world<|im_end|>\n"
                    "<|im_start|>assistant\nParis.<|im_end|>\n<|im_start|>user\nHow are you?<|im_end|>\n"
                    "<|im_start|>assistant\n")
    ids = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, return_dict=False)
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    assert ids.count(tokenizer.convert_tokens_to_ids(IM_START)) == 5
    assert ids.count(tokenizer.convert_tokens_to_ids(IM_END)) == 4


def test_generation_stops_at_im_end(model, tokenizer):
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    assert tokenizer.eos_token == IM_END
    assert model.generation_config.eos_token_id[0] == im_end
    assert model.config.eos_token_id == im_end
    # Rig the head so <|im_end|> always wins: generation must end right after it.
    rigged = torch.nn.Linear(64, TINY_INTERNLM2["vocab_size"], bias=True)
    with torch.no_grad():
        rigged.weight.zero_()
        rigged.bias.fill_(-10.0)
        rigged.bias[im_end] = 10.0
    original, model.lm_head = model.lm_head, rigged
    try:
        inputs = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    finally:
        model.lm_head = original
    assert out[0, inputs["input_ids"].shape[1]:].tolist() == [im_end]


@pytest.mark.parametrize("template_in_folder, argument, expected", [
    (False, None, CHATML_TEMPLATE),
    (False, "{{ 'custom' }}", "{{ 'custom' }}"),
    (True, "{{ 'custom' }}", "folder"),  # the folder's own template wins
])
def test_chat_template_precedence(tmp_path, template_in_folder, argument, expected):
    from transformers import AutoTokenizer

    folder_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    src = write_internlm2_checkpoint(tmp_path / "src", num_shards=1,
                                     chat_template=folder_template if template_in_folder else None)
    tok = AutoTokenizer.from_pretrained(ensure_converted(src, tmp_path / "cache", chat_template=argument))
    assert tok.chat_template == (folder_template if expected == "folder" else expected)


# ---------------------------------------------------------------- quantized loads


@pytest.mark.parametrize("bits", [8, 4])
def test_bitsandbytes_cpu_load_generates(converted, tokenizer, bits):
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = (BitsAndBytesConfig(load_in_8bit=True) if bits == 8 else
             BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16))
    model = AutoModelForCausalLM.from_pretrained(converted, quantization_config=quant, device_map="cpu",
                                                 dtype=torch.bfloat16)
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, bnb.nn.Linear8bitLt if bits == 8 else bnb.nn.Linear4bit)
    inputs = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3


# ---------------------------------------------------------------- the cache: interrupted, corrupted, stale


def _visible_dirs(root):
    return sorted(p.name for p in root.iterdir() if p.is_dir())


@pytest.mark.parametrize("failure", ["interrupted", "disk full"])
def test_failed_conversion_leaves_nothing_and_is_redone(src, tmp_path, monkeypatch, failure):
    import safetensors.torch

    cache, real_save = tmp_path / "cache", safetensors.torch.save_file

    def crash(fraction, message):
        if fraction > 0:  # after the first shard was written
            raise KeyboardInterrupt("simulated Ctrl-C")

    def full_disk(tensors, path, metadata=None):
        if "00002" in str(path):
            raise OSError(28, "No space left on device")
        real_save(tensors, path, metadata=metadata)

    if failure == "disk full":
        monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(KeyboardInterrupt if failure == "interrupted" else OSError):
        ensure_converted(src, cache, progress=crash)
    assert _visible_dirs(cache) == []  # neither a half-written folder nor its temporary sibling
    monkeypatch.undo()
    calls = []
    dst = ensure_converted(src, cache, progress=lambda f, m: calls.append(f))
    assert calls[-1] == 1.0 and (dst / MARKER).is_file()
    assert ensure_converted(src, cache, progress=lambda f, m: calls.append(("again", f))) == dst
    assert ("again", 0.0) not in calls  # complete cache: no second conversion


def test_killed_conversion_is_cleaned_up_and_redone(src, tmp_path):
    cache = tmp_path / "cache"
    # A real SIGKILL half-way: no cleanup code runs, the temporary folder stays behind.
    script = ("import os, signal, sys; sys.path.insert(0, sys.argv[1]); from models.internlm2 import ensure_converted; "
              "ensure_converted(sys.argv[2], sys.argv[3], progress=lambda f, m: f > 0 and "
              "os.kill(os.getpid(), signal.SIGKILL))")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    killed = subprocess.run([sys.executable, "-c", script, root, str(src), str(cache)])
    assert killed.returncode == -9
    (leftover,) = [p for p in cache.iterdir() if ".tmp-" in p.name]
    assert not (leftover / MARKER).exists() and any(leftover.glob("*.safetensors"))
    dst = ensure_converted(src, cache)
    assert _visible_dirs(cache) == [dst.name]  # the dead process's leftover was removed


@pytest.mark.parametrize("damage", ["delete shard", "truncate shard", "fingerprint", "no marker"])
def test_corrupted_cache_is_detected_and_redone(src, tmp_path, damage):
    from transformers import AutoModelForCausalLM

    cache = tmp_path / "cache"
    dst = ensure_converted(src, cache)
    shard = dst / "model-00002-of-00002.safetensors"
    if damage == "delete shard":
        shard.unlink()
    elif damage == "truncate shard":
        shard.write_bytes(shard.read_bytes()[:1000])
    elif damage == "fingerprint":
        marker = json.loads((dst / MARKER).read_text())
        (dst / MARKER).write_text(json.dumps({**marker, "fingerprint": "0" * 64}))
    else:
        (dst / MARKER).unlink()
    calls = []
    assert ensure_converted(src, cache, progress=lambda f, m: calls.append(f)) == dst
    assert calls and calls[-1] == 1.0
    AutoModelForCausalLM.from_pretrained(dst)
    assert _visible_dirs(cache) == [dst.name]


def test_changed_source_is_reconverted(tmp_path):
    src = write_internlm2_checkpoint(tmp_path / "src", num_shards=1)
    cache = tmp_path / "cache"
    first = ensure_converted(src, cache)
    # Re-download different weights: new size/mtime, new fingerprint, new conversion.
    write_internlm2_checkpoint(tmp_path / "src", num_shards=1, seed=7)
    second = ensure_converted(src, cache)
    assert second != first and _visible_dirs(cache) == [second.name]
    from safetensors.torch import load_file

    state = load_internlm2_state_dict(src)
    assert torch.equal(load_file(second / "model-00001-of-00001.safetensors")["lm_head.weight"],
                       state["output.weight"])


# ---------------------------------------------------------------- errors that say what to do


def _broken(tmp_path, **kwargs):
    return write_internlm2_checkpoint(tmp_path / "src", num_shards=2, **kwargs)


def test_missing_tokenizer_model(tmp_path):
    src = _broken(tmp_path)
    (src / "tokenizer.model").unlink()
    with pytest.raises(CheckpointError, match=r"no tokenizer\.model.*download tokenizer\.model"):
        ensure_converted(src, tmp_path / "cache")


def test_missing_tensor(tmp_path):
    state = random_internlm2_state_dict(TINY_INTERNLM2)
    del state["model.layers.1.feed_forward.w2.weight"]
    src = _broken(tmp_path, state=state)
    with pytest.raises(CheckpointError, match=r"lacks 1 tensor.*model\.layers\.1\.feed_forward\.w2\.weight"):
        ensure_converted(src, tmp_path / "cache")
    assert _visible_dirs(tmp_path / "cache") == []


def test_misshaped_tensor(tmp_path):
    state = random_internlm2_state_dict(TINY_INTERNLM2)
    state["model.layers.0.attention.wqkv.weight"] = torch.zeros(96, 64)  # as if q_per_kv were 1
    src = _broken(tmp_path, state=state)
    with pytest.raises(CheckpointError, match=r"'model\.layers\.0\.attention\.wqkv\.weight'.*shape \(96, 64\), "
                                              r"expected \(128, 64\)"):
        ensure_converted(src, tmp_path / "cache")


def test_bias_true_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="bias: true"):
        ensure_converted(_broken(tmp_path, bias=True), tmp_path / "cache")


def test_unsupported_rope_scaling(tmp_path):
    with pytest.raises(CheckpointError, match="rope_scaling type 'yarn'.*linear, dynamic"):
        ensure_converted(_broken(tmp_path, rope_scaling={"type": "yarn", "factor": 4.0}), tmp_path / "cache")


def test_no_weight_files(tmp_path):
    src = _broken(tmp_path)
    for path in src.glob("*.safetensors*"):
        path.unlink()
    with pytest.raises(CheckpointError, match=r"no weight files.*download the weights"):
        ensure_converted(src, tmp_path / "cache")


def test_index_naming_a_missing_shard(tmp_path):
    src = _broken(tmp_path)
    (src / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002\.safetensors, missing"):
        ensure_converted(src, tmp_path / "cache")
