"""Event handlers of the chat UI: plain methods over the engine, testable without a browser.

Per-user data comes in as arguments (chat history from the Chatbot, a ChatSession in
gr.State); the only shared object is the engine, which serializes GPU work itself.
"""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass, field
from typing import Iterator

import gradio as gr

from models.catalog import UnknownModelError
from models.engine import Engine
from models.generation import SamplingSettings
from models.kv_cache import KVPrecision, OverflowPolicy
from models.loading import LoadSettings, ModelLoadError
from models.memory import GiB
from models.quant import Quant
from models.remote import remote_of
from models.sources import ModelSourceError

from . import chat_history as ch
from .i18n import explain, t
from .panels import load_report_text, memory_panel_html, metrics_text, plan_text

USER_ERRORS = (UnknownModelError, ModelLoadError, ModelSourceError, ValueError, OSError)


class ChatSession:
    """One browser tab's private state: its Stop switch, whether it is answering, its KV cache's id."""

    def __init__(self) -> None:
        self.stop_event = threading.Event()
        self.id = uuid.uuid4().hex  # names this tab's KV cache in the engine
        self.active: threading.Event | None = None  # the Stop switch of the answer streaming now

    @property
    def answering(self) -> bool:
        """An answer is streaming into this tab's chat, so the chat must not be edited under it.

        Pressing Stop ends this at once, so a tab can never be stuck refusing input.
        """
        return self.active is not None and not self.active.is_set()

    def bind(self, request: gr.Request | None) -> None:
        """Name the KV cache after the browser session, so closing the tab can free it."""
        if request is not None and getattr(request, "session_hash", None):
            self.id = request.session_hash

    def __deepcopy__(self, memo) -> "ChatSession":
        # gr.State deep-copies its initial value for every new tab: give each its own Event.
        return ChatSession()

    def new_answer(self) -> threading.Event:
        """A fresh Stop switch for the next answer."""
        self.stop_event = threading.Event()
        return self.stop_event


@dataclass
class ModelChoice:
    """The model controls' values, as the UI holds them."""

    model: str
    quant: str
    double_quant: bool = False
    gpu_budget_gib: float | None = None
    context_tokens: int = 4096
    settings_extra: dict = field(default_factory=dict)

    def load_settings(self, engine: Engine) -> LoadSettings:
        """LoadSettings for the engine (the budget only matters on a GPU)."""
        budget = None
        if engine.device == "cuda" and self.gpu_budget_gib:
            budget = int(float(self.gpu_budget_gib) * GiB)
        return LoadSettings(
            quant=Quant(self.quant), double_quant=bool(self.double_quant), gpu_budget_bytes=budget,
            context_tokens=int(self.context_tokens), **self.settings_extra,
        )


class ChatHandlers:
    """Everything the chat tab's events do."""

    def __init__(self, engine: Engine, settings_extra: dict | None = None):
        self.engine = engine
        self.settings_extra = settings_extra or {}

    def _choice(self, model, quant, double_quant, budget, context) -> ModelChoice:
        return ModelChoice(model, quant, double_quant, budget, context, self.settings_extra)

    # ----- model controls ------------------------------------------------------------
    def memory_html(self, lang: str, budget_gib: float | None = None, kv: str = KVPrecision.FULL.value) -> str:
        """The memory panel now, with the context the memory left allows."""
        budget = int(float(budget_gib) * GiB) if budget_gib and self.engine.device == "cuda" else None
        engine = self.engine
        kv = kv or KVPrecision.FULL.value
        room = engine.context_limit(kv=kv) if engine.loaded else None
        remote = remote_of(engine.loaded)
        return memory_panel_html(engine.memory(), lang, engine.loaded, budget, room, engine.session_count(),
                                 engine.memory_context_tokens(kv=kv) if engine.loaded else None,
                                 remote.metrics() if remote is not None else None)

    def tab_closed(self, request: gr.Request | None = None) -> None:
        """A browser tab was closed or reloaded: free its KV cache (never waits for the GPU)."""
        if request is not None and getattr(request, "session_hash", None):
            self.engine.drop_session(request.session_hash)

    def fit_check(self, model, quant, double_quant, budget, context, lang) -> str:
        """The verdict for the chosen model/settings, before loading."""
        choice = self._choice(model, quant, double_quant, budget, context)
        try:
            settings = choice.load_settings(self.engine)
            _, plan = self.engine.plan(choice.model, settings)
        except USER_ERRORS as e:
            return t("load_failed", lang, error=explain(e, lang))
        budget_bytes = settings.gpu_budget_bytes
        if self.engine.device == "cuda" and budget_bytes is None:
            budget_bytes = plan.predicted_peak_bytes if plan.verdict == "gpu" else None
        from models.hardware import ram_available

        return plan_text(plan, lang, budget_bytes, ram_available())

    def load(self, model, quant, double_quant, budget, context, lang, progress=gr.Progress()) -> tuple[str, str]:
        """Unload the current model, load the chosen one; return (status, memory panel)."""
        choice = self._choice(model, quant, double_quant, budget, context)
        try:
            settings = choice.load_settings(self.engine)
            progress(0, desc=t("loading", lang, model=model, quant=quant))
            report = self.engine.load(choice.model, settings, progress=lambda f, m: progress(f, desc=m))
        except USER_ERRORS + (RuntimeError,) as e:  # RuntimeError: e.g. a CUDA error inside from_pretrained
            current = self.current_model_text(lang)
            return f"{t('load_failed', lang, error=explain(e, lang))}\n\n{current}", self.memory_html(lang, budget)
        return load_report_text(report, lang), self.memory_html(lang, budget)

    def current_model_text(self, lang: str) -> str:
        """Which model is loaded now."""
        loaded = self.engine.loaded
        if loaded is None:
            return t("no_model", lang)
        return t("current_model", lang, model=loaded.ref.label, quant=loaded.settings.quant.value)

    # ----- chat ----------------------------------------------------------------------
    def _busy(self, session: ChatSession, lang: str) -> bool:
        if session.answering:
            gr.Warning(t("answer_running", lang))
        return session.answering

    def submit(self, message: str, history: list, session: ChatSession, lang: str):
        """Put the user's message into the chat at once; empty input gets a message, nothing is lost."""
        if self._busy(session, lang):
            return message, gr.skip()  # the text stays in the box; the streaming chat is untouched
        history = ch.normalize(history)
        if not (message or "").strip():
            gr.Warning(t("empty_message", lang))
            return message, history
        history.append({"role": "user", "content": message})
        return "", history

    def answer(self, history: list, system_prompt: str, temperature: float, top_p: float, max_new_tokens: int,
               session: ChatSession, lang: str, kv: str = KVPrecision.FULL.value,
               policy: str = OverflowPolicy.DROP_OLDEST.value, request: gr.Request | None = None) -> Iterator[list]:
        """Stream the answer to the chat's last (unanswered) user message, then a metrics line."""
        if session.answering:
            yield gr.skip()  # this tab's answer is still streaming (a refused send): leave it alone
            return
        history = ch.normalize(history)
        if not history or history[-1].get("role") != "user":
            yield history  # nothing to answer (e.g. the message was empty)
            return
        session.bind(request)
        stop_event = session.new_answer()  # fresh for every answer: an API caller never finds it set
        session.active = stop_event
        try:
            yield from self._stream_answer(history, system_prompt, temperature, top_p, max_new_tokens,
                                           session.id, stop_event, lang, kv, policy)
        finally:
            if session.active is stop_event:
                session.active = None

    def _stream_answer(self, history: list, system_prompt: str, temperature: float, top_p: float,
                       max_new_tokens: int, session_id: str, stop_event: threading.Event, lang: str, kv: str,
                       policy: str) -> Iterator[list]:
        sampling = SamplingSettings(
            max_new_tokens=int(max_new_tokens), temperature=float(temperature), top_p=float(top_p)
        )
        messages = ch.model_messages(history, system_prompt or "")
        history.append({"role": "assistant", "content": ""})
        noticed = False
        try:
            updates = self.engine.chat(messages, sampling, stop_event, session=session_id,
                                       kv=kv or KVPrecision.FULL.value, policy=policy or OverflowPolicy.DROP_OLDEST.value)
            for update in updates:
                if update.stats.dropped_messages and not noticed:
                    # Say exactly what the model no longer sees, above the answer it affects.
                    noticed = True
                    history.insert(len(history) - 1, self._dropped_note(messages, update.stats.dropped_messages, lang, kv))
                history[-1]["content"] = update.text
                if update.done:
                    history.append(ch.ui_note(metrics_text(update.stats, lang)))
                yield history
        except USER_ERRORS + (RuntimeError,) as e:
            if not history[-1]["content"]:
                history.pop()
            history.append(ch.ui_note("⚠️ " + t("answer_failed", lang, error=explain(e, lang))))
            yield history

    def _dropped_note(self, messages: list[dict], n: int, lang: str, kv: str) -> dict:
        head = 1 if messages and messages[0]["role"] == "system" else 0
        dropped = messages[head:head + n]
        items = " | ".join(f"{m['role']}: {_clip(m['content'])}" for m in dropped)
        limit = self.engine.context_limit(kv=kv or KVPrecision.FULL.value)
        return ch.ui_note("✂️ " + t("dropped_notice", lang, n=n, tokens=limit, items=items))

    def stop(self, session: ChatSession) -> None:
        """Stop the answer being generated for this tab (the computation itself stops)."""
        session.stop_event.set()

    def regenerate(self, history: list, session: ChatSession, lang: str = "en"):
        """Drop the last answer so it can be generated again."""
        if self._busy(session, lang):
            return gr.skip()
        return ch.drop_last_answer(ch.normalize(history))

    def undo(self, history: list, message: str, session: ChatSession | None = None, lang: str = "en"):
        """Remove the last turn and put its question back in the textbox (nothing typed is lost)."""
        if session is not None and self._busy(session, lang):
            return gr.skip(), message
        history, last = ch.drop_last_turn(ch.normalize(history))
        return history, (message or last)

    def clear(self, session: ChatSession, lang: str = "en"):
        """Empty the chat (not while an answer is being written into it)."""
        if self._busy(session, lang):
            return gr.skip()
        return []


def _clip(text: str, width: int = 40) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"
