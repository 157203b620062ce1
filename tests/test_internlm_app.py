"""InternLM2 and InternLM3 through the app's own path (engine, catalog, UI, CLI), with no remote code:
a folder in InternLM2 format loads in every quantization, is converted once, and chats;
InternLM3 loads natively; trust_remote_code is only ever an explicit, visible opt-in."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch

from internlm2_fixture import IM_END, write_internlm2_checkpoint
from models.engine import Engine
from models.generation import SamplingSettings
from models.loading import LoadSettings
from models.settings import LoadOptions
from models.quant import Quant

GREEDY = SamplingSettings(max_new_tokens=8, temperature=0.0)


@pytest.fixture(scope="module")
def internlm2_folder(tmp_path_factory):
    return write_internlm2_checkpoint(tmp_path_factory.mktemp("internlm2-src"), num_shards=2,
                                      rope_scaling={"type": "dynamic", "factor": 2.0})


@pytest.mark.parametrize("quant", [Quant.NONE, Quant.INT8, Quant.NF4])
def test_internlm2_folder_loads_and_chats_in_every_quantization(catalog, internlm2_folder, tmp_path, quant):
    engine = Engine(catalog, cache_dir=tmp_path)
    _, plan = engine.plan(str(internlm2_folder), LoadSettings(quant=quant))  # planned from config.json alone
    assert plan.verdict == "cpu"
    loaded = engine.load(str(internlm2_folder), LoadSettings(quant=quant, context_tokens=256)).loaded
    assert type(loaded.model).__name__ == "LlamaForCausalLM"
    assert not loaded.settings.trust_remote_code
    # Converted once into the cache, with <|im_end|> as a stop token.
    assert len(list((tmp_path / "converted").iterdir())) == 1
    im_end = loaded.tokenizer.convert_tokens_to_ids(IM_END)
    eos = loaded.model.generation_config.eos_token_id
    assert im_end in (eos if isinstance(eos, list) else [eos])
    prompt = loaded.tokenizer.apply_chat_template([{"role": "user", "content": "Hello"}], tokenize=False,
                                                  add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    final = list(engine.chat([{"role": "user", "content": "Hello"}], GREEDY, threading.Event()))[-1]
    assert final.done and final.stats.new_tokens > 0
    if quant is Quant.NONE:  # the plan's weight figure is the loaded model's
        assert plan.weights_bytes == pytest.approx(loaded.weights_bytes, rel=0.01)


def test_second_load_goes_straight_to_the_converted_cache(catalog, internlm2_folder, tmp_path, monkeypatch):
    engine = Engine(catalog, cache_dir=tmp_path)
    engine.load(str(internlm2_folder), LoadSettings())
    import models.internlm2 as internlm2

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(internlm2, "convert_internlm2", no_conversion)
    report = Engine(catalog, cache_dir=tmp_path).load(str(internlm2_folder), LoadSettings())
    assert report.loaded.model is not None


def test_catalog_internlm2_entries_supply_the_chatml_template(catalog):
    for model_id in ("internlm2-chat-1.8b", "internlm2.5-7b-chat"):
        entry = catalog.get(model_id)
        assert entry.architecture == "internlm2"
        assert "<|im_start|>" in entry.chat_template and "<|im_end|>" in entry.chat_template


def test_catalog_internlm2_offline_says_so(catalog, tmp_path):
    from models.sources import ModelSourceError

    with pytest.raises(ModelSourceError, match="(?i)offline|hub|download"):
        Engine(catalog, cache_dir=tmp_path).load("internlm2-chat-1.8b", LoadSettings())


def write_tiny_internlm3(folder):
    """A tiny InternLM3 checkpoint as the hub has them: model_type internlm3, Llama weights."""
    from transformers import AutoModelForCausalLM, InternLM3Config

    from tiny import write_tokenizer

    tokenizer = write_tokenizer(folder)
    config = InternLM3Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                             eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                             pad_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


def test_internlm3_folder_loads_natively(catalog, tmp_path):
    folder = write_tiny_internlm3(tmp_path / "internlm3")
    assert json.loads((folder / "config.json").read_text())["model_type"] == "internlm3"
    engine = Engine(catalog, cache_dir=tmp_path / "cache")
    _, plan = engine.plan(str(folder), LoadSettings(quant=Quant.NF4))
    assert plan.verdict == "cpu"
    loaded = engine.load(str(folder), LoadSettings(quant=Quant.NF4, context_tokens=256)).loaded
    assert loaded.model.config.model_type == "internlm3"
    assert not (tmp_path / "cache" / "converted").exists()  # no conversion for a native model
    final = list(engine.chat([{"role": "user", "content": "Hello"}], GREEDY, threading.Event()))[-1]
    assert final.stats.new_tokens > 0


def write_hub_style_internlm3(folder):
    """InternLM3 as its hub repository ships it: a sentencepiece tokenizer.model and a tokenizer_config
    naming the remote-code InternLM3Tokenizer (no tokenizer.json), a ChatML template, Llama weights."""
    import sentencepiece as spm
    from transformers import AutoModelForCausalLM, InternLM3Config

    from internlm2_fixture import train_tiny_sentencepiece

    model_file = train_tiny_sentencepiece(folder)
    tok_cfg = json.loads((folder / "tokenizer_config.json").read_text())
    tok_cfg["tokenizer_class"] = "InternLM3Tokenizer"
    tok_cfg["auto_map"] = {"AutoTokenizer": ["tokenization_internlm3.InternLM3Tokenizer", None]}
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    config = InternLM3Config(vocab_size=sp.get_piece_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                             bos_token_id=1, eos_token_id=sp.piece_to_id(IM_END), pad_token_id=2,
                             tie_word_embeddings=False)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder, sp


def sentencepiece_chat_ids(model_file, text: str, specials: list[str]) -> list[int]:
    """Reference ids: each special token as its own id, the text between them as sentencepiece encodes
    it with no dummy prefix (text after a special token does not start a new word)."""
    import re

    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    proto.normalizer_spec.add_dummy_prefix = False
    sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    ids = []
    for part in re.split("(" + "|".join(map(re.escape, specials)) + ")", text):
        ids += [sp.piece_to_id(part)] if part in specials else sp.encode(part) if part else []
    return ids


def test_hub_style_internlm3_tokenizes_like_its_sentencepiece_model_without_remote_code(catalog, tmp_path):
    # transformers builds InternLM3's tokenizer from tokenizer.model itself (it ignores the remote
    # InternLM3Tokenizer class); reading the sentencepiece file needs the protobuf package.
    folder, sp = write_hub_style_internlm3(tmp_path / "internlm3-hub")
    engine = Engine(catalog, cache_dir=tmp_path / "cache")
    loaded = engine.load(str(folder), LoadSettings(context_tokens=256)).loaded
    messages = [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Hello world, 你好！"}]
    text = loaded.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = loaded.tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                               return_dict=True)["input_ids"]
    assert text.startswith("<s><|im_start|>system\nYou are helpful.<|im_end|>")
    assert list(ids) == sentencepiece_chat_ids(folder / "tokenizer.model", text, ["<s>", "<|im_start|>", IM_END])
    final = list(engine.chat(messages, GREEDY, threading.Event()))[-1]
    assert final.stats.new_tokens > 0 and loaded.settings.trust_remote_code is False


def test_catalog_internlm3_shape_matches_its_config(catalog):
    from transformers import InternLM3Config

    from models.catalog import ModelShape

    # The published config.json of internlm/internlm3-8b-instruct (its shape fields).
    config = InternLM3Config(hidden_size=4096, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=2,
                             vocab_size=128512, intermediate_size=10240, max_position_embeddings=32768, head_dim=128)
    shape = catalog.get("internlm3-8b-instruct").shape
    from_config = ModelShape.from_config(config)
    assert (from_config.num_layers, from_config.num_kv_heads, from_config.head_dim) == (
        shape.num_layers, shape.num_kv_heads, shape.head_dim)


def test_trust_remote_code_is_off_by_default_and_visible_when_on(catalog):
    from models.loading import LoadSettings as Settings
    from ui.layout import build_demo

    assert Settings().trust_remote_code is False
    engine = Engine(catalog)
    plain = build_demo(engine)
    assert not any(getattr(b, "elem_id", None) == "remote-code-warning" for b in plain.blocks.values())
    opted_in = build_demo(engine, options=LoadOptions(trust_remote_code=True))
    warning = [b for b in opted_in.blocks.values() if getattr(b, "elem_id", None) == "remote-code-warning"]
    assert len(warning) == 1


def test_cli_trust_remote_code_prints_a_warning(capsys):
    import app

    assert app.main(["--trust-remote-code", "--ask", "hi", "--model", "/nonexistent/folder"]) == 1
    assert "trust-remote-code runs Python code" in capsys.readouterr().err


def plant_in_hub_cache(cache, repo: str, files_from) -> None:
    """Put a folder's files into a Hugging Face hub cache as the snapshot of `repo` (what a download leaves)."""
    import shutil

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = cache / f"models--{repo.replace('/', '--')}"
    shutil.copytree(files_from, repo_dir / "snapshots" / commit)
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)


@pytest.mark.slow
@pytest.mark.parametrize("model_id", ["internlm2-chat-1.8b", "qwen2.5-1.5b-instruct"])
def test_catalog_ids_load_from_the_hub_cache_offline(catalog, tmp_path, model_id):
    # A catalog id is a hub repo: once downloaded it loads from the hub cache with no network, through
    # the InternLM2 conversion for InternLM2 and straight from the snapshot for a native model.
    import os
    import subprocess
    import sys

    from tiny import write_tiny_llama

    source = tmp_path / "source"
    if catalog.get(model_id).architecture == "internlm2":
        write_internlm2_checkpoint(source, num_shards=2)
    else:
        write_tiny_llama(source)
    plant_in_hub_cache(tmp_path / "hub", catalog.get(model_id).repo, source)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"),
           "SMALLCHAT_CACHE": str(tmp_path / "cache")}
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, str(root / "app.py"), "--ask", "Hello", "--model", model_id,
                             "--temperature", "0", "--max-new-tokens", "4"],
                            capture_output=True, text=True, timeout=300, env=env, cwd=root)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "TTFT" in result.stderr and "tok/s" in result.stderr
    converted = tmp_path / "cache" / "converted"
    assert converted.is_dir() == (model_id == "internlm2-chat-1.8b")
