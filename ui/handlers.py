"""Event handlers of the chat UI: plain methods over the engine, testable without a browser.

Per-user data comes in as arguments (chat history from the Chatbot, a ChatSession in
gr.State); the only shared object is the engine, which serializes GPU work itself.
"""

from __future__ import annotations

import math
import threading
import uuid
from dataclasses import dataclass, field
from typing import Iterator

import gradio as gr

from models.facade import (
    Engine, GiB, KVPrecision, LoadOptions, LoadSettings, OverflowPolicy, SamplingDefaults, SamplingSettings,
    UserFacingError, engine_metrics, internal_error, invalid_text_at, render, sampling_defaults,
)

from . import chat_history as ch
from .i18n import explain, t
from .panels import load_report_text, memory_panel_html, metrics_text, plan_text

# Ranges of the numeric controls (the sliders use them too). A CLI value beyond a maximum widens it.
TEMPERATURE_MAX = 2.0
TOP_P_MIN = 0.05
BUDGET_MIN_GIB = 0.5
CONTEXT_MIN, CONTEXT_MAX = 256, 32768
MAX_NEW_TOKENS_MAX = 4096
MAX_MESSAGE_CHARS = 50_000  # longest message accepted (app.py --max-message-chars)


class BadNumber(ValueError):
    """A numeric control's value is not a number or out of its range (the message says which and why)."""


def failure_text(error: BaseException, lang: str, where: str) -> str:
    """What a user is told about an error: their own mistake in their language, or an internal error with its id.

    Anything that is neither a UserFacingError nor a refused control value is a bug: it is
    logged with its traceback under the id the user sees, and the app carries on."""
    if isinstance(error, (UserFacingError, BadNumber)):
        return explain(error, lang)
    return explain(internal_error(error, where), lang)


def read_number(value, label_key: str, low: float, high: float, lang: str, whole: bool = False) -> float:
    """`value` as a number in [low, high], or BadNumber naming the control and its range.

    A slider's number box sends what was typed until it loses focus (0, -5, "abc"), and API callers
    send anything, so every handler that uses a number reads it through here."""
    try:
        number = float(value)
        ok = math.isfinite(number) and low <= number <= high and (not whole or number == int(number))
    except (TypeError, ValueError, OverflowError):
        ok = False
    if not ok:
        kind = t("whole_number", lang) if whole else t("number", lang)
        low_s, high_s = (f"{int(low)}", f"{int(high)}") if whole else (f"{low:g}", f"{high:g}")
        raise BadNumber(t("bad_number", lang, name=t(label_key, lang), kind=kind, low=low_s, high=high_s,
                          value=str(value)[:40]))
    return int(number) if whole else number


class ChatSession:
    """One browser tab's private state: its Stop switch, whether it is answering, its KV cache's id."""

    def __init__(self) -> None:
        self.stop_event = threading.Event()
        self.id = uuid.uuid4().hex  # names this tab's KV cache in the engine
        self.sampling_model: str | None = None  # the model whose sampling defaults this tab's sliders got
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
    options: LoadOptions = field(default_factory=LoadOptions)

    def load_settings(self, engine: Engine, lang: str = "en", context_max: int = CONTEXT_MAX) -> LoadSettings:
        """LoadSettings for the engine (the budget only matters on a GPU); BadNumber for a bad number."""
        budget = None
        if engine.device == "cuda" and self.gpu_budget_gib not in (None, ""):
            total = engine.memory().total / GiB
            budget = read_number(self.gpu_budget_gib, "gpu_budget", BUDGET_MIN_GIB, total, lang)
        context = read_number(self.context_tokens, "context", CONTEXT_MIN, context_max, lang, whole=True)
        return LoadSettings.from_user(self.quant, budget, context, self.double_quant, self.options)


class ChatHandlers:
    """Everything the chat tab's events do."""

    def __init__(self, engine: Engine, options: LoadOptions | None = None, max_new_tokens_max: int = MAX_NEW_TOKENS_MAX,
                 context_max: int = CONTEXT_MAX, max_message_chars: int = MAX_MESSAGE_CHARS):
        self.engine = engine
        self.max_message_chars = max_message_chars
        self.options = options or LoadOptions()
        self.max_new_tokens_max = max_new_tokens_max  # the slider's maximum (a CLI default may widen it)
        self.context_max = context_max
        self.fixed_sampling: tuple[float, float] | None = None  # (temperature, top_p) given on the command line

    def sampling_defaults(self) -> SamplingDefaults:
        """The chat model's recommended sampling (generation_config.json, else catalog, else the app's)."""
        loaded = self.engine.loaded
        if loaded is None:
            return sampling_defaults(None)
        return sampling_defaults(getattr(loaded.model, "generation_config", None), loaded.ref.entry)

    def apply_sampling_defaults(self, session: ChatSession, lang: str):
        """(temperature, top-p, note): the sliders follow the chat model's recommended sampling when that
        model changed since this tab last got them (a user's own tweaks survive otherwise), and the note
        says which defaults apply and where they come from."""
        if self.fixed_sampling is not None:
            temperature, top_p = self.fixed_sampling
            return gr.skip(), gr.skip(), t("sampling_from_cli", lang, temperature=f"{temperature:g}", top_p=f"{top_p:g}")
        loaded = self.engine.loaded
        d = self.sampling_defaults()
        label = loaded.ref.label if loaded is not None else "–"
        note = t(f"sampling_from_{d.source}", lang, model=label, temperature=f"{d.temperature:g}", top_p=f"{d.top_p:g}")
        if loaded is None or session.sampling_model == label:
            return gr.skip(), gr.skip(), note
        session.sampling_model = label
        return d.temperature, d.top_p, note

    def sampling(self, temperature, top_p, max_new_tokens, lang: str = "en") -> SamplingSettings:
        """The generation settings, each checked against its control's range (BadNumber if not)."""
        try:
            return SamplingSettings(
                max_new_tokens=read_number(max_new_tokens, "max_new_tokens", 1, self.max_new_tokens_max, lang, whole=True),
                temperature=read_number(temperature, "temperature", 0.0, TEMPERATURE_MAX, lang),
                top_p=read_number(top_p, "top_p", TOP_P_MIN, 1.0, lang),
            )
        except BadNumber as e:  # refused before sending: say the message is safe
            raise BadNumber(f"{e} {t('nothing_sent_kept', lang)}") from None

    def _choice(self, model, quant, double_quant, budget, context) -> ModelChoice:
        return ModelChoice(model, quant, double_quant, budget, context, self.options)

    # ----- model controls ------------------------------------------------------------
    def memory_html(self, lang: str, budget_gib: float | None = None, kv: str = KVPrecision.FULL.value) -> str:
        """The memory panel now, with the context the memory left allows."""
        budget = int(float(budget_gib) * GiB) if budget_gib and self.engine.device == "cuda" else None
        engine = self.engine
        kv = kv or KVPrecision.FULL.value
        room = engine.context_limit(kv=kv) if engine.loaded else None
        return memory_panel_html(engine.memory(), lang, engine.loaded, budget, room, engine.session_count(),
                                 engine.memory_context_tokens(kv=kv) if engine.loaded else None,
                                 engine_metrics(engine.loaded))

    def tab_closed(self, request: gr.Request | None = None) -> None:
        """A browser tab was closed or reloaded: free its KV cache (never waits for the GPU)."""
        if request is not None and getattr(request, "session_hash", None):
            self.engine.drop_session(request.session_hash)

    def fit_check(self, model, quant, double_quant, budget, context, lang) -> str:
        """The verdict for the chosen model/settings, before loading."""
        choice = self._choice(model, quant, double_quant, budget, context)
        try:
            settings = choice.load_settings(self.engine, lang, self.context_max)
            _, plan = self.engine.plan(choice.model, settings)
        except Exception as e:  # noqa: BLE001 - said in the status line; a bug gets an id (failure_text)
            return t("load_failed", lang, error=failure_text(e, lang, "fit check"))
        return plan_text(plan, lang)

    def load(self, model, quant, double_quant, budget, context, lang, progress=gr.Progress()):
        """Unload the current model, load the chosen one; return (status, memory panel, model box, quant box).

        After a failed load the model and quantization boxes go back to the model still in use, so
        they never show a choice that is not the one answering."""
        choice = self._choice(model, quant, double_quant, budget, context)
        try:
            settings = choice.load_settings(self.engine, lang, self.context_max)
            progress(0, desc=t("loading", lang, model=model, quant=quant))
            # While it waits its turn, the engine's line is a Message ("another user's model is loading: …").
            report = self.engine.load(choice.model, settings, progress=lambda f, m: progress(f, desc=explain(m, lang)))
        except Exception as e:  # noqa: BLE001 - the app stays up; a bug gets an id (failure_text)
            failed = t("load_failed", lang, error=failure_text(e, lang, "load"))
            loaded = self.engine.loaded
            if loaded is None:
                return f"{failed}\n\n{render('no_model', lang)}", self.memory_html(lang, budget), gr.skip(), gr.skip()
            kept = t("kept_model", lang, model=loaded.ref.label, quant=loaded.settings.quant.value)
            return (f"{failed}\n\n{kept}", self.memory_html(lang, budget), loaded.ref.label,
                    loaded.settings.quant.value)
        return load_report_text(report, lang), self.memory_html(lang, budget), gr.skip(), gr.skip()

    def current_model_text(self, lang: str) -> str:
        """Which model is loaded now."""
        loaded = self.engine.loaded
        if loaded is None:
            return render("no_model", lang)
        return t("current_model", lang, model=loaded.ref.label, quant=loaded.settings.quant.value)

    # ----- chat ----------------------------------------------------------------------
    def _busy(self, session: ChatSession, lang: str) -> bool:
        if session.answering:
            gr.Warning(t("answer_running", lang))
        return session.answering

    def submit(self, message: str, history: list, session: ChatSession, lang: str, temperature=None, top_p=None,
               max_new_tokens=None):
        """Put the user's message into the chat at once; empty input or a bad setting gets a message, nothing is lost."""
        if self._busy(session, lang):
            return message, gr.skip()  # the text stays in the box; the streaming chat is untouched
        history = ch.normalize(history)
        if not (message or "").strip():
            gr.Warning(t("empty_message", lang))
            return message, history
        if len(message) > self.max_message_chars:
            # Refused before it reaches the chat (or the tokenizer): the text stays in the box to be shortened.
            history.append(ch.ui_note("⚠️ " + self._too_long(message, lang)))
            return message, history
        at = invalid_text_at(message)
        if at is not None:  # refused before it enters the chat, where every later turn would fail on it
            history.append(ch.ui_note("⚠️ " + t("message_invalid_text", lang, at=at + 1)))
            return message, history
        if max_new_tokens is not None:
            try:
                self.sampling(temperature, top_p, max_new_tokens, lang)
            except BadNumber as e:
                # Said in the chat (a UI-only line, never sent to the model); the message stays in the box
                # and the chained answer finds no new user message, so nothing is generated.
                history.append(ch.ui_note("⚠️ " + str(e)))
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
        try:
            sampling = self.sampling(temperature, top_p, max_new_tokens, lang)
        except BadNumber as e:  # an API caller's value (the page checks in submit, before the message moves)
            yield history + [ch.ui_note("⚠️ " + str(e))]
            return
        if len(history[-1]["content"]) > self.max_message_chars:  # an API caller's message
            yield history + [ch.ui_note("⚠️ " + self._too_long(history[-1]["content"], lang))]
            return
        at = invalid_text_at(history[-1]["content"])
        if at is not None:  # an API caller's message
            yield history + [ch.ui_note("⚠️ " + t("message_invalid_text", lang, at=at + 1))]
            return
        session.bind(request)
        stop_event = session.new_answer()  # fresh for every answer: an API caller never finds it set
        session.active = stop_event
        try:
            yield from self._stream_answer(history, system_prompt, sampling, session.id, stop_event, lang, kv, policy)
        finally:
            if session.active is stop_event:
                session.active = None

    def _stream_answer(self, history: list, system_prompt: str, sampling: SamplingSettings, session_id: str,
                       stop_event: threading.Event, lang: str, kv: str, policy: str) -> Iterator[list]:
        messages = ch.model_messages(history, system_prompt or "")
        history.append({"role": "assistant", "content": ""})
        noticed = False
        try:
            updates = self.engine.chat(messages, sampling, stop_event, session=session_id,
                                       kv=kv or KVPrecision.FULL.value, policy=policy or OverflowPolicy.DROP_OLDEST.value)
            for update in updates:
                if update.waiting is not None:  # in line for the GPU: say where and why, in the answer's place
                    history[-1] = ch.ui_note(explain(update.waiting.message(), lang), pending=True)
                    yield history
                    continue
                if ch.is_ui_only(history[-1]):  # its turn came: the answer replaces the waiting line
                    history[-1] = {"role": "assistant", "content": ""}
                if update.stats.dropped_messages and not noticed:
                    # Say exactly what the model no longer sees, above the answer it affects.
                    noticed = True
                    history.insert(len(history) - 1, self._dropped_note(messages, update.stats, lang, kv))
                history[-1]["content"] = update.text
                if update.done:
                    history.append(ch.ui_note(metrics_text(update.stats, lang)))
                yield history
        except Exception as e:  # noqa: BLE001 - said in the chat, which is kept; a bug gets an id (failure_text)
            if not history[-1]["content"]:
                history.pop()
            if isinstance(e, UserFacingError) and e.code == "message_too_long":
                # Kept in the chat (nothing typed is lost) but marked, so later turns never send it
                # again; the page then moves it back into the empty textbox (restore_unsent).
                ch.mark_unsent(history, t("unsent_title", lang))
            history.append(ch.ui_note("⚠️ " + t("answer_failed", lang, error=failure_text(e, lang, "answer"))))
            yield history

    def _too_long(self, message: str, lang: str) -> str:
        return t("message_too_many_chars", lang, chars=f"{len(message):,}", limit=f"{self.max_message_chars:,}")

    def _dropped_note(self, messages: list[dict], stats, lang: str, kv: str) -> dict:
        n = stats.dropped_messages
        head = 1 if messages and messages[0]["role"] == "system" else 0
        dropped = messages[head:head + n]
        items = " | ".join(f"{m['role']}: {_clip(m['content'])}" for m in dropped)
        # The prompt's own limit (context minus the room kept for the answer): the number an overflow error gives.
        limit = stats.prompt_limit or self.engine.context_limit(kv=kv or KVPrecision.FULL.value)
        return ch.ui_note("✂️ " + t("dropped_notice", lang, n=n, tokens=limit, items=items))

    def restore_unsent(self, history: list, message: str):
        """Put a message just refused as too long back into the empty textbox, to be shortened.

        The chat keeps its marked copy (never sent again); only the box is an output, so this step
        adds no progress overlay to the chat after every answer."""
        if (message or "").strip():
            return gr.skip()  # never overwrite what is typed
        text = ch.unsent_text(ch.normalize(history))
        return text if text is not None else gr.skip()

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
