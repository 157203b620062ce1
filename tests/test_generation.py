"""Streaming generation: equals plain greedy generate, Stop halts the computation, metrics are sane,
and the engine serializes concurrent chats without mixing them up."""

import threading
import time

import pytest
import torch

from models.engine import Engine
from models.generation import SamplingSettings, chat_input_ids, stream_generate
from models.loading import LoadSettings, ModelLoadError


@pytest.fixture(scope="module")
def engine(catalog, tiny_llama):
    engine = Engine(catalog)
    engine.load(str(tiny_llama), LoadSettings(context_tokens=512))
    return engine


def collect(iterator):
    updates = list(iterator)
    assert updates and updates[-1].done
    return updates


def test_streamed_text_equals_non_streaming_greedy_generate(engine):
    loaded = engine.loaded
    messages = [{"role": "user", "content": "The capital of France"}]
    ids = chat_input_ids(loaded.tokenizer, messages)
    with torch.inference_mode():
        plain = loaded.model.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False)
    expected_ids = plain[0, len(ids):].tolist()
    expected = loaded.tokenizer.decode(expected_ids, skip_special_tokens=True)

    updates = collect(engine.chat(messages, SamplingSettings(max_new_tokens=40, temperature=0), threading.Event()))
    assert updates[-1].text == expected
    assert updates[-1].token_ids == expected_ids
    # It really streamed: several partial updates, each a prefix of the next.
    texts = [u.text for u in updates]
    assert len(texts) >= 3
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))


def test_metrics_are_positive_and_plausible(engine):
    updates = collect(engine.chat([{"role": "user", "content": "Hello"}],
                                  SamplingSettings(max_new_tokens=30, temperature=0), threading.Event()))
    stats = updates[-1].stats
    assert stats.prompt_tokens > 3
    assert 0 < stats.new_tokens <= 30
    assert 0 < stats.ttft_s < stats.total_s < 60
    if stats.new_tokens > 1:
        assert 1 < stats.decode_tokens_per_s < 100_000
    assert stats.finish_reason in ("eos", "length")
    assert stats.peak_bytes > 0
    assert "TTFT" in stats.summary() and "tokens" in stats.summary()


def test_stop_ends_generation_within_a_couple_of_tokens(engine):
    stop = threading.Event()
    seen = 0
    tokens_when_stopped = None
    final = None
    for update in engine.chat([{"role": "user", "content": "Hello world"}],
                              SamplingSettings(max_new_tokens=400, temperature=1.0, seed=1), stop):
        seen += 1
        if seen == 3:
            tokens_when_stopped = update.stats.new_tokens
            stop.set()
        final = update
    assert final.done and final.stats.finish_reason == "stopped"
    assert final.stats.new_tokens <= tokens_when_stopped + 3 < 400


def test_closing_the_stream_stops_the_worker_and_frees_the_engine(engine):
    stream = engine.chat([{"role": "user", "content": "Hello"}],
                         SamplingSettings(max_new_tokens=400, temperature=1.0, seed=2), threading.Event())
    next(stream)
    stream.close()  # the browser went away
    # The engine lock is free again: a new answer starts at once.
    started = time.perf_counter()
    collect(engine.chat([{"role": "user", "content": "Hi"}], SamplingSettings(max_new_tokens=2, temperature=0),
                        threading.Event()))
    assert time.perf_counter() - started < 10


def test_sampling_with_a_seed_is_reproducible(engine):
    settings = SamplingSettings(max_new_tokens=20, temperature=1.0, top_p=0.9, seed=123)
    a = collect(engine.chat([{"role": "user", "content": "Hello"}], settings, threading.Event()))[-1].text
    b = collect(engine.chat([{"role": "user", "content": "Hello"}], settings, threading.Event()))[-1].text
    assert a == b


def test_concurrent_chats_are_serialized_and_not_mixed(engine):
    prompts = ["Hello world", "The capital of France", "Small models run", "你好"]
    greedy = SamplingSettings(max_new_tokens=15, temperature=0)
    expected = {p: collect(engine.chat([{"role": "user", "content": p}], greedy, threading.Event()))[-1].text
                for p in prompts}
    results = {}

    def run(prompt):
        results[prompt] = collect(engine.chat([{"role": "user", "content": prompt}], greedy, threading.Event()))[-1].text

    threads = [threading.Thread(target=run, args=(p,)) for p in prompts * 2]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert results == expected


def test_out_of_memory_mid_answer_is_reported_and_the_engine_recovers(engine, monkeypatch):
    model = engine.loaded.model

    def explode(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(model, "generate", explode)
    with pytest.raises(ModelLoadError, match="Out of GPU memory"):
        collect(engine.chat([{"role": "user", "content": "Hi"}], SamplingSettings(max_new_tokens=5), threading.Event()))
    monkeypatch.undo()
    assert collect(engine.chat([{"role": "user", "content": "Hi"}], SamplingSettings(max_new_tokens=3, temperature=0),
                               threading.Event()))[-1].done


def test_chat_without_a_loaded_model_says_so(catalog):
    with pytest.raises(ModelLoadError, match="No model is loaded"):
        list(Engine(catalog).chat([{"role": "user", "content": "Hi"}], SamplingSettings(), threading.Event()))


def test_stream_generate_without_engine_stops_on_preset_event(engine):
    loaded = engine.loaded
    ids = chat_input_ids(loaded.tokenizer, [{"role": "user", "content": "Hello"}])
    stop = threading.Event()
    stop.set()
    final = list(stream_generate(loaded.model, loaded.tokenizer, ids, SamplingSettings(max_new_tokens=100), stop))[-1]
    assert final.stats.new_tokens <= 1 and final.stats.finish_reason in ("stopped", "eos")
