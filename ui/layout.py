"""The Gradio app: layout and event wiring only; what the events do lives in ui/handlers.py."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace

import gradio as gr

from models.facade import Engine, GiB, KVPrecision, LoadOptions, OverflowPolicy, kv_precision_options

from .chatbot import LiteralChatbot
from .compare_handlers import MAX_UPLOAD_BYTES
from .compare_tab import build_compare_tab
from .handlers import (BUDGET_MIN_GIB, CONTEXT_MAX, CONTEXT_MIN, MAX_MESSAGE_CHARS, MAX_NEW_TOKENS_MAX, TEMPERATURE_MAX,
                       TOP_P_MIN,
                       ChatHandlers, ChatSession)
from .i18n import LANGUAGES, explain_quant, gradio_i18n, language_from_header, t
from .persist import ChatPersistence
from .panels import PANEL_CSS

MEMORY_REFRESH_S = 1.0


@dataclass(frozen=True)
class UiDefaults:
    """Initial values of the model controls (from the CLI)."""

    model: str = ""
    quant: str = "none"
    gpu_budget_gib: float | None = None
    context_tokens: int = 4096
    system_prompt: str = ""
    temperature: float | None = None  # None: the model's recommended sampling (handlers.sampling_defaults)
    top_p: float | None = None
    max_new_tokens: int = 512
    kv: str = KVPrecision.FULL.value

    def within_controls(self, quant_choices: list[str], kv_choices: list[str], gpu_total_gib: float) -> "UiDefaults":
        """These values brought inside what the controls can show (CLI values may lie outside)."""
        budget = self.gpu_budget_gib
        return replace(
            self,
            quant=self.quant if self.quant in quant_choices else (quant_choices[0] if quant_choices else self.quant),
            kv=self.kv if self.kv in kv_choices else KVPrecision.FULL.value,
            gpu_budget_gib=None if budget is None else min(max(budget, BUDGET_MIN_GIB), gpu_total_gib),
            context_tokens=max(CONTEXT_MIN, int(self.context_tokens)),
            temperature=None if self.temperature is None else min(max(float(self.temperature), 0.0), TEMPERATURE_MAX),
            top_p=None if self.top_p is None else min(max(float(self.top_p), TOP_P_MIN), 1.0),
            max_new_tokens=max(1, int(self.max_new_tokens)),
        )


def _quant_controls(engine: Engine, lang: str) -> tuple[list[str], str]:
    options = engine.quant_options()
    choices = [o.quant.value for o in options if o.available]
    missing = [f"{o.quant.value} ({explain_quant(o, lang)})" for o in options if not o.available]
    note = t("unavailable_quant", lang, items="; ".join(missing)) if missing else ""
    return choices, note


def build_demo(engine: Engine, defaults: UiDefaults | None = None, options: LoadOptions | None = None,
               max_message_chars: int = MAX_MESSAGE_CHARS) -> gr.Blocks:
    """Build the whole app around one engine (shared by all users); `options` apply to every load it makes."""
    defaults = defaults or UiDefaults()
    options = options or LoadOptions()
    handlers = ChatHandlers(engine, options, max_new_tokens_max=max(MAX_NEW_TOKENS_MAX, defaults.max_new_tokens),
                            context_max=max(CONTEXT_MAX, defaults.context_tokens), max_message_chars=max_message_chars)
    i18n = gradio_i18n()
    catalog = engine.catalog
    quant_choices, quant_note = _quant_controls(engine, "en")
    loaded = engine.loaded
    kv_choices = [p.value for p in kv_precision_options(engine.device)]
    # The GPU budget is per GPU: the slider goes up to the largest one.
    gpu_total_gib = round(max(g.total for g in engine.memory().per_gpu) / GiB, 1) if engine.device == "cuda" else 8.0
    defaults = defaults.within_controls(quant_choices, kv_choices, gpu_total_gib)
    recommended = handlers.sampling_defaults()
    if defaults.temperature is not None or defaults.top_p is not None:  # given on the command line: kept
        handlers.fixed_sampling = (recommended.temperature if defaults.temperature is None else defaults.temperature,
                                   recommended.top_p if defaults.top_p is None else defaults.top_p)
    start_temperature, start_top_p = handlers.fixed_sampling or (recommended.temperature, recommended.top_p)
    model_value = loaded.ref.label if loaded else (defaults.model or catalog.default_id)
    quant_value = loaded.settings.quant.value if loaded else defaults.quant
    gpu_budget = defaults.gpu_budget_gib
    if engine.device == "cuda" and gpu_budget is None:
        gpu_budget = round((engine.default_gpu_budget_bytes() or 0) / GiB, 1)

    # No telemetry: by default Gradio reports the app's structure to api.gradio.app and asks PyPI for updates.
    with gr.Blocks(title="Small LLM Lab", analytics_enabled=False) as demo:
        session = gr.State(ChatSession())
        # Fires when the tab is closed or reloaded (an input-only State's delete_callback never does).
        demo.unload(handlers.tab_closed)
        with gr.Row():
            title = gr.Markdown(i18n("title"))
            lang = gr.Radio(
                choices=[(name, code) for code, name in LANGUAGES.items()], value="en",
                label=i18n("language"), scale=0, min_width=200, elem_id="language",
            )
        with gr.Tabs():
            with gr.Tab(i18n("tab_chat"), id="chat", elem_id="tab-chat") as chat_tab:
                with gr.Row():
                    with gr.Column(scale=3):
                        # A plain label: an I18n one renders as "[object Object]" on the Chatbot; relabel() translates it.
                        # User messages show as typed (ui/chatbot.py); answers are sanitized Markdown.
                        chatbot = LiteralChatbot(label=t("chatbot", "en"), height=480, elem_id="chatbot",
                                                 buttons=["copy"], feedback_options=None, sanitize_html=True)
                        with gr.Row():
                            msg = gr.Textbox(label=i18n("message"), placeholder=i18n("message_placeholder"),
                                             scale=5, elem_id="message", autofocus=True)
                            # Gradio's default min_width (160 px) left the message box a third of the row.
                            send = gr.Button(i18n("send"), variant="primary", scale=1, min_width=80, elem_id="send")
                            stop = gr.Button(i18n("stop"), variant="stop", scale=1, min_width=80, elem_id="stop")
                        with gr.Row():
                            regenerate = gr.Button(i18n("regenerate"), size="sm", elem_id="regenerate")
                            undo = gr.Button(i18n("undo"), size="sm", elem_id="undo")
                            clear = gr.Button(i18n("clear"), size="sm", elem_id="clear")
                        persist = ChatPersistence(handlers, engine.cache_dir)  # kept in the browser; export/import
                        persist.build(i18n)
                        with gr.Accordion(i18n("settings"), open=False, elem_id="settings") as settings:
                            system_prompt = gr.Textbox(label=i18n("system_prompt"), value=defaults.system_prompt, lines=2)
                            temperature = gr.Slider(0, TEMPERATURE_MAX, value=start_temperature, step=0.05, label=i18n("temperature"))
                            # These two sliders start at 0, below their valid range: the browser clamps a typed
                            # value to the slider's minimum and sends it, so a typed 0 or -5 would silently become
                            # the minimum. Starting at 0 lets it arrive and be refused with a message (handlers.sampling).
                            top_p = gr.Slider(0, 1, value=start_top_p, step=0.05, label=i18n("top_p"), elem_id="top-p")
                            max_new = gr.Slider(0, handlers.max_new_tokens_max, value=defaults.max_new_tokens, step=1,
                                                label=i18n("max_new_tokens"), elem_id="max-new-tokens")
                            sampling_note = gr.Markdown(handlers.apply_sampling_defaults(ChatSession(), "en")[2],
                                                        elem_id="sampling-defaults")
                            kv_precision = gr.Dropdown(
                                choices=[(t(f"kv_{p.value}", "en"), p.value) for p in kv_precision_options(engine.device)],
                                value=defaults.kv, label=i18n("kv_precision"), elem_id="kv-precision",
                            )
                            overflow = gr.Dropdown(
                                choices=[(t(f"policy_{p.value}", "en"), p.value) for p in OverflowPolicy],
                                value=OverflowPolicy.DROP_OLDEST.value, label=i18n("overflow_policy"), elem_id="overflow",
                            )
                    with gr.Column(scale=2):
                        model = gr.Dropdown(
                            choices=[(f"{e.id} · {e.name}", e.id) for e in catalog.entries.values()],
                            value=model_value, allow_custom_value=True, label=i18n("model"), elem_id="model",
                        )
                        quant = gr.Dropdown(choices=quant_choices, value=quant_value, label=i18n("quant"), elem_id="quant")
                        quant_info = gr.Markdown(quant_note)
                        if options.trust_remote_code:
                            gr.Markdown(i18n("trust_remote_code_warning"), elem_id="remote-code-warning")
                        double_quant = gr.Checkbox(False, label=i18n("double_quant"))
                        budget = gr.Slider(BUDGET_MIN_GIB, gpu_total_gib, value=gpu_budget or 8.0, step=0.1, label=i18n("gpu_budget"),
                                           visible=engine.device == "cuda", elem_id="budget")
                        context = gr.Slider(CONTEXT_MIN, handlers.context_max, value=defaults.context_tokens, step=256, label=i18n("context"))
                        fit = gr.Markdown(elem_id="fit")
                        load = gr.Button(i18n("load"), elem_id="load")
                        status = gr.Markdown(handlers.current_model_text("en"), elem_id="status")
                        # The same line in every tab: which models are in memory, and which is being loaded.
                        residents = gr.Markdown(handlers.residents_html("en"), elem_id="residents")
                        memory = gr.HTML(handlers.memory_html("en", gpu_budget), elem_id="memory")
            with gr.Tab(i18n("tab_compare"), id="compare", elem_id="tab-compare") as compare_tab:
                build_compare_tab(engine, i18n, lang, budget, context, options)
        timer = gr.Timer(MEMORY_REFRESH_S)

        model_inputs = [model, quant, double_quant, budget, context, lang]
        load_inputs = model_inputs + [session]  # a load is this tab's own: it sets the session's model
        load_outputs = [status, memory, model, quant]  # a failed load sets the boxes back to the model in use
        # After a load (and on page load), the sampling sliders follow the model's recommended values.
        sampling_step = (handlers.apply_sampling_defaults, [session, lang], [temperature, top_p, sampling_note])
        # (each use below hides its progress: a quick step whose spinner would only flicker)

        # ----- language ---------------------------------------------------------------
        def pick_language(request: gr.Request):
            """The UI language from the browser's Accept-Language header."""
            header = request.headers.get("accept-language") if request is not None else None
            return language_from_header(header)

        def relabel(code: str, session: ChatSession):
            """Every label, placeholder and translated option in language `code`."""
            choices = {  # dropdowns whose option names are translated too
                "kv_precision": [(t(f"kv_{p.value}", code), p.value) for p in kv_precision_options(engine.device)],
                "overflow_policy": [(t(f"policy_{p.value}", code), p.value) for p in OverflowPolicy],
            }
            return [gr.update(label=t(key, code), **({"choices": choices[key]} if key in choices else {}))
                    for key in LABELLED_KEYS] + [
                gr.update(placeholder=t("message_placeholder", code)),
                handlers.current_model_text(code, session),
                _quant_controls(engine, code)[1],
            ] + [gr.update(**{attr: t(key, code)}) for _, attr, key in TEXTS]

        labelled = [chatbot, msg, system_prompt, temperature, top_p, max_new, model, quant, double_quant, budget, context,
                    kv_precision, overflow, lang]
        LABELLED_KEYS = ["chatbot", "message", "system_prompt", "temperature", "top_p", "max_new_tokens",
                         "model", "quant", "double_quant", "gpu_budget", "context", "kv_precision", "overflow_policy",
                         "language"]
        # Components whose own text (a button's value, a tab's label) is translated on a switch.
        TEXTS = [(title, "value", "title"), (chat_tab, "label", "tab_chat"), (compare_tab, "label", "tab_compare"),
                 (send, "value", "send"), (stop, "value", "stop"), (regenerate, "value", "regenerate"),
                 (undo, "value", "undo"), (clear, "value", "clear"), (load, "value", "load"),
                 (settings, "label", "settings")]
        demo.load(pick_language, None, lang, queue=False, api_visibility="private")
        lang.change(relabel, [lang, session], labelled + [msg, status, quant_info] + [c for c, _, _ in TEXTS], queue=False,
                    api_visibility="private").then(
            handlers.fit_check, model_inputs, fit, api_visibility="private"
        ).then(*sampling_step, queue=False, show_progress="hidden", api_visibility="private")

        # ----- model controls --------------------------------------------------------
        # Only the chat ("answer") is public API; every other event is the page's own: a load takes memory
        # and may unload idle models, so API clients must not reach it (when exposed, --auth guards the page too).
        demo.load(handlers.fit_check, model_inputs, fit, api_visibility="private")
        for control in (double_quant, budget, context):
            control.change(handlers.fit_check, model_inputs, fit, api_visibility="private")
        for dropdown in (model, quant):
            # Switching from a dropdown loads at once (after the fit check says why/how).
            dropdown.input(handlers.fit_check, model_inputs, fit, api_visibility="private").then(
                handlers.load, load_inputs, load_outputs, api_visibility="private"
            ).then(*sampling_step, queue=False, show_progress="hidden", api_visibility="private")
        load.click(handlers.load, load_inputs, load_outputs, api_visibility="private").then(
            *sampling_step, queue=False, show_progress="hidden", api_visibility="private")
        start = demo.load(*sampling_step, queue=False, show_progress="hidden", api_visibility="private")
        timer.tick(handlers.memory_html, [lang, budget, kv_precision, session], memory, show_progress="hidden",
                   queue=False, api_visibility="private")
        timer.tick(handlers.residents_html, lang, residents, show_progress="hidden", queue=False,
                   api_visibility="private")

        # The browser's saved chat comes back after the page's first step; save_step runs after each chat edit.
        save_step = persist.wire(demo, chatbot, session, lang, model, quant,
                                 [system_prompt, temperature, top_p, max_new, kv_precision, overflow, context, double_quant],
                                 load_inputs, load_outputs, (handlers.fit_check, model_inputs, fit), start)
        saved = {"queue": False, "show_progress": "hidden", "api_visibility": "private"}

        # ----- chat ------------------------------------------------------------------
        answer_inputs = [chatbot, system_prompt, temperature, top_p, max_new, session, lang, kv_precision, overflow]
        # The engine serializes GPU work itself, so answers need no Gradio concurrency limit;
        # "answer" is the public chat API: a history ending in a user message -> the history answered.
        # submit is queued (not queue=False) so its "type a message first" toast reaches the browser.
        submit_inputs = [msg, chatbot, session, lang, temperature, top_p, max_new]
        msg.submit(handlers.submit, submit_inputs, [msg, chatbot], concurrency_limit=None,
                   api_visibility="private").then(*save_step, **saved).then(
            handlers.answer, answer_inputs, chatbot, concurrency_limit=None, api_name="answer"
        ).then(handlers.restore_unsent, [chatbot, msg], msg, queue=False, show_progress="hidden",
                api_visibility="private").then(*save_step, **saved)
        send.click(handlers.submit, submit_inputs, [msg, chatbot], concurrency_limit=None,
                   api_visibility="private").then(*save_step, **saved).then(
            handlers.answer, answer_inputs, chatbot, concurrency_limit=None, api_visibility="private"
        ).then(handlers.restore_unsent, [chatbot, msg], msg, queue=False, show_progress="hidden",
                api_visibility="private").then(*save_step, **saved)
        stop.click(handlers.stop, session, None, queue=False, api_visibility="private")
        # Queued (not queue=False) so the "answer still running" toast reaches the browser.
        regenerate.click(handlers.regenerate, [chatbot, session, lang], chatbot, concurrency_limit=None,
                         api_visibility="private").then(
            handlers.answer, answer_inputs, chatbot, concurrency_limit=None, api_visibility="private"
        ).then(handlers.restore_unsent, [chatbot, msg], msg, queue=False, show_progress="hidden",
                api_visibility="private").then(*save_step, **saved)
        undo.click(handlers.undo, [chatbot, msg, session, lang], [chatbot, msg], concurrency_limit=None,
                   api_visibility="private").then(*save_step, **saved)
        clear.click(handlers.clear, [session, lang], chatbot, concurrency_limit=None,
                    api_visibility="private").then(*save_step, **saved)
    return demo


PUBLIC_API = frozenset({"answer"})
_CALL_BY_NAME = re.compile(r"/call/(?:v2/)?([^/]+)/?$")


class PublicApiOnly:
    """ASGI middleware: Gradio's by-name HTTP route (/call/NAME) serves only the public endpoints.

    Gradio 6 hides api_visibility="private" events from its docs and gradio_client, but still runs
    them when POSTed to /gradio_api/call/NAME. The page itself never uses that route (it joins the
    queue by event number), so refusing it costs the browser nothing.
    """

    def __init__(self, app, public: frozenset[str] = PUBLIC_API):
        self.app, self.public = app, public

    async def __call__(self, scope, receive, send):
        """Refuse a by-name call of a private endpoint with 404 and a sentence; pass the rest through."""
        match = _CALL_BY_NAME.search(scope.get("path", "")) if scope["type"] == "http" else None
        if match and scope.get("method") == "POST" and match.group(1) not in self.public:
            body = json.dumps({"detail": f"/{match.group(1)} is not part of this app's API; "
                                         f"public endpoints: {', '.join('/' + n for n in sorted(self.public))}"}).encode()
            await send({"type": "http.response.start", "status": 404,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)


def launch_kwargs(demo: gr.Blocks, app_kwargs: dict | None = None) -> dict:
    """Arguments launch() needs for this app's CSS, translations and API surface (plus any other app_kwargs)."""
    from starlette.middleware import Middleware

    # Uploads (prompt-set files) are small text: Gradio refuses bigger ones before they reach the disk.
    # No run history: Gradio 6 would keep every public call (each answer, with the whole chat as input and as
    # output) in the browser's localStorage in plain text, up to 100 of them. That undoes the encryption of the
    # saved chat (ui/persist.py), rewrites the list every 500 ms while an answer streams, and can fill the
    # origin's quota, after which the saved chat's own write fails. False also deletes runs kept earlier.
    return {"css": PANEL_CSS, "i18n": gradio_i18n(), "ssr_mode": False, "max_file_size": MAX_UPLOAD_BYTES,
            "run_history": False,
            "app_kwargs": {"middleware": [Middleware(PublicApiOnly)], **(app_kwargs or {})}}
