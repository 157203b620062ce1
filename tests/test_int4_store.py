"""Stored int4 models (models/int4_store.py): a quantized model written to disk and rebuilt from its
config computes what it computed; a changed checkpoint misses; a damaged, mismatched or half-written
entry is ignored and removed, never a crash; and, on a GPU, the engine's second int4 load of a
checkpoint comes from the store and answers the same."""

import json
import os
import threading

import pytest
import torch

from models import int4_store
from models.fused_projections import fuse_projections
from models.kernels.int4 import Int4Linear, quantize_model

SHAPE = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)


def _quantized(kind: str, tie: bool):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**SHAPE, tie_word_embeddings=tie))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**SHAPE, tie_word_embeddings=tie))
    with torch.no_grad():  # decisive weights, non-zero Qwen2 biases
        for p in model.parameters():
            p.normal_(0, 0.2) if p.dim() == 2 else p.add_(torch.randn_like(p) * 0.1)
    fuse_projections(model)
    model.to(torch.bfloat16)
    quantize_model(model, torch.device("cpu"))
    return model.eval()


def _logits(model, ids=(5, 17, 42, 7, 99)):
    with torch.inference_mode():
        return model(torch.tensor([list(ids)])).logits


def _restore(model, cache_dir, key="k"):
    return int4_store.load(cache_dir, key, model.config, torch.device("cpu"), prepare=fuse_projections)


@pytest.mark.parametrize("kind, tie", [("llama", True), ("qwen2", False)])
def test_a_stored_model_computes_what_it_computed(kind, tie, tmp_path):
    model = _quantized(kind, tie)
    folder = int4_store.save(model, tmp_path, "k")
    assert sorted(p.name for p in folder.iterdir()) == [int4_store.MANIFEST, int4_store.WEIGHTS]
    back = _restore(model, tmp_path)
    assert back is not None and torch.equal(_logits(back), _logits(model))
    assert back.config.dtype == back.model.embed_tokens.weight.dtype == torch.bfloat16  # as the model ran
    assert isinstance(back.model.layers[0].self_attn.qkv_proj, Int4Linear)
    assert (back.model.layers[0].self_attn.qkv_proj.bias is not None) == (kind == "qwen2")
    if tie:  # the lm_head is the embedding table, one tensor, as in the model that was stored
        assert back.lm_head.weight is back.model.embed_tokens.weight
    rotary = back.model.rotary_emb  # a non-persistent buffer, rebuilt on the meta device: it must be stored
    assert torch.equal(rotary.inv_freq, model.model.rotary_emb.inv_freq)
    assert not any(t.is_meta for t in [*back.parameters(), *back.buffers()])
    assert back.model.layers[0].mlp.gate_up_proj.workspace is back.model.layers[1].self_attn.qkv_proj.workspace
    # what is on disk is what the model holds (plus the manifest and the file's header)
    assert int4_store.stored_bytes(model) <= int4_store.size_bytes(tmp_path) < int4_store.stored_bytes(model) + 65536


def test_the_key_follows_the_checkpoint_files(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert int4_store.store_key(folder) is None  # no weights: nothing to key
    (folder / "model.safetensors").write_bytes(b"x" * 100)
    key = int4_store.store_key(folder)
    assert key and key == int4_store.store_key(folder)
    (folder / "model.safetensors").write_bytes(b"y" * 101)  # a new checkpoint in the same place
    assert int4_store.store_key(folder) not in (None, key)
    assert int4_store.store_key(tmp_path / "missing") is None and int4_store.store_key("org/hub-id") is None


def _damage_weights(folder):
    path = folder / int4_store.WEIGHTS
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _other_format(folder):
    manifest = json.loads((folder / int4_store.MANIFEST).read_text())
    (folder / int4_store.MANIFEST).write_text(json.dumps(dict(manifest, format=int4_store.FORMAT + 1)))


def _tensor_missing(folder):
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / int4_store.WEIGHTS)
    tensors.pop(next(iter(tensors)))
    save_file(tensors, folder / int4_store.WEIGHTS)


@pytest.mark.parametrize("damage", [_damage_weights, _other_format, _tensor_missing])
def test_a_damaged_or_mismatched_entry_is_removed_not_a_crash(damage, tmp_path, caplog):
    model = _quantized("llama", False)
    folder = int4_store.save(model, tmp_path, "k")
    damage(folder)
    assert _restore(model, tmp_path) is None
    assert not folder.exists() and "quantizing again" in caplog.text
    assert _restore(model, tmp_path) is None  # and nothing there the next time


def test_a_write_cut_short_leaves_no_entry(tmp_path, monkeypatch):
    import safetensors.torch

    model = _quantized("llama", False)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(OSError):
        int4_store.save(model, tmp_path, "k")
    assert list(int4_store.store_root(tmp_path).iterdir()) == [] and _restore(model, tmp_path) is None
    # a partial folder an exit left behind is cleared by a later write once it is old
    monkeypatch.undo()
    stale = int4_store.store_root(tmp_path) / ".k.0123.partial"
    stale.mkdir()
    os.utime(stale, (0, 0))
    int4_store.save(model, tmp_path, "k")
    assert not stale.exists() and _restore(model, tmp_path) is not None


def test_an_entry_another_process_stored_first_is_kept(tmp_path, monkeypatch):
    # Two app processes sharing a cache can store the same checkpoint at once. The second to finish must
    # not delete the first one's entry, which may be loading: it keeps it and drops its own copy.
    import safetensors.torch

    model = _quantized("llama", False)
    real_save_file, first = safetensors.torch.save_file, {}

    def other_process_finishes_first(*args, **kwargs):
        if not first:
            first["started"] = True  # the other process's own write goes straight through
            first["folder"] = int4_store.save(model, tmp_path, "k")
            first["inode"] = first["folder"].stat().st_ino
        real_save_file(*args, **kwargs)
    monkeypatch.setattr(safetensors.torch, "save_file", other_process_finishes_first)
    folder = int4_store.save(model, tmp_path, "k")
    assert folder == first["folder"] and folder.stat().st_ino == first["inode"]
    assert [p.name for p in int4_store.store_root(tmp_path).iterdir()] == ["k"]  # our copy is gone
    assert torch.equal(_logits(_restore(model, tmp_path)), _logits(model))


def test_only_the_most_recently_used_entries_are_kept(tmp_path, monkeypatch):
    # A key never matches again once the checkpoint or torch changes: without a bound the store grows forever.
    monkeypatch.setattr(int4_store, "KEEP_ENTRIES", 3)
    model = _quantized("llama", False)
    for age, key in enumerate(["a", "b", "c"]):
        folder = int4_store.save(model, tmp_path, key)
        os.utime(folder / int4_store.MANIFEST, (1000 + age, 1000 + age))  # a, then b, then c
    assert _restore(model, tmp_path, "a") is not None  # a load marks "a" used: "b" is now the oldest
    damaged = int4_store.store_root(tmp_path) / "d"
    damaged.mkdir()  # no manifest: the least recently used of all
    int4_store.save(model, tmp_path, "e")
    assert sorted(p.name for p in int4_store.store_root(tmp_path).iterdir()) == ["a", "c", "e"]
    root = int4_store.store_root(tmp_path)
    os.utime(root / "a" / int4_store.MANIFEST, (2000, 2000))
    assert int4_store.prune(tmp_path, 1) == ["a", "c"]  # the oldest last: e (just written) stays
    assert [p.name for p in root.iterdir()] == ["e"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_second_int4_load_comes_from_the_store_and_answers_the_same(catalog, tiny_llama, tmp_path):
    from models.engine import Engine
    from models.generation import SamplingSettings, chat_input_ids
    from models.loading import LoadSettings
    from models.quant import Quant

    engine = Engine(catalog, cache_dir=tmp_path)
    greedy = SamplingSettings(max_new_tokens=12, temperature=0)
    answers, stored = [], []
    try:
        for _ in range(2):
            loaded = engine.load(str(tiny_llama), LoadSettings(quant=Quant.INT4, context_tokens=256)).loaded
            stored.append(loaded.int4_stored)
            assert loaded.fast.wait_compiled(600)  # both answers from the compiled step: the same kernels
            ids = chat_input_ids(loaded.tokenizer, [{"role": "user", "content": "Say something."}])
            answers.append(list(loaded.fast.stream(loaded.tokenizer, ids, greedy, threading.Event()))[-1].token_ids)
            for thread in threading.enumerate():  # the first load's write runs in the background
                if thread.name == "int4-store":
                    thread.join(60)
            del loaded
            engine.unload()
    finally:
        engine.unload()
        torch.cuda.set_per_process_memory_fraction(1.0)
    assert stored == [False, True] and int4_store.size_bytes(tmp_path) > 0
    assert answers[0] == answers[1]


def test_a_hub_model_is_keyed_by_its_snapshot_in_the_hub_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from models.loading import _int4_key
    from models.sources import LocalModel

    repo = tmp_path / "hub" / "models--org--tiny"
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    (snapshot / "config.json").write_text("{}")
    (snapshot / "model.safetensors").write_bytes(b"x" * 10)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    key = _int4_key(LocalModel("org/tiny", "", hub=True))
    assert key is not None and key == int4_store.store_key(snapshot)
    assert _int4_key(LocalModel("org/not-cached", "", hub=True)) is None  # looked up offline: never fetched


def test_the_store_write_stall_bench_runs_a_loop_beside_the_real_writer():
    """bench/store_write_stall.py: the loop runs while int4_store.write stores a snapshot (a small one here)."""
    from bench.store_write_stall import measure

    rows = measure(0.02, 1.0, idle_s=0.3)
    assert [row["writing"] for row in rows] == [False, True, False]
    assert all(row["steps_per_s"] > 0 and row["worst_step_ms"] >= 1.0 for row in rows), rows
