"""Memory math against hand-computed figures, and the fit planner's verdicts."""


import pytest

from models.catalog import ModelShape
from models.memory import (
    layer_params,
    GiB, KiB, MiB, Budget, kv_bytes_per_token, kv_cache_bytes, layer_bytes, linear_bytes, plan_fit,
    total_params, weight_bytes,
)
from models.memory_split import kv_room_bytes
from models.quant import Quant


# Hand-computed from each config.json: 2 (K and V) x layers x kv_heads x head_dim x 2 bytes (fp16).
@pytest.mark.parametrize("model_id, kib_per_token", [
    ("internlm2-chat-1.8b", 96),      # 2*24*8*128*2
    ("internlm2.5-7b-chat", 128),     # 2*32*8*128*2
    ("internlm3-8b-instruct", 48),    # 2*48*2*128*2
    ("qwen2.5-1.5b-instruct", 28),    # 2*28*2*128*2
    ("qwen2.5-7b-instruct", 56),      # 2*28*4*128*2
    ("smollm2-135m-instruct", 22.5),  # 2*30*3*64*2
])
def test_kv_cache_per_token_matches_hand_computation(catalog, model_id, kib_per_token):
    shape = catalog.get(model_id).shape
    assert kv_bytes_per_token(shape, 2) == kib_per_token * KiB


def test_internlm25_7b_kv_cache_at_4k_and_32k(catalog):
    shape = catalog.get("internlm2.5-7b-chat").shape
    assert kv_cache_bytes(shape, 4096) == GiB // 2
    assert kv_cache_bytes(shape, 32768) == 4 * GiB


@pytest.mark.parametrize("model_id, billions", [
    ("internlm2-chat-1.8b", 1.889), ("internlm2.5-7b-chat", 7.738), ("internlm3-8b-instruct", 8.80),
    ("qwen2.5-1.5b-instruct", 1.54), ("qwen2.5-7b-instruct", 7.62), ("smollm2-135m-instruct", 0.1345),
])
def test_parameter_counts_match_published_sizes(catalog, model_id, billions):
    assert total_params(catalog.get(model_id).shape) / 1e9 == pytest.approx(billions, rel=0.005)


def test_fp16_weights_are_two_bytes_per_parameter(catalog):
    shape = catalog.get("internlm2.5-7b-chat").shape
    assert weight_bytes(shape, Quant.NONE, 2) == 2 * total_params(shape)


def test_linear_bytes_by_quantization():
    # A 4096x4096 projection: 16,777,216 weights.
    n = 4096 * 4096
    assert linear_bytes(4096, 4096, Quant.NONE, 2) == 2 * n
    assert linear_bytes(4096, 4096, Quant.INT8, 2) == n + 4096 * 4  # int8 + fp32 row scales
    # NF4: n/2 packed bytes + fp32 absmax per 64 weights + 16-entry code book.
    assert linear_bytes(4096, 4096, Quant.NF4, 2) == n // 2 + 4 * (n // 64) + 64
    # Double quant: uint8 absmax per 64 weights, fp32 per 256 of those, a 256-entry code book.
    blocks = n // 64
    assert linear_bytes(4096, 4096, Quant.NF4, 2, double_quant=True) == n // 2 + blocks + 4 * (blocks // 256) + 1024 + 64


def test_nf4_is_about_4_5_bits_per_quantized_weight_and_double_quant_about_4_1():
    n = 4096 * 14336
    assert linear_bytes(14336, 4096, Quant.NF4, 2) * 8 / n == pytest.approx(4.5, abs=0.01)
    assert linear_bytes(14336, 4096, Quant.NF4, 2, True) * 8 / n == pytest.approx(4.127, abs=0.01)


def test_7b_nf4_weights_include_absmax_that_get_memory_footprint_leaves_out(catalog):
    # FACTS: InternLM2.5-7B nf4 "footprint 5.0 GB" is model.get_memory_footprint(), which counts
    # parameters only; the fp32 absmax per 64 weights (~0.44 GB) lives outside them.
    shape = catalog.get("internlm2.5-7b-chat").shape
    linear = shape.num_layers * sum(o * i for o, i in layer_params(shape).linear_shapes)
    absmax = 4 * linear // 64
    assert (weight_bytes(shape, Quant.NF4, 2) - absmax) / 1e9 == pytest.approx(5.0, rel=0.01)
    assert weight_bytes(shape, Quant.NF4, 2) / 1e9 == pytest.approx(5.44, rel=0.01)


def test_tied_embeddings_have_no_separate_lm_head(catalog):
    tied = catalog.get("qwen2.5-1.5b-instruct").shape
    untied = ModelShape(**{**tied.__dict__, "tie_word_embeddings": False})
    assert weight_bytes(untied, Quant.NONE, 2) - weight_bytes(tied, Quant.NONE, 2) == 2 * tied.vocab_size * tied.hidden_size


def _budget(gpu_gib, ram_gib=64, disk_gib=100):
    return Budget(gpu_bytes=None if gpu_gib is None else int(gpu_gib * GiB), ram_bytes=int(ram_gib * GiB),
                  disk_bytes=int(disk_gib * GiB), cuda_context_bytes=500 * MiB)


def test_7b_4bit_fits_an_8_gib_budget(catalog):
    shape = catalog.get("internlm2.5-7b-chat").shape
    plan = plan_fit(shape, Quant.NF4, 2, 4096, _budget(8))
    assert plan.verdict == "gpu"
    assert plan.gpu_layers == 32 and plan.offloaded_layers == 0
    expected = plan.cuda_context_bytes + weight_bytes(shape, Quant.NF4, 2) + kv_cache_bytes(shape, 4096) + plan.workspace_bytes
    assert plan.predicted_peak_bytes == expected < 8 * GiB


def test_7b_fp16_under_8_gib_offloads_layers_and_keeps_room_for_one_streamed_layer(catalog):
    shape = catalog.get("internlm2.5-7b-chat").shape
    plan = plan_fit(shape, Quant.NONE, 2, 4096, _budget(8))
    assert plan.verdict == "offload"
    assert 0 < plan.gpu_layers < 32 and plan.cpu_layers == 32 - plan.gpu_layers and plan.disk_layers == 0
    assert plan.predicted_peak_bytes <= 8 * GiB
    # One more layer would not fit beside the streamed-in layer.
    assert plan.predicted_peak_bytes + layer_bytes(shape, Quant.NONE, 2) > 8 * GiB
    assert "offloaded" in plan.message


def test_streamed_offload_keeps_two_slots_and_counts_them_as_weights(catalog):
    shape = catalog.get("internlm2.5-7b-chat").shape
    per_layer = layer_bytes(shape, Quant.NONE, 2)
    one = plan_fit(shape, Quant.NONE, 2, 4096, _budget(8))
    two = plan_fit(shape, Quant.NONE, 2, 4096, _budget(8), stream_slots=2)
    # The second slot costs one resident layer; both slots are weights held for good.
    assert two.gpu_layers == one.gpu_layers - 1 and two.streamed_layers == two.cpu_layers == 32 - two.gpu_layers
    assert two.gpu_weights_bytes == one.gpu_weights_bytes - per_layer + 2 * per_layer
    assert two.predicted_peak_bytes <= 8 * GiB < two.predicted_peak_bytes + per_layer
    assert one.streamed_layers == 0 and "prefetched a layer ahead" in two.message
    # Layers on disk keep accelerate's hooks: nothing is streamed, the slots are not weights.
    short = plan_fit(shape, Quant.NONE, 2, 4096, _budget(4, ram_gib=4), stream_slots=2)
    assert short.disk_layers and short.streamed_layers == 0


def test_offload_spills_to_disk_when_ram_is_short(catalog):
    shape = catalog.get("internlm2.5-7b-chat").shape
    plan = plan_fit(shape, Quant.NONE, 2, 4096, _budget(4, ram_gib=4))
    assert plan.verdict == "offload" and plan.disk_layers > 0
    assert plan.gpu_layers + plan.cpu_layers + plan.disk_layers == 32


def test_wont_fit_when_the_budget_cannot_hold_the_fixed_parts(catalog):
    shape = catalog.get("internlm2.5-7b-chat").shape
    plan = plan_fit(shape, Quant.NF4, 2, 32768, _budget(2))
    assert plan.verdict == "no_fit"
    assert "Won't fit" in plan.message and "GiB" in plan.message


def test_cpu_only_plan_uses_ram_then_disk(catalog):
    shape = catalog.get("internlm2-chat-1.8b").shape
    assert plan_fit(shape, Quant.NONE, 4, 2048, _budget(None, ram_gib=32)).verdict == "cpu"
    plan = plan_fit(shape, Quant.NONE, 4, 2048, _budget(None, ram_gib=4))
    assert plan.verdict == "disk" and plan.disk_layers > 0 and plan.offloaded_layers == plan.disk_layers
    assert plan_fit(shape, Quant.NONE, 4, 2048, _budget(None, ram_gib=1, disk_gib=1)).verdict == "no_fit"


def test_kv_room_is_the_budget_left_by_the_plan(catalog):
    shape = catalog.get("internlm2.5-7b-chat").shape
    plan = plan_fit(shape, Quant.NF4, 2, 4096, _budget(8))
    room = kv_room_bytes(plan)
    # The plan reserved KV for 4096 tokens, so at least that much room is left for caches.
    assert room >= kv_cache_bytes(shape, 4096, 2)
    assert room == plan.budget_bytes - (plan.predicted_peak_bytes - plan.kv_bytes)
