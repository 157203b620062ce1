"""Memory on a CPU-only machine is the model's own (tensors + KV cache), not the process's RSS (issue 12).

Before: the batch CSV's peak_mib was process RSS (~2,310 MiB for fp32 and 4-bit alike), A/B showed
4-bit peaking above fp32 (RSS only grows), and unloading a 513 MiB model reported "freed 0 MiB".
"""

import threading
from pathlib import Path

import pytest
import torch

from compare.prompt_sets import parse_prompt_set
from compare.runner import ConfigSpec, compare, run_batch
from models.engine import Engine
from models.generation import SamplingSettings
from models.loading import LoadSettings
from models.memory import MiB, kv_bytes_per_token
from models.model_memory import model_ram_bytes
from models.quant import Quant
from tiny import write_tiny_llama

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only accounting (a GPU uses the allocator)")

GREEDY = SamplingSettings(max_new_tokens=6, temperature=0.0, seed=0)
ONE_QUESTION = 'name = "One"\nlanguage = "en"\n[[questions]]\ntext = "Hello world"\n'


@pytest.fixture(scope="module")
def wide_tiny(tmp_path_factory) -> Path:
    """A tiny Llama whose linear weights dominate, so 4-bit is visibly smaller than fp32."""
    return write_tiny_llama(tmp_path_factory.mktemp("wide-tiny-mem"), hidden_size=256, intermediate_size=1024)


def answer(engine: Engine) -> object:
    update = None
    for update in engine.chat([{"role": "user", "content": "Hello world"}], GREEDY, threading.Event()):
        pass
    return update.stats


def test_answer_peak_is_the_models_tensors_plus_its_kv_cache(catalog, wide_tiny, tmp_path):
    engine = Engine(catalog, cache_dir=tmp_path)
    engine.load(str(wide_tiny), LoadSettings(context_tokens=256))
    stats = answer(engine)
    loaded = engine.loaded
    # The cache holds every token but the last generated one; fp32 on a CPU.
    kv = kv_bytes_per_token(loaded.shape, 4) * (stats.prompt_tokens + stats.new_tokens - 1)
    assert stats.peak_bytes == loaded.weights_bytes + kv
    assert stats.peak_bytes == model_ram_bytes(loaded.model) + kv
    # RSS is still reported, as the whole process's, and is far larger than this 16 MiB model.
    assert stats.process_rss_bytes > 10 * stats.peak_bytes


def test_batch_peak_of_4bit_is_below_fp32_and_rss_is_its_own_column(catalog, wide_tiny, tmp_path):
    engine = Engine(catalog, cache_dir=tmp_path)
    specs = [ConfigSpec(str(wide_tiny), Quant.NONE), ConfigSpec(str(wide_tiny), Quant.NF4)]
    rows = [e.row for e in run_batch(engine, parse_prompt_set(ONE_QUESTION), specs, GREEDY,
                                     base=LoadSettings(context_tokens=256)) if e.row is not None]
    fp32, nf4 = rows
    assert not fp32.error and not nf4.error
    assert nf4.peak_mib < fp32.peak_mib / 3  # ~2.5 vs ~15.7 MiB
    assert fp32.peak_mib == pytest.approx(fp32.weights_mib, abs=1.0)  # weights + a few KiB of KV
    assert fp32.process_rss_mib > 10 * fp32.peak_mib and nf4.process_rss_mib > 10 * nf4.peak_mib


def test_unloading_on_cpu_reports_the_models_tensors_as_freed(catalog, wide_tiny, tmp_path):
    engine = Engine(catalog, cache_dir=tmp_path)
    weights = engine.load(str(wide_tiny), LoadSettings(context_tokens=256)).loaded.weights_bytes
    answer(engine)  # no session: the answer's cache is not kept
    report = engine.load(str(wide_tiny), LoadSettings(quant=Quant.NF4, context_tokens=256))
    (unloaded,) = report.unloaded
    assert unloaded.freed_bytes == weights > 15 * MiB and unloaded.residual_bytes == 0


def test_a_model_still_referenced_is_reported_as_residual_not_freed(catalog, wide_tiny, tmp_path):
    engine = Engine(catalog, cache_dir=tmp_path)
    held = engine.load(str(wide_tiny), LoadSettings(context_tokens=256)).loaded  # kept alive here
    report = engine.load(str(wide_tiny), LoadSettings(quant=Quant.NF4, context_tokens=256))
    (unloaded,) = report.unloaded
    assert unloaded.freed_bytes == 0 and unloaded.residual_bytes == held.weights_bytes


@pytest.mark.slow
def test_embedded_model_ab_and_switch_report_its_own_memory(catalog, tmp_path):
    """The issue's numbers with the real 135M model: A/B fp32 vs 4-bit, then a switch frees ~513 MiB."""
    engine = Engine(catalog)
    specs = [ConfigSpec("smollm2-135m-instruct", Quant.NONE), ConfigSpec("smollm2-135m-instruct", Quant.NF4)]
    state = None
    for state in compare(engine, specs, [{"role": "user", "content": "What is the capital of France?"}],
                         SamplingSettings(max_new_tokens=8, temperature=0.0, seed=0)):
        pass
    fp32, nf4 = (side.stats for side in state.sides)
    assert nf4.peak_bytes < fp32.peak_bytes * 0.6, (nf4.peak_bytes / MiB, fp32.peak_bytes / MiB)
    assert 500 * MiB < fp32.peak_bytes < 560 * MiB  # 513 MiB of fp32 weights + the answer's KV
    del state
    engine.load("smollm2-135m-instruct", LoadSettings())  # the Chat tab's switch unloads both
    report = engine.load("smollm2-135m-instruct", LoadSettings(quant=Quant.NF4))
    (unloaded,) = report.unloaded
    assert 500 * MiB < unloaded.freed_bytes < 530 * MiB and unloaded.residual_bytes == 0
