"""Issue 12 (per-user model choice): each session answers with its own model and quantization, loaded
in its own turn and said only in its own chat; residents are kept while they fit and the least recently
used is unloaded otherwise; every answer names the model that wrote it; every tab sees what is in memory."""

from __future__ import annotations

import threading

import pytest

from models import local_answer
from models.engine import Engine
from models.facade import ModelSpec, Quant, SamplingSettings
from models.loading import LoadSettings
from tiny import write_tiny_llama

GREEDY = SamplingSettings(max_new_tokens=4, temperature=0.0)
HELLO = [{"role": "user", "content": "Hello world"}]


@pytest.fixture(scope="module")
def wide_tiny(tmp_path_factory):
    """A tiny Llama whose weights outweigh its KV cache and workspace, so weight budgets mean something."""
    return write_tiny_llama(tmp_path_factory.mktemp("wide-tiny"), hidden_size=256, intermediate_size=1024)


@pytest.fixture()
def answered_by(monkeypatch):
    """The dtype of the model object each answer was generated with, in order (a spy on the generation step)."""
    seen = []
    real = local_answer.stream_generate

    def spy(model, *args, **kwargs):
        seen.append(model.dtype)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(local_answer, "stream_generate", spy)
    return seen


def ask(engine: Engine, spec: ModelSpec | None, session: str | None = None, model=None):
    """(notices, final update) of one answer."""
    notices, final = [], None
    for update in engine.chat(HELLO, GREEDY, threading.Event(), session=session, spec=spec, model=model):
        if update.notice is not None:
            notices.append(update.notice)
        final = update
    return notices, final


def test_two_sessions_alternating_each_get_their_own_model(catalog, tiny_llama, answered_by):
    engine = Engine(catalog)
    fp32 = ModelSpec(str(tiny_llama), LoadSettings(context_tokens=256))
    bf16 = ModelSpec(str(tiny_llama), LoadSettings(quant=Quant.BF16, context_tokens=256))
    labels = []
    for round_ in range(2):
        for session, spec in (("tab-a", fp32), ("tab-b", bf16)):
            notices, final = ask(engine, spec, session)
            labels.append(final.stats.model)
            # Loaded in that session's own turn the first time (and said there), resident after.
            assert [n.code for n in notices] == (["loading_for_you", "loaded_for_you"] if round_ == 0 else [])
            assert final.done and final.stats.new_tokens > 0
    assert labels == [f"{tiny_llama} (none)", f"{tiny_llama} (bf16)"] * 2
    import torch
    assert answered_by == [torch.float32, torch.bfloat16] * 2  # the model that really answered
    # Both stay resident (they fit), and a session's next turn reuses its own KV cache.
    assert sorted(m.settings.quant.value for m in engine.residents()) == ["bf16", "none"]
    _, again = ask(engine, fp32, "tab-a")
    assert again.stats.reused_tokens > 0 and again.stats.model.endswith("(none)")


def test_the_load_notice_is_in_english_and_chinese(catalog, tiny_llama):
    engine = Engine(catalog)
    notices, _ = ask(engine, ModelSpec(str(tiny_llama), LoadSettings(context_tokens=256)))
    loading, loaded = notices
    assert loading.render("en") == f"Loading {tiny_llama} (none) for you…"
    assert loaded.render("en").startswith(f"Loaded {tiny_llama} (none) for you, ") and loaded.render("en").endswith(" s")
    assert loaded.render("zh").startswith(f"已为您加载 {tiny_llama} (none)，用时 ")


def test_least_recently_used_is_unloaded_under_a_small_budget(catalog, wide_tiny, tmp_path):
    other = write_tiny_llama(tmp_path / "other", seed=1, hidden_size=256, intermediate_size=1024)
    small = LoadSettings(context_tokens=256)
    a = ModelSpec(str(wide_tiny), small)
    b = ModelSpec(str(wide_tiny), LoadSettings(quant=Quant.BF16, context_tokens=256))
    c = ModelSpec(str(other), LoadSettings(quant=Quant.BF16, context_tokens=256))
    probe = Engine(catalog)
    plan_a, plan_b = probe.plan(a.choice, a.settings)[1], probe.plan(b.choice, b.settings)[1]
    # Room for A and B together, but not for a third model of B's size next to both.
    budget = plan_a.weights_bytes + plan_b.predicted_peak_bytes + plan_b.weights_bytes // 2
    engine = Engine(catalog, ram_budget_bytes=budget)
    ask(engine, a)
    ask(engine, b)
    assert [m.settings.quant for m in engine.residents()] == [Quant.NONE, Quant.BF16]
    ask(engine, a)  # A is now the most recently used: B is the one to go
    notices, final = ask(engine, c)
    assert notices[-1].code == "loaded_for_you_unloaded" and notices[-1].params["unloaded"] == f"{wide_tiny} (bf16)"
    assert [m.ref.location for m in engine.residents()] == [str(wide_tiny), str(other)]
    assert final.stats.model == f"{other} (bf16)"
    assert sum(m.weights_bytes for m in engine.residents()) <= budget
    # B comes back in its session's next turn, unloading the least recently used (A) for it.
    notices, _ = ask(engine, b)
    assert notices[-1].params["unloaded"] == f"{wide_tiny} (none)"


def test_a_pinned_comparison_answer_never_loads_and_says_when_its_model_is_gone(catalog, tiny_llama):
    engine = Engine(catalog)
    spec = ModelSpec(str(tiny_llama), LoadSettings(context_tokens=256))
    key = engine.ensure(spec.choice, spec.settings).loaded.key
    notices, final = ask(engine, None, model=key)
    assert notices == [] and final.stats.model == f"{tiny_llama} (none)"
    engine.unload()
    from models.facade import ModelEvictedError

    with pytest.raises(ModelEvictedError):
        ask(engine, None, model=key)


def test_the_shared_status_lists_residents_newest_first_and_who_is_loading(catalog, tiny_llama, monkeypatch):
    engine = Engine(catalog)
    assert engine.residents_status() == []
    ask(engine, ModelSpec(str(tiny_llama), LoadSettings(context_tokens=256)))
    seen_while_loading = []
    from models import residency

    real = residency.prepare_load

    def watching(*args, **kwargs):
        seen_while_loading.append(engine.residents_status())
        return real(*args, **kwargs)

    monkeypatch.setattr(residency, "prepare_load", watching)
    ask(engine, ModelSpec(str(tiny_llama), LoadSettings(quant=Quant.BF16, context_tokens=256)))
    during = seen_while_loading[0]
    assert [(r.label, r.loading) for r in during] == [(f"{tiny_llama} (none)", False), (f"{tiny_llama} (bf16)", True)]
    after = engine.residents_status()
    assert [r.label for r in after] == [f"{tiny_llama} (bf16)", f"{tiny_llama} (none)"]
    assert all(r.where == "cpu" and not r.loading for r in after)


def test_a_session_loading_its_model_in_its_turn_tells_those_waiting_behind_it(catalog, tiny_llama, monkeypatch):
    # The fair queue and per-session models together: tab A's model loads in A's own turn (its ticket holds
    # the GPU); tab B, queued behind it, is told another user's model is loading and how far, then answers
    # with its own model, its wait in its stats.
    import time

    engine = Engine(catalog)
    engine.load(str(tiny_llama), LoadSettings(context_tokens=256))  # the app's default: B's model
    real = engine._load_locked

    def slow_load(prepared, key, progress):
        progress(0.5, "halfway")
        time.sleep(1.5)
        return real(prepared, key, progress)

    monkeypatch.setattr(engine, "_load_locked", slow_load)
    a_updates, b_updates = [], []
    bf16 = ModelSpec(str(tiny_llama), LoadSettings(quant=Quant.BF16, context_tokens=256))
    a = threading.Thread(target=lambda: a_updates.extend(engine.chat(HELLO, GREEDY, threading.Event(), session="a",
                                                                     spec=bf16)))
    a.start()
    deadline = time.monotonic() + 30
    while engine._loading is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine._loading == f"{tiny_llama} (bf16)"
    b_updates.extend(engine.chat(HELLO, GREEDY, threading.Event(), session="b"))
    a.join(30)
    waiting = [u.waiting for u in b_updates if u.waiting is not None]
    assert waiting, "B waited behind A's load"
    assert waiting[0].busy.work.kind == "load" and waiting[0].busy.progress == 0.5
    said = waiting[0].message().render("en")
    assert f"another user's model is loading: {tiny_llama} bf16, 50 %" in said, said
    assert [u.notice.code for u in a_updates if u.notice is not None] == ["loading_for_you", "loaded_for_you"]
    assert not any(u.waiting is not None for u in a_updates) and a_updates[-1].stats.waited_s < 1
    assert a_updates[-1].stats.model == f"{tiny_llama} (bf16)" and a_updates[-1].stats.new_tokens > 0
    b_final = b_updates[-1]
    assert b_final.done and b_final.stats.model == f"{tiny_llama} (none)" and b_final.stats.new_tokens > 0
    assert b_final.stats.waited_s >= 1.0 and b_final.stats.ttft_s >= b_final.stats.waited_s
    assert not engine._lock.locked()


def test_without_a_choice_a_session_gets_the_apps_default_model(catalog, tiny_llama):
    from models.facade import UserFacingError

    engine = Engine(catalog)
    with pytest.raises(UserFacingError) as e:
        ask(engine, None)
    assert e.value.code == "no_model"
    engine.load(str(tiny_llama), LoadSettings(quant=Quant.BF16, context_tokens=256))
    notices, final = ask(engine, None)
    assert notices == [] and final.stats.model == f"{tiny_llama} (bf16)"
    # Unloaded to make room (another session's model, a comparison): it comes back in the next turn, said there.
    engine.run_exclusive(lambda: engine._unload_locked(engine.default_spec().key))
    notices, final = ask(engine, None)
    assert [n.code for n in notices] == ["loading_for_you", "loaded_for_you"]
    assert final.stats.model == f"{tiny_llama} (bf16)" and engine.loaded is not None


# ----- the chat tab: each tab's own model -----------------------------------------------
NO_PROGRESS = {"progress": lambda *a, **k: None}


def tab_answer(handlers, session, history, text, lang="en"):
    from ui.handlers import ChatSession  # noqa: F401

    _, history = handlers.submit(text, history, session, lang, 0, 0.9, 4)
    return list(handlers.answer(history, "", 0, 0.9, 4, session, lang))[-1]


def titles(history):
    return [m["metadata"]["title"] for m in history if m.get("metadata")]


def test_two_tabs_keep_their_own_models_and_only_the_loading_tab_is_told(catalog, tiny_llama):
    from ui.chat_file import SavedChat, from_json, to_json, to_markdown
    from ui.handlers import ChatHandlers, ChatSession

    engine = Engine(catalog)
    engine.load(str(tiny_llama), LoadSettings(context_tokens=256))  # the app's default: what a new tab talks to
    handlers = ChatHandlers(engine)
    tab_a, tab_b = ChatSession(), ChatSession()
    status, _, boxes_model, boxes_quant = handlers.load(str(tiny_llama), "bf16", False, None, 256, "en", tab_b,
                                                        **NO_PROGRESS)
    assert "Loaded" in status and "Only this tab switched" in status
    assert handlers.current_model_text("en", tab_a).endswith("(none)")
    assert handlers.current_model_text("en", tab_b).endswith("(bf16)")
    chat_a = tab_answer(handlers, tab_a, [], "Hello")
    chat_b = tab_answer(handlers, tab_b, [], "Hello")
    assert titles(chat_a)[-1].startswith("TTFT") and titles(chat_a)[-1].endswith(f" · by {tiny_llama} (none)")
    assert titles(chat_b)[-1].startswith("TTFT") and titles(chat_b)[-1].endswith(f" · by {tiny_llama} (bf16)")
    assert engine.loaded.settings.quant is Quant.NONE  # the default did not move

    # B's model is unloaded to make room (another tab's load); B's next turn loads it again and says so in B only.
    engine.run_exclusive(lambda: engine._unload_locked(tab_b.spec.key))
    chat_b = tab_answer(handlers, tab_b, chat_b, "Again")
    chat_a = tab_answer(handlers, tab_a, chat_a, "Again")
    loaded_note = [t for t in titles(chat_b) if "for you" in t]
    assert len(loaded_note) == 1 and loaded_note[0].startswith(f"⏳ Loaded {tiny_llama} (bf16) for you, ")
    assert not any("for you" in t for t in titles(chat_a))
    assert titles(chat_b)[-1].endswith(f"by {tiny_llama} (bf16)")

    # A failed load keeps the tab's previous choice: the boxes go back to it, the other tab is untouched.
    before = tab_b.spec
    status, _, box_model, box_quant = handlers.load("/no/such/model", "4bit", False, None, 256, "en", tab_b,
                                                    **NO_PROGRESS)
    assert "Could not load" in status and f"Still using **{tiny_llama}** (bf16)" in status
    assert (box_model, box_quant) == (str(tiny_llama), "bf16") and tab_b.spec is before
    assert titles(tab_answer(handlers, tab_b, chat_b, "Still you?"))[-1].endswith(f"by {tiny_llama} (bf16)")

    # What is in memory, the same line in every tab (most recently used first), in both languages.
    assert handlers.residents_html("en") == f"In memory now: {tiny_llama} (bf16), {tiny_llama} (none)"
    assert handlers.residents_html("zh") == f"内存中现有：{tiny_llama} (bf16)，{tiny_llama} (none)"

    # The label is kept with the chat: in the JSON export (read back by this version) and in the Markdown.
    chat = SavedChat(chat_b, str(tiny_llama), "bf16")
    assert any(t.endswith(f"by {tiny_llama} (bf16)") for t in titles(from_json(to_json(chat)).messages))
    assert f"by {tiny_llama} (bf16)*" in to_markdown(chat)


def test_a_tab_whose_model_is_another_tabs_reuses_it_without_loading(catalog, tiny_llama):
    from ui.handlers import ChatHandlers, ChatSession

    engine = Engine(catalog)
    handlers = ChatHandlers(engine)
    first, second = ChatSession(), ChatSession()
    handlers.load(str(tiny_llama), "bf16", False, None, 256, "en", first, **NO_PROGRESS)
    status, *_ = handlers.load(str(tiny_llama), "bf16", False, None, 256, "zh", second, **NO_PROGRESS)
    assert "已在内存中" in status and "无需加载" in status
    assert len(engine.residents()) == 1
    assert handlers.residents_html("en") == f"In memory now: {tiny_llama} (bf16)"
    assert handlers.current_model_text("en", ChatSession()) == "No model is loaded yet: pick one and press Load."
