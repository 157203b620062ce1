"""Event handlers of the chat UI: plain methods over the engine, testable without a browser.

Per-user data comes in as arguments (chat history from the Chatbot, a ChatSession in
gr.State); the only shared object is the engine, which serializes GPU work itself.
"""

from __future__ import annotations

import threading
import uuid
from typing import Iterator

import gradio as gr

from models.facade import (
    Engine, GiB, KVPrecision, LoadedModel, LoadOptions, ModelSpec, OverflowPolicy, SamplingDefaults,
    SamplingSettings, UserFacingError, engine_metrics, internal_error, invalid_text_at, render, sampling_defaults,
)

from . import chat_history as ch
from .controls import (  # noqa: F401 - the ranges and readers are the tab's; persist and compare import them here
    BUDGET_MIN_GIB, CONTEXT_MAX, CONTEXT_MIN, MAX_MESSAGE_CHARS, MAX_NEW_TOKENS_MAX, TEMPERATURE_MAX, TOP_P_MIN,
    BadNumber, ModelChoice, read_number,
)
from .i18n import explain, t
from .panels import load_report_text, memory_panel_html, metrics_text, plan_text, residents_text


def failure_text(error: BaseException, lang: str, where: str) -> str:
    """What a user is told about an error: their own mistake in their language, or an internal error with its id.

    Anything that is neither a UserFacingError nor a refused control value is a bug: it is
    logged with its traceback under the id the user sees, and the app carries on."""
    if isinstance(error, (UserFacingError, BadNumber)):
        return explain(error, lang)
    return explain(internal_error(error, where), lang)


class ChatSession:
    """One browser tab's private state: its Stop switch, whether it is answering, its KV cache's id, its model."""

    def __init__(self) -> None:
        self.stop_event = threading.Event()
        self.id = uuid.uuid4().hex  # names this tab's KV cache in the engine
        self.sampling_model: str | None = None  # the model whose sampling defaults this tab's sliders got
        self.active: threading.Event | None = None  # the Stop switch of the answer streaming now
        # This tab's own model and quantization (None: the app's default). Set by a load that worked, so a
        # failed one keeps the previous choice; other tabs never see it (ui/persist.py keeps it in the browser).
        self.spec: ModelSpec | None = None

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

    def spec_of(self, session: ChatSession | None) -> ModelSpec | None:
        """The model a tab talks to: its own choice, else the app's default (None: no model at all)."""
        return (session.spec if session is not None else None) or self.engine.default_spec()

    def model_of(self, session: ChatSession | None) -> LoadedModel | None:
        """The tab's model if it is in memory now (None: not loaded yet, or unloaded to make room)."""
        spec = self.spec_of(session)
        if spec is None:
            return None
        if spec.key is not None:
            return self.engine.resident(spec.key)
        try:
            return self.engine.resident(self.engine.model_key(spec.choice, spec.settings))
        except UserFacingError:  # a choice that no longer resolves (a folder moved): its next answer says why
            return None

    def _choice_shown(self, session: ChatSession | None) -> tuple[str, str] | None:
        """(model label, quantization) of the tab's model, for its boxes and status; None without any."""
        spec = self.spec_of(session)
        if spec is None:
            return None
        loaded = self.engine.resident(spec.key)
        try:
            label = loaded.ref.label if loaded is not None else self.engine.resolve(spec.choice).label
        except UserFacingError:
            label = spec.choice
        return label, spec.settings.quant.value

    def sampling_defaults(self, session: ChatSession | None = None) -> SamplingDefaults:
        """The tab's model's recommended sampling (generation_config.json, else catalog, else the app's)."""
        loaded = self.model_of(session)
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
        loaded = self.model_of(session)
        d = self.sampling_defaults(session)
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
    def memory_html(self, lang: str, budget_gib: float | None = None, kv: str = KVPrecision.FULL.value,
                    session: ChatSession | None = None) -> str:
        """The memory panel now, with the context the tab's model leaves room for."""
        budget = int(float(budget_gib) * GiB) if budget_gib and self.engine.device == "cuda" else None
        engine = self.engine
        kv = kv or KVPrecision.FULL.value
        loaded = self.model_of(session)
        room = engine.context_limit(loaded, kv=kv) if loaded else None
        return memory_panel_html(engine.memory(), lang, loaded, budget, room, engine.session_count(),
                                 engine.memory_context_tokens(loaded, kv=kv) if loaded else None,
                                 engine_metrics(loaded))

    def residents_html(self, lang: str) -> str:
        """What is in memory now and what is being loaded, for every tab (the same for all)."""
        return residents_text(self.engine.residents_status(), self.engine.device, lang)

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

    def load(self, model, quant, double_quant, budget, context, lang, session: ChatSession | None = None,
             progress=gr.Progress()):
        """Load the chosen model for this tab only; return (status, memory panel, model box, quant box).

        Other residents stay while they fit (the least recently used is unloaded otherwise); no other
        tab's model changes. After a failed load the tab keeps its previous model and the boxes go back
        to it, so they never show a choice that is not the one answering. Without a session (a script, not
        a tab) the model also becomes the app's default, as `--model` makes it at start."""
        choice = self._choice(model, quant, double_quant, budget, context)
        try:
            settings = choice.load_settings(self.engine, lang, self.context_max)
            progress(0, desc=t("loading", lang, model=model, quant=quant))
            # This tab's own model, kept resident next to the others while they fit; while it waits its turn,
            # the engine's line is a Message ("another user's model is loading: …").
            report = self.engine.ensure(choice.model, settings, progress=lambda f, m: progress(f, desc=explain(m, lang)))
        except Exception as e:  # noqa: BLE001 - the app stays up; a bug gets an id (failure_text)
            failed = t("load_failed", lang, error=failure_text(e, lang, "load"))
            shown = self._choice_shown(session)
            if shown is None:
                return (f"{failed}\n\n{render('no_model', lang)}", self.memory_html(lang, budget, session=session),
                        gr.skip(), gr.skip())
            kept = t("kept_model", lang, model=shown[0], quant=shown[1])
            return f"{failed}\n\n{kept}", self.memory_html(lang, budget, session=session), shown[0], shown[1]
        if session is not None:
            session.spec = ModelSpec(choice.model, settings, report.loaded.key)
        else:
            self.engine.make_default(choice.model, settings)
        return load_report_text(report, lang), self.memory_html(lang, budget, session=session), gr.skip(), gr.skip()

    def current_model_text(self, lang: str, session: ChatSession | None = None) -> str:
        """Which model this tab talks to."""
        shown = self._choice_shown(session)
        if shown is None:
            return render("no_model", lang)
        return t("current_model", lang, model=shown[0], quant=shown[1])

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
            yield from self._stream_answer(history, system_prompt, sampling, session, stop_event, lang, kv, policy)
        finally:
            if session.active is stop_event:
                session.active = None

    def _stream_answer(self, history: list, system_prompt: str, sampling: SamplingSettings, session: ChatSession,
                       stop_event: threading.Event, lang: str, kv: str, policy: str) -> Iterator[list]:
        messages = ch.model_messages(history, system_prompt or "")
        history.append({"role": "assistant", "content": ""})
        noticed = False
        loading_note = None
        try:
            updates = self.engine.chat(messages, sampling, stop_event, session=session.id, spec=self.spec_of(session),
                                       kv=kv or KVPrecision.FULL.value, policy=policy or OverflowPolicy.DROP_OLDEST.value)
            for update in updates:
                if update.waiting is not None:  # in line for the GPU: say where and why, in the answer's place
                    history[-1] = ch.ui_note(explain(update.waiting.message(), lang), pending=True)
                    yield history
                    continue
                if ch.is_ui_only(history[-1]):  # its turn came: the answer replaces the waiting line
                    history[-1] = {"role": "assistant", "content": ""}
                if update.notice is not None:  # this tab's model being loaded for it: one line, updated in place
                    if loading_note is None:
                        loading_note = ch.ui_note("")
                        history.insert(len(history) - 1, loading_note)
                    loading_note["metadata"]["title"] = "⏳ " + explain(update.notice, lang)
                    yield history
                    continue
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
