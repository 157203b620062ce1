"""GPU-only behaviour (skipped cleanly without CUDA): every quantization on the GPU, the
budget cap, GPU/CPU offload split, and memory really freed on a switch."""

import threading

import pytest
import torch

from models.engine import Engine
from models.generation import SamplingSettings, chat_input_ids
from models.loading import LoadSettings
from models.memory import GiB, MiB, layer_bytes
from models.quant import Quant

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
GREEDY = SamplingSettings(max_new_tokens=20, temperature=0)
PROMPT = [{"role": "user", "content": "Hello world"}]


def answer(engine):
    return list(engine.chat(PROMPT, GREEDY, threading.Event()))[-1]


def plain_greedy(loaded):
    ids = chat_input_ids(loaded.tokenizer, PROMPT)
    with torch.inference_mode():
        out = loaded.model.generate(torch.tensor([ids], device=loaded.input_device), max_new_tokens=20, do_sample=False)
    return out[0, len(ids):].tolist()


@pytest.fixture()
def engine(catalog):
    engine = Engine(catalog)
    yield engine
    engine.unload()
    torch.cuda.set_per_process_memory_fraction(1.0)


@pytest.mark.parametrize("quant", [Quant.NONE, Quant.BF16, Quant.INT8, Quant.NF4])
def test_each_quantization_runs_on_the_gpu_and_streams_like_generate(engine, tiny_llama, quant):
    loaded = engine.load(str(tiny_llama), LoadSettings(quant=quant, context_tokens=256)).loaded
    assert loaded.device == "cuda" and loaded.split["gpu"] == 4
    assert loaded.model.model.layers[0].mlp.gate_proj.weight.device.type == "cuda"
    assert abs(loaded.weights_bytes - loaded.plan.gpu_weights_bytes) <= 64 * 28
    final = answer(engine)
    assert final.token_ids == plain_greedy(loaded)
    assert final.stats.peak_bytes > 0


def test_switching_returns_memory_to_the_level_before_the_load(engine, tiny_llama):
    torch.cuda.empty_cache()
    idle = torch.cuda.memory_allocated()
    engine.load(str(tiny_llama), LoadSettings(quant=Quant.NONE))
    answer(engine)
    report = engine.load(str(tiny_llama), LoadSettings(quant=Quant.NF4))
    [unloaded] = report.unloaded
    # Allowed: at most a few MiB that CUDA libraries keep per handle (reported to the user as residual).
    assert unloaded.freed_bytes > 0 and unloaded.residual_bytes <= 8 * MiB, unloaded
    engine.unload()
    assert torch.cuda.memory_allocated() - idle <= 8 * MiB, (torch.cuda.memory_allocated(), idle)


def test_budget_caps_torch_allocator(engine, tiny_llama):
    runtime = engine.cuda_runtime_bytes()
    # 1 GiB over the CUDA context: room for the tiny model and its fixed overheads, not for 2 GiB more.
    engine.load(str(tiny_llama), LoadSettings(gpu_budget_bytes=runtime + GiB))
    with pytest.raises(torch.OutOfMemoryError):
        torch.empty(2 * GiB, dtype=torch.uint8, device="cuda")


def test_offload_split_under_a_small_budget_gives_the_same_answer(engine, tmp_path):
    from tiny import write_tiny_llama

    folder = write_tiny_llama(tmp_path / "wide", hidden_size=512, intermediate_size=2048, num_hidden_layers=6)
    full = engine.load(str(folder), LoadSettings(context_tokens=256)).loaded
    expected = answer(engine).token_ids
    per_layer = layer_bytes(full.shape, Quant.NONE, 2)
    budget = full.plan.predicted_peak_bytes - 3 * per_layer
    # The explicit fallback: accelerate's copy-on-call hooks (--accelerate-offload).
    loaded = engine.load(str(folder), LoadSettings(context_tokens=256, gpu_budget_bytes=budget,
                                                   stream_offload=False)).loaded
    assert 0 < loaded.split["gpu"] < 6 and loaded.split["cpu"] == 6 - loaded.split["gpu"]
    assert answer(engine).token_ids == expected
    assert loaded.streamer is None
    # The default: fp16 layers in CPU RAM go through models/offload.py: page-locked, prefetched on a
    # copy stream, with one resident layer fewer for the second staging slot.
    streamed = engine.load(str(folder), LoadSettings(context_tokens=256, gpu_budget_bytes=budget)).loaded
    streamer = streamed.streamer
    assert streamer is not None and streamer.page_locked and streamer.copy_stream is not None
    assert streamed.plan.streamed_layers == streamed.split["cpu"] == len(streamer.layers) > loaded.split["cpu"]
    # The streamed layers come first, and no accelerate hook is left to cost host time per call.
    assert streamer.layers == list(streamed.model.model.layers)[:len(streamer.layers)]
    assert not [name for name, module in streamed.model.named_modules() if hasattr(module, "_hf_hook")]
    assert answer(engine).token_ids == expected
    assert streamer.copies >= streamed.split["cpu"]
    # The bench's probe of the streamer's own copy rate overwrites slot 0 between answers: the next
    # answer must refill it, not compute from another layer's weights.
    assert streamer.copy_rate(reps=1) > 0
    assert answer(engine).token_ids == expected
    assert abs(streamed.weights_bytes - streamed.plan.gpu_weights_bytes) <= 64 * 28 + 2 * 256 * 9


def test_unloading_a_streamed_model_gives_back_device_and_page_locked_memory(engine, tmp_path):
    import gc

    from tiny import write_tiny_llama

    folder = write_tiny_llama(tmp_path / "wide", hidden_size=512, intermediate_size=2048, num_hidden_layers=6)
    full = engine.load(str(folder), LoadSettings(context_tokens=256)).loaded
    budget = full.plan.predicted_peak_bytes - 3 * layer_bytes(full.shape, Quant.NONE, 2)
    engine.unload()
    torch.cuda.empty_cache()
    idle = torch.cuda.memory_allocated()
    loaded = engine.load(str(folder), LoadSettings(context_tokens=256, gpu_budget_bytes=budget,
                                                   stream_offload=True)).loaded
    finalizer = loaded.streamer._finalizer
    answer(engine)
    del loaded
    engine.unload()
    gc.collect()
    assert not finalizer.alive  # host buffers unregistered and freed
    assert torch.cuda.memory_allocated() - idle <= 8 * MiB


def test_memory_snapshot_accounts_for_the_whole_process(engine, tiny_llama):
    engine.load(str(tiny_llama), LoadSettings())
    snap = engine.memory()
    free, total = torch.cuda.mem_get_info()
    assert snap.total == total
    assert abs(snap.app_total + snap.other_processes + snap.free - total) < 64 * MiB
    assert snap.weights == engine.loaded.weights_bytes and snap.runtime > 100 * MiB
    assert snap.total > GiB
