"""Chats that survive: each tab's chat, settings and model choice kept in its browser, plus export/import.

The browser keeps the chat in localStorage through gr.BrowserState, so it comes back on reload and
after a server restart (its storage key and encryption secret are stable: the secret lives in the
model cache folder). Nothing is saved until the saved chat has been restored, so the page's own
start-up events can never overwrite it with an empty one. The file format is ui/chat_file.py's.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import tempfile
import time
from pathlib import Path

import gradio as gr

from . import chat_history as ch
from .chat_file import MAX_IMPORT_BYTES, ChatFileError, SavedChat, clean_messages, from_dict, from_json, to_json, to_markdown
from .handlers import CONTEXT_MIN, TEMPERATURE_MAX, TOP_P_MIN, BadNumber, ChatHandlers, ChatSession, read_number
from .i18n import t

STORAGE_KEY = "smallchat-chat-v1"
SECRET_FILE = "browser-state.key"
log = logging.getLogger(__name__)

# The settings a chat carries, in the order of the `settings` components given to ChatPersistence.wire.
SETTING_KEYS = ("system_prompt", "temperature", "top_p", "max_new_tokens", "kv_precision", "overflow",
                "context_tokens", "double_quant")


def browser_secret(cache_dir: Path) -> str:
    """The key the browser's saved chats are encrypted with: made once and kept in the cache folder, so a
    restarted server can still read them (Gradio's default is a new random key at every start)."""
    path = Path(cache_dir) / SECRET_FILE
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warning("cannot read %s (%s): saved chats will not survive a restart", path, e)
        return secrets.token_hex(16)
    secret = secrets.token_hex(16)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secret)
    except FileExistsError:  # another process made it first: use theirs
        return path.read_text().strip()
    except OSError as e:  # a read-only cache: chats still survive reloads, not restarts
        log.warning("cannot write %s (%s): saved chats will not survive a restart", path, e)
    return secret


def _number(value, whole: bool = False):
    """`value` as a finite number (int if `whole`), or None: what a control holds may be typed text."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(number) or (whole and number != int(number)):
        return None
    return int(number) if whole else number


class ChatPersistence:
    """Saves and restores a tab's chat in its browser, and exports/imports chat files."""

    def __init__(self, handlers: ChatHandlers, cache_dir: Path, max_import_bytes: int = MAX_IMPORT_BYTES):
        self.handlers = handlers
        self.secret = browser_secret(cache_dir)
        self.max_import_bytes = max_import_bytes

    # ----- the tab's state <-> a SavedChat -------------------------------------------
    def snapshot(self, history, model, quant, *settings) -> SavedChat:
        """What the tab holds now as a SavedChat (settings that are not valid numbers are left out)."""
        values = dict(zip(SETTING_KEYS, settings))
        kept = {"system_prompt": str(values["system_prompt"] or ""),
                "kv_precision": str(values["kv_precision"] or ""), "overflow": str(values["overflow"] or ""),
                "double_quant": bool(values["double_quant"])}
        for key, whole in (("temperature", False), ("top_p", False), ("max_new_tokens", True), ("context_tokens", True)):
            number = _number(values[key], whole)
            if number is not None:
                kept[key] = number
        return SavedChat(clean_messages(ch.normalize(history)), str(model or ""), str(quant or ""), kept)

    def save(self, ready: bool, history, model, quant, *settings):
        """The tab's chat for the browser to keep (skipped until the saved one was restored)."""
        if not ready:
            return gr.skip()
        return self.snapshot(history, model, quant, *settings).to_dict()

    def _settings_updates(self, chat: SavedChat, lang: str) -> list:
        """Updates for the settings controls (gr.skip() where the chat has none); ChatFileError if one is out of range."""
        s = self.handlers
        checks = {"temperature": (0.0, TEMPERATURE_MAX, False), "top_p": (TOP_P_MIN, 1.0, False),
                  "max_new_tokens": (1, s.max_new_tokens_max, True), "context_tokens": (CONTEXT_MIN, s.context_max, True)}
        out = []
        for key in SETTING_KEYS:
            if key not in chat.settings:
                out.append(gr.skip())
            elif key in checks:
                low, high, whole = checks[key]
                label = key if key != "context_tokens" else "context"
                try:
                    out.append(read_number(chat.settings[key], label, low, high, lang, whole))
                except BadNumber:  # said without read_number's "your message is kept": nothing was typed here
                    raise ChatFileError(f"The chat's setting \"{t(label, 'en')}\" is {chat.settings[key]}; it must be "
                                        f"from {low:g} to {high:g}.") from None
            else:
                out.append(chat.settings[key])
        return out

    def restore(self, saved, session: ChatSession, lang: str):
        """The tab as the browser saved it: chat, settings, model boxes, a note, and ready=True."""
        skip_all = [gr.skip()] * (1 + len(SETTING_KEYS) + 2)
        if not saved:
            return skip_all + ["", True]
        try:
            chat = from_dict(saved)
            settings = self._settings_updates(chat, lang)
        except ChatFileError as e:
            # The browser's copy is unreadable (an older format, edited storage): start clean and say so.
            return skip_all + [t("persist_restore_failed", lang, error=str(e)), True]
        if not chat.messages and not chat.model:
            return skip_all + ["", True]
        note = t("persist_restored", lang, n=len(chat.messages)) if chat.messages else ""
        return [chat.messages] + settings + [chat.model or gr.skip(), chat.quant or gr.skip(), note, True]

    def load_restored(self, saved, model, quant, double_quant, budget, context, lang, session: ChatSession | None = None,
                      progress=gr.Progress()):
        """Make the saved model choice this tab's own again (loading it if it is not in memory, as picking it
        would); nothing when it is the model the tab talks to already."""
        engine = self.handlers.engine
        loaded = self.handlers.model_of(session)
        if not saved or not (saved.get("model") if isinstance(saved, dict) else None):
            return gr.skip(), gr.skip(), gr.skip(), gr.skip()
        try:
            same = loaded is not None and engine.resolve(model).label == loaded.ref.label \
                and loaded.settings.quant.value == quant
        except (ValueError, OSError):
            same = False  # an unknown or refused model: the load below says why
        if same:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip()
        return self.handlers.load(model, quant, double_quant, budget, context, lang, session, progress=progress)

    def restore_sampling(self, saved, session: ChatSession):
        """Temperature and top-p as saved, after any load (which would set the model's defaults)."""
        loaded = self.handlers.model_of(session)
        if loaded is not None:
            session.sampling_model = loaded.ref.label  # the sliders now hold this tab's own values
        settings = saved.get("settings", {}) if isinstance(saved, dict) else {}
        values = []
        for key, low, high in (("temperature", 0.0, TEMPERATURE_MAX), ("top_p", TOP_P_MIN, 1.0)):
            number = _number(settings.get(key))
            values.append(number if number is not None and low <= number <= high else gr.skip())
        return values

    # ----- files ---------------------------------------------------------------------
    def export(self, kind: str, history, model, quant, *settings) -> str:
        """Write the chat as `kind` ("json" or "md") to a new file; its path for the download box."""
        chat = self.snapshot(history, model, quant, *settings)
        text = to_json(chat) if kind == "json" else to_markdown(chat)
        path = Path(tempfile.mkdtemp(prefix="smallchat-chat-")) / f"chat-{time.strftime('%Y%m%d-%H%M%S')}.{kind}"
        path.write_text(text, encoding="utf-8")
        return str(path)

    def import_file(self, path: str | None, session: ChatSession, lang: str):
        """A chat file into the tab (chat + settings), or a clear error with the current chat kept."""
        keep = [gr.skip()] * (1 + len(SETTING_KEYS))
        if path is None:
            return keep + [""]
        if session.answering:  # the chat is being written into: replacing it now would be undone by the stream
            gr.Warning(t("answer_running", lang))
            return keep + [t("persist_import_failed", lang, error=t("answer_running", lang))]
        name = Path(path).name
        try:
            size = os.path.getsize(path)
            if size > self.max_import_bytes:  # never read a huge file into memory to refuse it
                raise ChatFileError(f"The file is {size:,} bytes; chat imports are limited to "
                                    f"{self.max_import_bytes:,} bytes ({self.max_import_bytes / 2**20:g} MiB).")
            chat = from_json(Path(path).read_bytes(), self.max_import_bytes)
            settings = self._settings_updates(chat, lang)
        except (ChatFileError, OSError) as e:
            gr.Warning(t("persist_import_failed", lang, error=str(e)))
            return keep + [t("persist_import_failed", lang, error=str(e))]
        note = t("persist_imported", lang, n=len(chat.messages), name=name)
        loaded = self.handlers.model_of(session)
        if chat.model and (loaded is None or chat.model != loaded.ref.label or chat.quant != loaded.settings.quant.value):
            current = f"{loaded.ref.label} ({loaded.settings.quant.value})" if loaded else "–"
            note += " " + t("persist_other_model", lang, model=chat.model, quant=chat.quant or "none", current=current)
        return [chat.messages] + settings + [note]

    # ----- the page ------------------------------------------------------------------
    def build(self, i18n):
        """The saved-chat state and the export/import controls (call inside the chat column)."""
        self.saved = gr.BrowserState(None, storage_key=STORAGE_KEY, secret=self.secret)
        self.ready = gr.State(False)
        with gr.Row():
            self.export_json = gr.Button(i18n("persist_export_json"), size="sm", elem_id="export-json")
            self.export_md = gr.Button(i18n("persist_export_md"), size="sm", elem_id="export-md")
            self.importer = gr.UploadButton(i18n("persist_import"), file_types=[".json"], file_count="single",
                                            size="sm", elem_id="import-json")
        self.note = gr.Markdown(elem_id="persist-note")
        self.file = gr.File(label=i18n("persist_file"), interactive=False, visible=False, elem_id="export-file")

    def wire(self, demo: gr.Blocks, chatbot, session, lang, model, quant, settings: list, model_inputs: list,
             load_outputs: list, after_load, start) -> tuple:
        """Connect the controls: `start` is the page's first load event (the restore chains after it),
        `settings` the components of SETTING_KEYS in order. Returns the save step to chain after chat edits."""
        state = [chatbot, model, quant] + settings
        save_step = (self.save, [self.ready] + state, self.saved)
        private = {"api_visibility": "private"}
        start.then(self.restore, [self.saved, session, lang], [chatbot] + settings + [model, quant, self.note, self.ready],
                   queue=False, show_progress="hidden", **private).then(
            self.load_restored, [self.saved] + model_inputs, load_outputs, **private).then(
            self.restore_sampling, [self.saved, session], [settings[1], settings[2]], queue=False,
            show_progress="hidden", **private).then(*after_load, **private)
        # Settings are saved when the user changes them; the model boxes once a load has settled (the
        # status changes after every load, failed ones included, when the boxes show the model in use).
        for control in settings:
            event = control.blur if isinstance(control, gr.Textbox) else control.input
            event(*save_step, queue=False, show_progress="hidden", **private)
        load_outputs[0].change(*save_step, queue=False, show_progress="hidden", **private)
        for kind, button in (("json", self.export_json), ("md", self.export_md)):
            button.click(lambda *values, kind=kind: gr.update(value=self.export(kind, *values), visible=True), state,
                         self.file, **private)
        self.importer.upload(self.import_file, [self.importer, session, lang], [chatbot] + settings + [self.note],
                             **private).then(*save_step, queue=False, show_progress="hidden", **private)
        lang.change(self.relabel, lang, [self.export_json, self.export_md, self.importer, self.file], queue=False,
                    **private)
        return save_step

    def relabel(self, code: str):
        """The export/import controls in language `code`."""
        return [gr.update(value=t("persist_export_json", code)), gr.update(value=t("persist_export_md", code)),
                gr.update(label=t("persist_import", code)), gr.update(label=t("persist_file", code))]
