"""Catalog resolution and the loader on a tiny random Llama: every quantization on CPU,
explicit device maps, disk offload, and a clear error for each bad input."""

import shutil
import threading

import pytest
import torch

from models import hardware
from models.catalog import UnknownModelError, load_catalog
from models.engine import Engine
from models.generation import SamplingSettings
from models.loading import LoadSettings, ModelLoadError, NoChatTemplateError
from models.placement import build_device_map
from models.memory import FitPlan, Verdict
from models.messages import Message
from models.quant import Quant, quant_options
from models.sources import ModelSourceError
from tiny import write_tiny_llama

GREEDY = SamplingSettings(max_new_tokens=12, temperature=0)


def greedy_text(engine: Engine, prompt: str = "Hello world") -> str:
    update = None
    for update in engine.chat([{"role": "user", "content": prompt}], GREEDY, threading.Event()):
        pass
    return update.text


# ----- catalog ------------------------------------------------------------------------
def test_catalog_has_the_product_models_with_shapes(catalog):
    assert catalog.default_id == "smollm2-135m-instruct"
    for model_id in ["internlm2-chat-1.8b", "internlm2.5-7b-chat", "internlm3-8b-instruct",
                     "qwen2.5-1.5b-instruct", "qwen2.5-7b-instruct"]:
        entry = catalog.get(model_id)
        assert entry.source == "hub" and "/" in entry.repo and entry.license and entry.notes
        assert entry.shape.num_layers > 0 and entry.shape.max_context >= 8192
    assert catalog.get("internlm2.5-7b-chat").architecture == "internlm2"


def test_unknown_id_lists_the_valid_ones(catalog):
    with pytest.raises(UnknownModelError) as e:
        catalog.get("gpt-9")
    assert all(i in str(e.value) for i in catalog.ids())
    with pytest.raises(UnknownModelError, match="Valid ids"):
        catalog.resolve("not a model")


def test_resolve_folder_gguf_hub_and_missing_path(catalog, tiny_llama, tmp_path):
    assert catalog.resolve("").entry.id == catalog.default_id
    assert catalog.resolve(str(tiny_llama)).kind == "folder"
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert catalog.resolve(str(gguf)).kind == "gguf"
    assert catalog.resolve("Qwen/Qwen2.5-7B-Instruct").kind == "hub"
    with pytest.raises(UnknownModelError, match="No such folder"):
        catalog.resolve(str(tmp_path / "missing"))
    (tmp_path / "weights.txt").write_text("x")
    with pytest.raises(UnknownModelError, match="not a .gguf"):
        catalog.resolve(str(tmp_path / "weights.txt"))


def test_catalog_rejects_unknown_shape_keys(tmp_path):
    bad = tmp_path / "c.toml"
    bad.write_text('[models.x]\nname="x"\nsource="hub"\narchitecture="llama"\n'
                   '[models.x.shape]\nhidden_size=1\nnum_layers=1\nnum_heads=1\nnum_kv_heads=1\n'
                   'vocab_size=1\nintermediate_size=1\nmax_context=1\nlayers=3\n')
    with pytest.raises(ValueError, match="unknown keys"):
        load_catalog(bad)


def test_quant_options_explain_what_a_gpu_cannot_run():
    assert all(o.available for o in quant_options("cpu") if o.quant is not Quant.INT4)  # int4-fast: CUDA only
    old = {o.quant: o for o in quant_options("cuda", (6, 1))}
    assert old[Quant.NF4].available and not old[Quant.INT8].available
    assert "sm75" in old[Quant.INT8].reason and "sm80" in old[Quant.BF16].reason


# ----- loading on CPU -----------------------------------------------------------------
@pytest.mark.parametrize("quant", [q for q in Quant if q is not Quant.INT4])  # int4-fast: CUDA only
def test_every_quantization_loads_on_cpu_with_predicted_weight_bytes(catalog, tiny_llama, quant):
    engine = Engine(catalog)
    report = engine.load(str(tiny_llama), LoadSettings(quant=quant, context_tokens=256))
    loaded = report.loaded
    assert loaded.device == "cpu" and loaded.split == {"gpu": 0, "cpu": 4, "disk": 0}
    # The planner's weight figure is the measured one, to the byte (bar bnb's 16-entry code book
    # tensors, which it may share between modules).
    assert abs(loaded.weights_bytes - loaded.plan.weights_bytes) <= 64 * 28
    if quant in (Quant.INT8, Quant.NF4):
        import bitsandbytes as bnb

        layer = loaded.model.model.layers[0].mlp.gate_proj
        assert isinstance(layer, bnb.nn.Linear8bitLt if quant is Quant.INT8 else bnb.nn.Linear4bit)
    assert len(greedy_text(engine)) > 0


def test_double_quant_is_smaller_than_plain_nf4_as_predicted(catalog, tmp_path):
    # Wide enough that the saved absmax bytes outweigh double quant's 1 KiB code book per layer.
    folder = write_tiny_llama(tmp_path / "wider", hidden_size=256, intermediate_size=512)
    engine = Engine(catalog)
    plain = engine.load(str(folder), LoadSettings(quant=Quant.NF4)).loaded
    double = engine.load(str(folder), LoadSettings(quant=Quant.NF4, double_quant=True)).loaded
    assert double.weights_bytes < plain.weights_bytes
    assert abs(double.weights_bytes - double.plan.weights_bytes) <= 64 * 28


def test_disk_offload_when_ram_is_short_gives_the_same_answer(catalog, tiny_llama, monkeypatch, tmp_path):
    engine = Engine(catalog, cache_dir=tmp_path)
    engine.load(str(tiny_llama), LoadSettings(context_tokens=256))
    expected = greedy_text(engine)
    layer = engine.loaded.plan.weights_bytes // 8  # a rough per-layer size for this tiny model
    fixed = engine.loaded.plan.kv_bytes + engine.loaded.plan.workspace_bytes
    # Leave RAM for the embeddings and about two layers: the rest must go to disk.
    ram = (engine.loaded.plan.weights_bytes - 4 * layer) + fixed + 2 * layer
    monkeypatch.setattr(hardware, "ram_available", lambda: int(ram / 0.9))
    loaded = engine.load(str(tiny_llama), LoadSettings(context_tokens=256)).loaded
    assert loaded.plan.verdict == "disk" and loaded.split["disk"] > 0
    assert loaded.split["cpu"] + loaded.split["disk"] == 4
    assert greedy_text(engine) == expected


def test_device_map_realizes_a_gpu_cpu_disk_plan(tiny_llama):
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_llama))
    plan = FitPlan(
        verdict=Verdict.OFFLOAD, device="cuda", quant=Quant.NF4, context_tokens=256, weights_bytes=0,
        gpu_weights_bytes=0, kv_bytes=0, workspace_bytes=0, cuda_context_bytes=0, predicted_peak_bytes=0, gpu_layers=2,
        cpu_layers=1, disk_layers=1, lm_head_on_gpu=False, reason=Message("plan_offload"),
    )
    device_map = build_device_map(meta, plan, 4)
    assert [device_map[f"model.layers.{i}"] for i in range(4)] == [0, 0, "cpu", "disk"]
    assert device_map["model.embed_tokens"] == 0 and device_map["model.norm"] == 0
    assert device_map["lm_head"] == "cpu"
    # Every parameter is covered by exactly one entry.
    for name, _ in meta.named_parameters():
        assert sum(name == k or name.startswith(k + ".") for k in device_map) == 1, name


# ----- bad input: clear errors --------------------------------------------------------
def test_folder_without_weights_or_tokenizer(catalog, tiny_llama, tmp_path):
    engine = Engine(catalog, cache_dir=tmp_path / "cache")
    no_weights = tmp_path / "no-weights"
    shutil.copytree(tiny_llama, no_weights)
    for f in no_weights.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(ModelSourceError, match="no weights"):
        engine.load(str(no_weights), LoadSettings())
    no_tok = tmp_path / "no-tokenizer"
    shutil.copytree(tiny_llama, no_tok)
    for f in no_tok.glob("tokenizer*"):
        f.unlink()
    with pytest.raises(ModelSourceError, match="no tokenizer"):
        engine.load(str(no_tok), LoadSettings())
    no_config = tmp_path / "no-config"
    shutil.copytree(tiny_llama, no_config)
    (no_config / "config.json").unlink()
    with pytest.raises(ModelSourceError, match="config.json"):
        engine.load(str(no_config), LoadSettings())
    bad_json = tmp_path / "bad-json"
    shutil.copytree(tiny_llama, bad_json)
    (bad_json / "config.json").write_text("{oops")
    with pytest.raises(ModelSourceError, match="not valid JSON"):
        engine.load(str(bad_json), LoadSettings())
    assert engine.loaded is None


def test_tokenizer_without_chat_template_is_refused(catalog, tmp_path):
    base = write_tiny_llama(tmp_path / "base", chat_template=None)
    with pytest.raises(NoChatTemplateError, match="no chat template"):
        Engine(catalog, cache_dir=tmp_path / "c").load(str(base), LoadSettings())


def test_hub_id_while_offline(catalog, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    with pytest.raises(ModelSourceError, match="offline"):
        Engine(catalog, cache_dir=tmp_path).load("someone/some-model", LoadSettings())


def test_failed_load_keeps_the_previous_model_usable(catalog, tiny_llama, tmp_path):
    engine = Engine(catalog, cache_dir=tmp_path)
    engine.load(str(tiny_llama), LoadSettings())
    with pytest.raises(UnknownModelError):
        engine.load(str(tmp_path / "nope"), LoadSettings())
    assert engine.loaded is not None and greedy_text(engine)


def test_a_load_that_cannot_work_never_unloads_the_current_model(catalog, tiny_llama, tmp_path, monkeypatch):
    engine = Engine(catalog, cache_dir=tmp_path)
    engine.load(str(tiny_llama), LoadSettings())
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    with pytest.raises(ModelSourceError, match="offline"):  # a hub id with no network
        engine.load("someone/some-model", LoadSettings())
    assert engine.loaded is not None and greedy_text(engine)
    tight = Engine(catalog, cache_dir=tmp_path, ram_budget_bytes=10 * 2**20)
    tight.load(str(tiny_llama), LoadSettings())
    with pytest.raises(ModelLoadError, match="Won't fit"):  # the 7B in 10 MiB of RAM
        tight.load("qwen2.5-7b-instruct", LoadSettings())
    assert tight.loaded is not None and greedy_text(tight)


def test_unload_reports_no_residual_on_cpu(catalog, tiny_llama):
    engine = Engine(catalog)
    engine.load(str(tiny_llama), LoadSettings())
    report = engine.load(str(tiny_llama), LoadSettings(quant=Quant.NF4))
    assert len(report.unloaded) == 1 and report.unloaded[0].residual_bytes == 0
    assert report.switch_seconds >= report.loaded.load_seconds


def test_load_settings_are_built_from_the_users_numbers_in_one_place(tmp_path):
    from models.messages import UserFacingError
    from models.settings import LoadOptions

    options = LoadOptions(trust_remote_code=True, stream_offload=False, cache_dir=tmp_path)
    settings = LoadSettings.from_user("4bit", 6.5, 2048, True, options)
    assert settings == LoadSettings(quant=Quant.NF4, double_quant=True, gpu_budget_bytes=int(6.5 * 1024**3),
                                    context_tokens=2048, trust_remote_code=True, cache_dir=tmp_path,
                                    stream_offload=False)
    default = LoadSettings.from_user(Quant.INT8, None, 512)
    assert default.gpu_budget_bytes is None and default.quant is Quant.INT8 and not default.trust_remote_code
    assert LoadSettings.from_user("none", 0, 512).gpu_budget_bytes is None  # 0 GiB: the default budget
    with pytest.raises(UserFacingError, match="Unknown quantization '2bit'"):
        LoadSettings.from_user("2bit", None, 512)
