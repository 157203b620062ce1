"""Several GPUs on a CPU-only machine: the split plan by hand, the device map, the budget and the panel
with faked device counts and free memory."""

import pytest

from models.catalog import ModelShape
from models.memory import (
    ALLOCATOR_SLACK, GiB, KERNEL_IMAGES, MiB, PREFILL_CHUNK, Budget, kv_cache_bytes, layer_bytes, plan_fit,
    workspace_bytes,
)
from models.memory_split import kv_room_bytes
from models.quant import Quant

# A Llama-2-7B shape: 6.74 B parameters, 12.6 GiB in fp16, so it needs two 8 GiB GPUs.
LLAMA_7B = ModelShape(hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32, vocab_size=32000,
                      intermediate_size=11008, max_context=4096)
CONTEXT = 1024
# Hand-computed: per layer 4 x 4096^2 + 3 x 4096 x 11008 linear weights + 2 x 4096 norms, in fp16.
LAYER = 2 * (4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096)  # 404,766,720
KV_LAYER = CONTEXT * 2 * 32 * 128 * 2  # K and V x 32 heads x 128 dims x fp16: 16 MiB per layer at 1024 tokens
EMBED = 32000 * 4096 * 2  # 262,144,000
HEAD = EMBED + 4096 * 2  # the lm_head plus the final norm, on the last GPU
CONTEXT_BYTES = 500 * MiB


def _fixed(quant=Quant.NONE):
    """What every used GPU keeps besides layers: CUDA context, kernel images, workspace, allocator slack."""
    return CONTEXT_BYTES + KERNEL_IMAGES[quant] + workspace_bytes(LLAMA_7B, quant, 2, PREFILL_CHUNK, CONTEXT) + ALLOCATOR_SLACK


def _gpus(*gib, ram_gib=64):
    per = tuple(int(g * GiB) for g in gib)
    return Budget(gpu_bytes=sum(per), ram_bytes=ram_gib * GiB, disk_bytes=100 * GiB, cuda_context_bytes=CONTEXT_BYTES,
                  gpu_bytes_per_device=per if len(per) > 1 else ())


def test_the_hand_computed_sizes_match_the_planner():
    assert layer_bytes(LLAMA_7B, Quant.NONE, 2) == LAYER == 404_766_720
    assert kv_cache_bytes(LLAMA_7B, CONTEXT) == 32 * KV_LAYER == 512 * MiB


def test_7b_fp16_over_two_8_gib_gpus_fits_with_no_offload():
    plan = plan_fit(LLAMA_7B, Quant.NONE, 2, CONTEXT, _gpus(8, 8))
    # GPU 0: (8 GiB - fixed - embeddings) // (layer + its KV) = 7,400,331,264 // 421,543,936 = 17 layers;
    # GPU 1 takes the other 15 and the lm_head.
    assert (8 * GiB - _fixed() - EMBED) // (LAYER + KV_LAYER) == 17
    assert plan.verdict == "gpu" and plan.gpu_layers_per_device == (17, 15)
    assert plan.gpu_layers == 32 and plan.offloaded_layers == 0 and plan.lm_head_on_gpu and plan.head_device == 1
    assert plan.peak_bytes_per_device == (_fixed() + EMBED + 17 * (LAYER + KV_LAYER),
                                          _fixed() + HEAD + 15 * (LAYER + KV_LAYER))
    assert all(p <= 8 * GiB for p in plan.peak_bytes_per_device)
    assert plan.predicted_peak_bytes == sum(plan.peak_bytes_per_device) and plan.budget_bytes == 16 * GiB
    assert plan.message.startswith("Fits on 2 GPUs: 17 + 15 layers")
    assert [plan.layer_device(i) for i in (0, 16, 17, 31)] == [0, 0, 1, 1]


def test_the_same_model_on_one_8_gib_gpu_offloads_to_cpu():
    plan = plan_fit(LLAMA_7B, Quant.NONE, 2, CONTEXT, _gpus(8))
    assert plan.verdict == "offload" and plan.cpu_layers > 0 and plan.gpu_layers_per_device == ()
    assert plan.gpu_layers + plan.cpu_layers == 32 and plan.layer_device(31) == "cpu"


def test_three_gpus_use_the_fewest_that_hold_the_model():
    plan = plan_fit(LLAMA_7B, Quant.NONE, 2, CONTEXT, _gpus(6, 6, 6))
    # Two GPUs hold 12 + 12 (the second also the lm_head): short of 32. With three:
    # 5,177,088,000 // 421,543,936 = 12, then 5,439,232,000 // 421,543,936 = 12 (no embeddings, no head),
    # the last the 8 left.
    assert (6 * GiB - _fixed() - EMBED) // (LAYER + KV_LAYER) == 12
    assert (6 * GiB - _fixed()) // (LAYER + KV_LAYER) == 12
    assert plan.verdict == "gpu" and plan.gpu_layers_per_device == (12, 12, 8) and plan.head_device == 2
    assert "Fits on 3 GPUs: 12 + 12 + 8 layers" in plan.message
    # Room to spare on a third GPU: it is left unused, with nothing planned on it.
    roomy = plan_fit(LLAMA_7B, Quant.NONE, 2, CONTEXT, _gpus(9, 9, 9))
    assert roomy.gpu_layers_per_device[2] == 0 and roomy.peak_bytes_per_device[2] == 0
    assert roomy.message.startswith("Fits on 2 GPUs:")


def test_uneven_budgets_give_each_gpu_what_its_own_budget_holds():
    plan = plan_fit(LLAMA_7B, Quant.NONE, 2, CONTEXT, _gpus(6, 10))
    # GPU 0: 12 as above; GPU 1 could take (10 GiB - fixed - head) // cost = 22, needs only 20.
    assert (10 * GiB - _fixed() - HEAD) // (LAYER + KV_LAYER) == 22
    assert plan.verdict == "gpu" and plan.gpu_layers_per_device == (12, 20)
    assert plan.peak_bytes_per_device[0] <= 6 * GiB and plan.peak_bytes_per_device[1] <= 10 * GiB


def test_split_that_still_needs_cpu_keeps_stream_slots_and_offloaded_kv_on_gpu_0():
    plan = plan_fit(LLAMA_7B, Quant.NONE, 2, CONTEXT, _gpus(5, 5), stream_slots=2)
    counts = plan.gpu_layers_per_device
    assert plan.verdict == "offload" and plan.cpu_layers == 32 - sum(counts) > 0 and plan.streamed_layers
    # GPU 1 is full of its own layers and the lm_head; one more would not fit.
    assert (5 * GiB - _fixed() - HEAD) // (LAYER + KV_LAYER) == counts[1]
    # GPU 0: embeddings, its layers, two stream slots, and the KV of its own and every offloaded layer.
    gpu0 = _fixed() + EMBED + counts[0] * LAYER + 2 * LAYER + (32 - counts[1]) * KV_LAYER
    assert plan.peak_bytes_per_device[0] == gpu0 <= 5 * GiB < gpu0 + LAYER
    assert "Fits on 2 GPUs with" in plan.message and "offloaded" in plan.message
    assert plan.layer_device(31) == "cpu" and plan.layer_device(counts[0]) == 1


def test_int4_stays_on_one_gpu_and_says_why():
    two = plan_fit(LLAMA_7B, Quant.INT4, 2, CONTEXT, _gpus(8, 8))
    one = plan_fit(LLAMA_7B, Quant.INT4, 2, CONTEXT, _gpus(8))
    assert two.verdict == one.verdict == "gpu" and two.gpu_layers_per_device == () and two.gpu_count == 1
    assert two.predicted_peak_bytes == one.predicted_peak_bytes and two.budget_bytes == 8 * GiB
    assert "runs on one GPU" in two.message and "GPU 0 of 2" in two.message
    # Too big for GPU 0 alone: offload (which int4 refuses at load), never a split.
    tight = plan_fit(LLAMA_7B, Quant.INT4, 2, CONTEXT, _gpus(3, 8))
    assert tight.verdict != "gpu" and tight.gpu_layers_per_device == () and "one GPU" in tight.message


def test_kv_room_is_limited_by_the_gpu_with_least_room_per_layer():
    plan = plan_fit(LLAMA_7B, Quant.NONE, 2, CONTEXT, _gpus(8, 8))
    left0 = 8 * GiB - (plan.peak_bytes_per_device[0] - 17 * KV_LAYER)  # room for GPU 0's 17 layers' KV
    left1 = 8 * GiB - (plan.peak_bytes_per_device[1] - 15 * KV_LAYER)
    assert kv_room_bytes(plan) == min(left0 * 32 // 17, left1 * 32 // 15) >= 32 * KV_LAYER


# ----- readings, budget and device map with faked GPUs ----------------------------------
def _fake_gpus(monkeypatch, free_gib):
    """Make this CPU machine look like it has len(free_gib) GPUs with that much VRAM free on each."""
    from models import hardware

    monkeypatch.setattr(hardware, "cuda_available", lambda: True)
    monkeypatch.setattr(hardware, "cuda_device_count", lambda: len(free_gib))
    monkeypatch.setattr(hardware, "gpu_free_bytes", lambda d: int(free_gib[d] * GiB))
    monkeypatch.setattr(hardware, "gpu_reserved_bytes", lambda d: 0)
    monkeypatch.setattr(hardware, "ram_available", lambda: 64 * GiB)


def test_make_budget_reads_every_gpu_and_applies_the_users_budget_to_each(monkeypatch, tmp_path):
    from models.loading import LoadSettings
    from models.placement import make_budget

    _fake_gpus(monkeypatch, [8.5, 12.5])
    free = make_budget(LoadSettings(), CONTEXT_BYTES, tmp_path)
    # Each GPU's free VRAM minus the half-GiB margin, plus the CUDA context we already hold there.
    assert free.gpu_bytes_per_device == (8 * GiB + CONTEXT_BYTES, 12 * GiB + CONTEXT_BYTES)
    assert free.gpu_bytes == sum(free.gpu_bytes_per_device) and free.gpu_count == 2
    capped = make_budget(LoadSettings(gpu_budget_bytes=6 * GiB), CONTEXT_BYTES, tmp_path)
    assert capped.gpu_bytes_per_device == (6 * GiB, 6 * GiB) and capped.gpu_bytes == 12 * GiB


def test_the_slider_starts_at_the_budget_a_load_gets_by_default(monkeypatch, catalog, tmp_path):
    # One default-budget formula: what the UI's GPU budget slider starts at is what make_budget plans with.
    from models.engine import Engine
    from models.loading import LoadSettings
    from models.placement import make_budget

    _fake_gpus(monkeypatch, [8.5])
    engine = Engine(catalog)
    monkeypatch.setattr(engine, "cuda_runtime_bytes", lambda: CONTEXT_BYTES)
    assert engine.default_gpu_budget_bytes() == make_budget(LoadSettings(), CONTEXT_BYTES, tmp_path).gpu_bytes
    assert engine.default_gpu_budget_bytes() == 8 * GiB + CONTEXT_BYTES  # free minus the half-GiB margin, plus ours


def test_one_gpu_budget_is_unchanged(monkeypatch, tmp_path):
    from models import hardware
    from models.loading import LoadSettings
    from models.placement import make_budget

    _fake_gpus(monkeypatch, [8.5])
    budget = make_budget(LoadSettings(gpu_budget_bytes=6 * GiB), CONTEXT_BYTES, tmp_path)
    assert budget.gpu_bytes == 6 * GiB and budget.gpu_bytes_per_device == () and budget.gpu_count == 1
    monkeypatch.setattr(hardware, "cuda_available", lambda: False)
    assert make_budget(LoadSettings(), CONTEXT_BYTES, tmp_path).gpu_count == 0


def test_plan_for_a_catalog_7b_over_two_faked_gpus(monkeypatch, tmp_path, catalog):
    from models.loading import LoadSettings
    from models.placement import make_budget, plan_for

    _fake_gpus(monkeypatch, [10, 10])
    shape = catalog.get("qwen2.5-7b-instruct").shape
    settings = LoadSettings(quant=Quant.NONE, context_tokens=4096)
    plan = plan_for(shape, settings, make_budget(settings, CONTEXT_BYTES, tmp_path))
    assert plan.verdict == "gpu" and len(plan.gpu_layers_per_device) == 2 and sum(plan.gpu_layers_per_device) == 28
    assert plan.message.startswith("Fits on 2 GPUs:")
    _fake_gpus(monkeypatch, [10])  # the same model on one of those GPUs must offload
    assert plan_for(shape, settings, make_budget(settings, CONTEXT_BYTES, tmp_path)).verdict == "offload"


def _meta(folder, **overrides):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder, **overrides))


def _tiny_split_plan(counts, cpu=0, head_on_gpu=True):
    from models.memory import FitPlan, Verdict
    from models.messages import Message

    return FitPlan(
        verdict=Verdict.GPU if not cpu else Verdict.OFFLOAD, device="cuda", quant=Quant.NONE, context_tokens=256,
        weights_bytes=0, gpu_weights_bytes=0, kv_bytes=0, workspace_bytes=0, cuda_context_bytes=0,
        predicted_peak_bytes=0, gpu_layers=sum(counts), cpu_layers=cpu, disk_layers=0, lm_head_on_gpu=head_on_gpu,
        reason=Message("plan_gpu"), gpu_layers_per_device=tuple(counts), peak_bytes_per_device=(0,) * len(counts),
        budget_bytes_per_device=(3 * GiB,) * len(counts), head_device=max(i for i, c in enumerate(counts) if c),
    )


def test_device_map_puts_each_layer_on_its_planned_gpu(tiny_llama):
    from models.placement import build_device_map, max_memory

    meta = _meta(tiny_llama)  # 4 layers, untied lm_head
    device_map = build_device_map(meta, _tiny_split_plan((2, 1), cpu=1), 4)
    assert [device_map[f"model.layers.{i}"] for i in range(4)] == [0, 0, 1, "cpu"]
    # Embeddings on the first GPU; final norm and lm_head on the last GPU that holds layers.
    assert device_map["model.embed_tokens"] == 0
    assert device_map["model.norm"] == 1 and device_map["lm_head"] == 1
    for name, _ in meta.named_parameters():
        assert sum(name == k or name.startswith(k + ".") for k in device_map) == 1, name
    three = build_device_map(meta, _tiny_split_plan((1, 2, 1)), 4)
    assert [three[f"model.layers.{i}"] for i in range(4)] == [0, 1, 1, 2] and three["lm_head"] == 2
    assert max_memory(_tiny_split_plan((1, 2, 1)), 5 * GiB) == {0: 3 * GiB, 1: 3 * GiB, 2: 3 * GiB, "cpu": 5 * GiB}


def test_tied_lm_head_stays_with_the_embeddings(tiny_llama):
    from models.placement import build_device_map

    meta = _meta(tiny_llama, tie_word_embeddings=True)
    assert meta.get_output_embeddings().weight is meta.get_input_embeddings().weight
    device_map = build_device_map(meta, _tiny_split_plan((2, 2)), 4)
    assert device_map["lm_head"] == device_map["model.embed_tokens"] == 0 and device_map["model.norm"] == 1


def test_engine_caps_the_allocator_on_every_gpu(monkeypatch, catalog):
    import types

    import torch

    from models import hardware
    from models.engine import Engine
    from models.loading import LoadSettings
    from models.placement import cap_allocator

    engine = Engine(catalog)
    _fake_gpus(monkeypatch, [8, 8])
    caps = {}
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: types.SimpleNamespace(total_memory=16 * GiB))
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, d: caps.__setitem__(d, f))
    monkeypatch.setattr(engine, "cuda_runtime_bytes", lambda: 0)
    cap_allocator(LoadSettings(gpu_budget_bytes=4 * GiB), engine.cuda_runtime_bytes())
    assert caps == {0: 0.25, 1: 0.25}
    monkeypatch.setattr(hardware, "cuda_device_count", lambda: 1)
    caps.clear()
    cap_allocator(LoadSettings(), engine.cuda_runtime_bytes())
    assert caps == {0: 1.0}


# ----- the memory panel: one bar per GPU ---------------------------------------------------
def _fake_readings(monkeypatch, gpus):
    """GPU readings of a machine with these (name, free, total, reserved) GPUs, and no NVML."""
    import torch

    from models import hardware

    monkeypatch.setattr(hardware, "cuda_available", lambda: True)
    monkeypatch.setattr(hardware, "cuda_device_count", lambda: len(gpus))
    monkeypatch.setattr(hardware, "gpu_reading", lambda d: (*gpus[d], gpus[d][3]))
    monkeypatch.setattr(hardware, "_nvml_process_bytes", lambda index=0: None)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)


def test_snapshot_reads_each_gpu_and_sums_them(monkeypatch):
    from models import hardware

    _fake_readings(monkeypatch, [("H200", 10 * GiB, 16 * GiB, 5 * GiB), ("H200", 12 * GiB, 16 * GiB, 3 * GiB)])
    snap = hardware.snapshot(8 * GiB, GiB, per_device=[(4 * GiB, GiB // 2), (4 * GiB, GiB // 2)])
    first, second = snap.gpus
    assert (first.device_name, second.device_name) == ("H200 (GPU 0)", "H200 (GPU 1)")
    assert (first.free, second.free) == (10 * GiB, 12 * GiB) and snap.free == 22 * GiB and snap.total == 32 * GiB
    assert (first.weights, second.kv_cache) == (4 * GiB, GiB // 2) and snap.weights == 8 * GiB
    assert first.other_allocator == 5 * GiB - 4 * GiB - GiB // 2  # reserved minus weights and KV on that GPU
    assert snap.per_gpu == snap.gpus and first.per_gpu == (first,)
    _fake_readings(monkeypatch, [("H200", 10 * GiB, 16 * GiB, 5 * GiB)])
    one = hardware.snapshot(4 * GiB, GiB)
    assert one.gpus == () and one.device_name == "H200" and one.free == 10 * GiB


def test_memory_panel_shows_one_bar_per_gpu(monkeypatch):
    from models import hardware
    from ui.panels import memory_panel_html

    _fake_readings(monkeypatch, [("RTX 4090", 10 * GiB, 24 * GiB, 5 * GiB), ("RTX 3090", 12 * GiB, 24 * GiB, 3 * GiB)])
    snap = hardware.snapshot(per_device=[(4 * GiB, GiB // 2), (2 * GiB, GiB // 4)])
    page = memory_panel_html(snap, "en", budget_bytes=20 * GiB)
    assert page.count("class='mem-bar'") == 2 and page.count("class='mem-gpu'") == 2
    assert "RTX 4090 (GPU 0)" in page and "RTX 3090 (GPU 1)" in page and "2 GPUs" in page
    blocks = page.split("class='mem-gpu'")[1:]
    assert "4.00 GiB" in blocks[0] and "2.00 GiB" in blocks[1]  # each bar its own GPU's weights
    assert "10.00 GiB" in blocks[0] and "12.00 GiB" in blocks[1]  # and free
    assert page.count("class='mem-budget'") == 2  # the per-GPU budget marked on each


def test_memory_panel_on_one_device_has_one_bar(monkeypatch):
    from models import hardware
    from ui.panels import memory_panel_html

    monkeypatch.setattr(hardware, "cuda_available", lambda: False)
    page = memory_panel_html(hardware.snapshot(), "en")
    assert page.count("class='mem-bar'") == 1 and "mem-gpu" not in page


def test_fit_text_lists_the_layers_of_each_gpu():
    from ui.panels import plan_text, split_text

    text = plan_text(plan_fit(LLAMA_7B, Quant.NONE, 2, CONTEXT, _gpus(8, 8)), "en")
    assert text.startswith("✅ Fits on 2 GPUs: 17 + 15 layers")
    offload = plan_text(plan_fit(LLAMA_7B, Quant.NONE, 2, CONTEXT, _gpus(5, 5)), "zh")
    assert "2 张显卡" in offload and "Fits" not in offload
    int4 = plan_text(plan_fit(LLAMA_7B, Quant.INT4, 2, CONTEXT, _gpus(8, 8)), "en")
    assert int4.startswith("✅ 4bit-fast (int4) runs on one GPU") and "Fits on GPU" in int4
    assert "只使用 GPU 0" in plan_text(plan_fit(LLAMA_7B, Quant.INT4, 2, CONTEXT, _gpus(8, 8)), "zh")
    assert split_text({"gpu": 32, "cpu": 0, "disk": 0, "gpus": (17, 15)}, False, "en") == "layers: 17 + 15 on 2 GPUs"


def test_a_split_that_offloads_keeps_accelerates_hooks_rather_than_streaming(monkeypatch, tmp_path):
    from models.loading import LoadSettings
    from models.placement import make_budget, plan_for

    _fake_gpus(monkeypatch, [5.5, 5.5])
    settings = LoadSettings(quant=Quant.NONE, context_tokens=CONTEXT)  # streamed offload on, as by default
    plan = plan_for(LLAMA_7B, settings, make_budget(settings, CONTEXT_BYTES, tmp_path))
    assert plan.verdict == "offload" and plan.cpu_layers and plan.streamed_layers == 0
    assert plan.peak_bytes_per_device[0] == (_fixed() + EMBED + plan.gpu_layers_per_device[0] * LAYER + LAYER
                                             + (32 - plan.gpu_layers_per_device[1]) * KV_LAYER)
    _fake_gpus(monkeypatch, [5.5])
    assert plan_for(LLAMA_7B, settings, make_budget(settings, CONTEXT_BYTES, tmp_path)).streamed_layers


def test_engine_takes_kept_models_out_of_gpu_0_first_and_splits_kv_by_layer():
    from models.placement import kv_split as _kv_split, less_held as _less_held

    # A kept model's layers start on GPU 0, so its bytes come out of GPU 0's budget before GPU 1's.
    assert _less_held((8 * GiB, 8 * GiB), 3 * GiB) == (5 * GiB, 8 * GiB)
    assert _less_held((8 * GiB, 8 * GiB), 10 * GiB) == (0, 6 * GiB)
    assert _less_held((), GiB) == ()
    plan = plan_fit(LLAMA_7B, Quant.NONE, 2, CONTEXT, _gpus(8, 8))  # 17 + 15 layers
    assert _kv_split(32 * MiB, plan, 2) == [17 * MiB, 15 * MiB]
    offload = plan_fit(LLAMA_7B, Quant.NONE, 2, CONTEXT, _gpus(5, 5))  # offloaded layers' KV is on GPU 0
    g0, g1 = offload.gpu_layers_per_device
    assert _kv_split(32 * MiB, offload, 2) == [(32 - g1) * MiB, g1 * MiB]
    assert _kv_split(32 * MiB, None, 2) == [32 * MiB, 0]  # no split plan: all on GPU 0


def test_engine_memory_has_one_snapshot_per_faked_gpu(monkeypatch, catalog):
    from models.engine import Engine

    engine = Engine(catalog)
    _fake_readings(monkeypatch, [("A", 10 * GiB, 16 * GiB, 0), ("B", 12 * GiB, 16 * GiB, 0)])
    snap = engine.memory()
    assert [g.device_name for g in snap.gpus] == ["A (GPU 0)", "B (GPU 1)"] and snap.weights == 0
