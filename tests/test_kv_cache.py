"""KV-cache management: prefix reuse across turns equals recompute, overflow handling that says
what it dropped, LRU eviction and rebuild, isolated concurrent sessions, and OOM recovery."""

from __future__ import annotations

import threading

import pytest
import torch

from models.engine import Engine
from models.generation import SamplingSettings
from models.kv_cache import (
    ContextOverflowError, KVPrecision, OverflowPolicy, SessionCache, SessionCacheStore, cache_length, common_prefix_length,
    fit_messages, new_cache,
)
from models.loading import LoadSettings, ModelLoadError

GREEDY = SamplingSettings(max_new_tokens=12, temperature=0.0)


@pytest.fixture()
def engine(catalog, tiny_llama):
    engine = Engine(catalog)
    engine.load(str(tiny_llama), LoadSettings(context_tokens=512))
    return engine


def answer(engine: Engine, messages, session=None, **kwargs):
    """The final update of a chat (the engine's lock is released when it returns)."""
    updates = list(engine.chat(messages, kwargs.pop("sampling", GREEDY), threading.Event(), session=session, **kwargs))
    return updates[-1]


def fresh(engine: Engine, messages, **kwargs) -> str:
    """The answer with no cache to reuse: the whole prompt prefilled."""
    update = answer(engine, messages, session=None, **kwargs)
    assert update.stats.reused_tokens == 0
    return update.text


def turn(history, question, text):
    return history + [{"role": "user", "content": question}, {"role": "assistant", "content": text}]


# ----- pure parts ---------------------------------------------------------------------
def test_common_prefix_length():
    assert common_prefix_length([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix_length([], [1]) == 0
    assert common_prefix_length([1, 2], [1, 2, 3]) == 2


def filled_cache(model_folder, tokens: int):
    """A full-precision cache of the tiny model holding `tokens` positions (zeros)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_folder)
    cache = new_cache(config, KVPrecision.FULL)
    k = torch.zeros(1, config.num_key_value_heads, tokens, config.hidden_size // config.num_attention_heads)
    for layer in range(config.num_hidden_layers):
        cache.update(k, k, layer)
    return cache


def test_session_cache_crops_to_the_common_prefix(tiny_llama):
    cache = filled_cache(tiny_llama, 10)
    entry = SessionCache("m", KVPrecision.FULL, cache, token_ids=list(range(10)))
    assert entry.reuse_for(list(range(6)) + [99, 98]) == 6
    assert cache.get_seq_length() == 6 and entry.token_ids == list(range(6))
    # The same prompt again (regenerate): everything but the last token is reused.
    assert entry.reuse_for(list(range(6))) == 5
    assert entry.reuse_for([7, 7, 7]) == 0  # nothing shared


def test_cropping_an_fp8_cache_leaves_the_state_of_a_shorter_run(tiny_llama):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_llama)
    shape = (1, config.num_key_value_heads, 16, config.hidden_size // config.num_attention_heads)
    states = torch.randn(shape, generator=torch.Generator().manual_seed(0))

    def fp8_cache(chunks):
        cache = new_cache(config, KVPrecision.FP8)
        for a, b in chunks:
            for layer in range(config.num_hidden_layers):
                cache.update(states[..., a:b, :], states[..., a:b, :], layer)
        return cache

    cropped = fp8_cache([(0, 10), (10, 14)])
    SessionCache("m", KVPrecision.FP8, cropped, token_ids=list(range(14))).reuse_for(list(range(10)) + [99])
    shorter = fp8_cache([(0, 10)])
    assert cache_length(cropped) == 10
    for a, b in zip(cropped.layers, shorter.layers):
        assert torch.equal(a._quantized_keys[0].float(), b._quantized_keys[0].float())
        assert torch.equal(a._quantized_keys[1], b._quantized_keys[1])  # the scale
    # Both go on identically from there.
    new_token = states[..., 14:15, :]
    assert torch.equal(cropped.update(new_token, new_token, 0)[0], shorter.update(new_token, new_token, 0)[0])


def test_reuse_crops_a_cache_that_holds_more_than_its_token_list(tiny_llama):
    # A stopped answer can leave the cache a token or more ahead of the ids it lists.
    cache = filled_cache(tiny_llama, 12)
    entry = SessionCache("m", KVPrecision.FULL, cache, token_ids=list(range(10)))
    assert entry.reuse_for(list(range(8)) + [99]) == 8
    assert cache.get_seq_length() == 8


def test_store_evicts_least_recently_used_first():
    store = SessionCacheStore()
    for name in "abc":
        store.put(name, SessionCache("m", KVPrecision.FULL, None))
    store.get("a", "m", KVPrecision.FULL)  # a is now the most recent
    sizes = {"a": 10, "b": 10, "c": 10}
    for name, entry in store._entries.items():
        entry.cache = _FakeCache(sizes[name])
    assert store.evict_until(15, keep="c") == ["b", "a"]
    assert store.sessions() == ["c"]
    # A cache built with another model or precision is never handed out.
    assert store.get("c", "other-model", KVPrecision.FULL) is None and len(store) == 0


class _FakeCache:
    def __init__(self, n: int):
        self.layers = [type("L", (), {"keys": torch.zeros(n, dtype=torch.uint8), "values": None})()]


def test_fit_messages_keeps_the_system_prompt_and_the_last_question():
    messages = [{"role": "system", "content": "S"}] + [
        {"role": r, "content": f"{r}{i}"} for i in range(4) for r in ("user", "assistant")
    ] + [{"role": "user", "content": "last"}]

    def count(msgs):
        return sum(len(m["content"]) for m in msgs)

    kept, dropped = fit_messages(messages, count, 20)
    assert kept[0]["role"] == "system" and kept[-1]["content"] == "last"
    assert count(kept) <= 20 and dropped == messages[1:1 + len(dropped)]
    assert len(dropped) % 2 == 0  # whole turns: a question with its answer
    with pytest.raises(ContextOverflowError, match="choose 'drop oldest turns'"):
        fit_messages(messages, count, 20, OverflowPolicy.REFUSE)
    with pytest.raises(ContextOverflowError, match="alone needs"):
        fit_messages(messages, count, 3)


# ----- reuse equals recompute ---------------------------------------------------------
def test_reuse_across_turns_regenerate_and_undo_equals_recompute(engine):
    history: list[dict] = []
    questions = ["Hello world", "how are you today?", "The capital of France is", "small models"]
    for i, question in enumerate(questions):
        messages = history + [{"role": "user", "content": question}]
        update = answer(engine, messages, session="s")
        assert update.text == fresh(engine, messages), f"turn {i}"
        if i:
            # Only the new turn was prefilled: the earlier ones came from the cache.
            assert update.stats.reused_tokens >= len(engine.loaded.tokenizer.apply_chat_template(history)) - 4
        history = turn(history, question, update.text)

    # Regenerate: the same prompt again reuses all of it but the last token.
    messages = history[:-1]
    again = answer(engine, messages, session="s")
    assert again.stats.reused_tokens == again.stats.prompt_tokens - 1
    assert again.text == history[-1]["content"]

    # Undo two turns, then a different question: the cache is cropped, not discarded.
    shorter = history[:4] + [{"role": "user", "content": "Paris?"}]
    update = answer(engine, shorter, session="s")
    assert 0 < update.stats.reused_tokens < update.stats.prompt_tokens
    assert update.text == fresh(engine, shorter)


def test_sampling_with_a_seed_is_the_same_with_and_without_reuse(engine):
    sampling = SamplingSettings(max_new_tokens=10, temperature=0.9, top_p=0.9, seed=7)
    first = [{"role": "user", "content": "Hello world"}]
    one = answer(engine, first, session="t", sampling=sampling)
    second = turn([], "Hello world", one.text) + [{"role": "user", "content": "and then?"}]
    reused = answer(engine, second, session="t", sampling=sampling)
    assert reused.stats.reused_tokens > 0
    assert reused.text == answer(engine, second, sampling=sampling).text


def test_fp8_cache_answers_and_holds_less(engine):
    messages = [{"role": "user", "content": "Hello world, how are you today?"}]
    answer(engine, messages, session="full")
    full_bytes = engine.kv_cache_bytes()
    update = answer(engine, messages, session="fp8", kv=KVPrecision.FP8)
    assert update.stats.new_tokens > 0
    assert 0 < engine.kv_cache_bytes() - full_bytes < full_bytes
    # A session that switches precision starts a new cache instead of mixing them.
    assert answer(engine, messages, session="fp8").stats.reused_tokens == 0


def test_fp8_cache_is_cropped_on_regenerate_and_undo_not_rebuilt(engine):
    messages = [{"role": "user", "content": "Hello world, how are you today?"}]
    answer(engine, messages, session="s", kv=KVPrecision.FP8)
    bytes_after_first = engine.kv_cache_bytes()
    # Regenerate: the same prompt again reuses all but its last token. (Its answer may differ from
    # the first: the first prefill attends to unquantized keys, later tokens to fp8 ones.)
    again = answer(engine, messages, session="s", kv=KVPrecision.FP8)
    assert again.stats.reused_tokens == again.stats.prompt_tokens - 1 and again.text
    assert engine.kv_cache_bytes() == bytes_after_first  # same length of cache: cropped, then grown again
    # Undo + a different question: the shared template prefix is kept, the rest is prefilled.
    other = answer(engine, [{"role": "user", "content": "Hello there"}], session="s", kv=KVPrecision.FP8)
    assert 0 < other.stats.reused_tokens < other.stats.prompt_tokens


# ----- overflow -----------------------------------------------------------------------
def test_overflow_drops_oldest_turns_keeps_system_prompt_and_says_so(catalog, tiny_llama):
    engine = Engine(catalog)
    engine.load(str(tiny_llama), LoadSettings(context_tokens=160))
    history = [{"role": "system", "content": "You are terse."}]
    for i in range(6):
        history = turn(history, f"Question {i}: Hello world, how are you today?", "Fine, thanks. " * 3)
    messages = history + [{"role": "user", "content": "last question"}]
    update = answer(engine, messages, session="o")
    assert update.stats.dropped_messages >= 2
    assert update.stats.prompt_tokens + update.stats.new_tokens <= 160
    kept = [messages[0]] + messages[1 + update.stats.dropped_messages:]
    assert update.text == fresh(engine, kept)  # exactly the system prompt + the newest turns

    with pytest.raises(ContextOverflowError):
        answer(engine, messages, session="o", policy=OverflowPolicy.REFUSE)
    # Refusing leaves the engine usable.
    assert answer(engine, [{"role": "user", "content": "hi"}]).stats.new_tokens > 0


def test_handler_shows_what_was_dropped(catalog, tiny_llama):
    from ui.handlers import ChatHandlers, ChatSession

    engine = Engine(catalog)
    engine.load(str(tiny_llama), LoadSettings(context_tokens=160))
    handlers = ChatHandlers(engine)
    history = []
    for i in range(6):
        history = turn(history, f"Question {i}: Hello world, how are you today?", "Fine, thanks. " * 3)
    history.append({"role": "user", "content": "last question"})
    final = list(handlers.answer(history, "", 0.0, 1.0, 12, ChatSession(), "en"))[-1]
    notes = [m["metadata"]["title"] for m in final if m.get("metadata")]
    assert any(n.startswith("✂️") and "user: Question 0" in n for n in notes), notes
    # Nothing the user wrote is removed from the chat itself.
    assert sum(1 for m in final if m["role"] == "user") == 7


# ----- many sessions ------------------------------------------------------------------
def test_idle_sessions_are_evicted_and_rebuilt_with_the_same_answer(catalog, tiny_llama):
    probe = Engine(catalog)
    probe.load(str(tiny_llama), LoadSettings(context_tokens=512))
    a1 = [{"role": "user", "content": "Hello world"}]
    answer(probe, a1, session="x")
    one_session = probe.kv_cache_bytes()

    engine = Engine(catalog, kv_budget_bytes=int(one_session * 1.5))
    engine.load(str(tiny_llama), LoadSettings(context_tokens=512))
    first = answer(engine, a1, session="a")
    answer(engine, [{"role": "user", "content": "how are you today?"}], session="b")
    assert engine.session_count() == 1  # a was evicted to make room for b
    assert engine.kv_cache_bytes() <= int(one_session * 1.5)
    a2 = turn([], "Hello world", first.text) + [{"role": "user", "content": "more"}]
    rebuilt = answer(engine, a2, session="a")
    assert rebuilt.stats.reused_tokens == 0  # rebuilt transparently
    assert rebuilt.text == fresh(engine, a2)


def test_concurrent_sessions_do_not_share_or_corrupt_caches(engine):
    chats = {
        f"s{i}": [{"role": "user", "content": q}] for i, q in enumerate(
            ["Hello world", "The capital of France is", "small models", "你好，世界"])
    }
    expected = {s: fresh(engine, m) for s, m in chats.items()}
    results: dict[str, list[str]] = {s: [] for s in chats}
    errors = []

    def user(session: str) -> None:
        try:
            messages = chats[session]
            for _ in range(3):  # the same session's turns, interleaved with the others'
                results[session].append(answer(engine, messages, session=session).text)
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=user, args=(s,)) for s in chats]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert not errors
    for session, texts in results.items():
        assert texts == [expected[session]] * 3, session


def test_closing_a_tab_frees_its_cache(engine):
    from types import SimpleNamespace

    from ui.handlers import ChatHandlers, ChatSession

    tab = ChatSession()
    request = SimpleNamespace(session_hash="tab-1")  # what Gradio hands the unload event
    tab.bind(request)
    answer(engine, [{"role": "user", "content": "Hello world"}], session=tab.id)
    assert engine.session_count() == 1 and engine.kv_cache_bytes() > 0
    ChatHandlers(engine).tab_closed(request)
    assert engine.session_count() == 0 and engine.kv_cache_bytes() == 0


def test_a_tab_closed_during_another_answer_is_freed_when_that_answer_ends(engine):
    answer(engine, [{"role": "user", "content": "Hello world"}], session="closed-tab")
    stream = engine.chat([{"role": "user", "content": "Tell me more"}], SamplingSettings(max_new_tokens=200, temperature=0),
                         threading.Event(), session="busy-tab")
    next(stream)  # an answer is running: the GPU lock is held
    returned = threading.Event()
    threading.Thread(target=lambda: (engine.drop_session("closed-tab"), returned.set()), daemon=True).start()
    assert returned.wait(5), "drop_session waited for the running answer"
    assert "closed-tab" in engine._sessions.sessions()  # queued, not done under a running answer
    stream.close()
    assert engine._sessions.sessions() == ["busy-tab"]


# ----- out of memory ------------------------------------------------------------------
@pytest.mark.parametrize("when", ["prefill", "decode"])
def test_injected_oom_is_recovered(engine, monkeypatch, when):
    model = engine.loaded.model
    messages = [{"role": "user", "content": "Hello world"}]
    answer(engine, messages, session="s")
    real_forward = model.forward
    calls = {"n": 0}

    def failing_forward(*args, **kwargs):
        calls["n"] += 1
        if when == "prefill" or calls["n"] > 3:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", failing_forward)
    longer = turn([], "Hello world", "x") + [{"role": "user", "content": "again"}]
    with pytest.raises(ModelLoadError, match="Out of GPU memory.*chat is kept"):
        answer(engine, longer, session="s")
    assert engine.session_count() == 0  # the cache of the failed answer is gone
    monkeypatch.setattr(model, "forward", real_forward)
    # The app is alive: the lock is free and the next answer is the same as ever.
    assert answer(engine, longer, session="s").text == fresh(engine, longer)


def test_engine_answers_through_a_fast_decoder_with_prefix_reuse(engine):
    from models.fast_decode import FastDecoder

    first = [{"role": "user", "content": "Hello world"}]
    plain = fresh(engine, first)
    second = turn([], "Hello world", plain) + [{"role": "user", "content": "how are you today?"}]
    plain_second = fresh(engine, second)
    engine.loaded.fast = FastDecoder(engine.loaded.model, max_context=256)  # what a 4bit-fast load attaches
    assert engine.context_limit() == 256
    assert engine.kv_cache_bytes() >= engine.loaded.fast.cache_bytes > 0  # the static cache is on the panel
    assert answer(engine, first, session="f").text == plain
    update = answer(engine, second, session="f")
    assert update.text == plain_second and update.stats.reused_tokens > 0


def test_the_context_room_comes_from_the_kv_budget_and_the_panel_says_what_memory_holds(catalog, tiny_llama):
    from models.memory import kv_bytes_per_token
    from ui.handlers import ChatHandlers

    probe = Engine(catalog)
    probe.load(str(tiny_llama), LoadSettings(context_tokens=512))
    per_token = kv_bytes_per_token(probe.loaded.shape, 4)  # fp32 cache on a CPU
    for tokens, context, limit in [(300, 512, 300), (2000, 256, 256)]:
        engine = Engine(catalog, kv_budget_bytes=tokens * per_token)
        engine.load(str(tiny_llama), LoadSettings(context_tokens=context))
        assert engine.memory_context_tokens() == min(tokens, engine.loaded.shape.max_context)
        assert engine.context_limit() == limit
        panel = ChatHandlers(engine).memory_html("en")
        assert f"Room for {limit:,} tokens" in panel
        # Memory, not the setting, is the bound in the first case; in the second the setting is, and
        # the panel says what memory would hold (the model's maximum, 512).
        assert ("the memory left would hold 512" in panel) == (tokens > context)
    assert probe.memory_context_tokens() is None  # a CPU machine plans RAM at load; no KV budget


def test_the_panel_counts_the_cache_of_an_answer_while_it_streams(engine):
    from ui.handlers import ChatHandlers

    handlers = ChatHandlers(engine)
    idle = engine.kv_cache_bytes()
    stream = engine.chat([{"role": "user", "content": "Hello world"}], SamplingSettings(max_new_tokens=40, temperature=0),
                         threading.Event(), session="live")
    seen = []
    for update in stream:
        if not update.done and update.stats.new_tokens >= 2:
            seen.append(engine.kv_cache_bytes())  # read from another thread than the one computing
            panel = handlers.memory_html("en")  # what the UI's 1-second timer shows meanwhile
            assert "class='mem-seg' data-seg='seg_kv'" in panel  # a KV slice in the bar, not only a legend row
    assert seen and max(seen) > idle  # the growing cache of the answer in progress is on the panel
