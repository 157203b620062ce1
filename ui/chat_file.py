"""A chat as a file: the JSON the browser keeps and exports (lossless, re-importable), and Markdown to read.

One schema serves the browser's saved copy (gr.BrowserState) and exported/imported files:

    {"format": "smallchat-chat", "version": 1, "model": "smollm2-135m-instruct", "quant": "none",
     "settings": {"temperature": 0.2, ...},
     "messages": [{"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello!"},
                  {"role": "assistant", "content": "", "metadata": {"title": "TTFT 0.12 s · …", "status": "done"}}]}

Messages with `metadata` are the chat's UI-only lines (per-answer metrics, notices, a message
marked not sent): kept as they are, so an imported chat looks and behaves as it did. Everything
read back is checked, since a file (or the browser's storage) may hold anything.
"""

from __future__ import annotations

import json
import unicodedata
from dataclasses import dataclass, field

FORMAT = "smallchat-chat"
VERSION = 1
MAX_IMPORT_BYTES = 4 * 1024 * 1024  # a long chat is ~100 KB; the browser's storage holds ~5 MB in all
MAX_MESSAGES = 10_000

ROLES = ("user", "assistant")
# Gradio's message metadata (gradio.components.chatbot.MetadataDict) and each field's types.
METADATA_TYPES: dict[str, tuple[type, ...]] = {"title": (str,), "id": (str, int), "parent_id": (str, int), "log": (str,),
                                               "duration": (int, float), "status": (str,)}
# Settings a chat carries, and each one's type (ranges are the UI's to check: ui/handlers.read_number).
SETTING_TYPES: dict[str, tuple[type, ...]] = {
    "system_prompt": (str,), "temperature": (int, float), "top_p": (int, float), "max_new_tokens": (int,),
    "kv_precision": (str,), "overflow": (str,), "context_tokens": (int,), "double_quant": (bool,),
}


class ChatFileError(ValueError):
    """A chat file (or saved chat) that cannot be read; the message says what is wrong and where."""


@dataclass(frozen=True)
class SavedChat:
    """A chat with the model choice and settings it was written with."""

    messages: list[dict] = field(default_factory=list)
    model: str = ""
    quant: str = ""
    settings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """The JSON-ready form (what the browser stores and an export holds)."""
        return {"format": FORMAT, "version": VERSION, "model": self.model, "quant": self.quant,
                "settings": dict(self.settings), "messages": [dict(m) for m in self.messages]}


def clean_messages(history: list[dict]) -> list[dict]:
    """Chatbot messages as the file stores them: role, text content, and metadata without empty fields."""
    out = []
    for message in history:
        item = {"role": message.get("role", "assistant"), "content": message.get("content") or ""}
        metadata = {k: v for k, v in (message.get("metadata") or {}).items() if v is not None and k in METADATA_TYPES}
        if metadata:
            item["metadata"] = metadata
        out.append(item)
    return out


def to_json(chat: SavedChat) -> str:
    """The chat as JSON text (UTF-8, indented: a person may read it)."""
    return json.dumps(chat.to_dict(), ensure_ascii=False, indent=1)


def from_json(data: bytes | str, max_bytes: int = MAX_IMPORT_BYTES) -> SavedChat:
    """Read an exported chat, checking size, encoding, JSON, schema, types and characters (ChatFileError)."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    if len(raw) > max_bytes:
        raise ChatFileError(f"The file is {len(raw):,} bytes; chat imports are limited to {max_bytes:,} bytes "
                            f"({max_bytes / 2**20:g} MiB).")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ChatFileError(f"The file is not UTF-8 text (bad byte at position {e.start}).") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ChatFileError(f"The file is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}.") from None
    return from_dict(obj)


def from_dict(obj) -> SavedChat:
    """A SavedChat from its JSON form, every field checked (ChatFileError naming the first problem)."""
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise ChatFileError(f'This is not a Small LLM Lab chat: expected a JSON object with "format": "{FORMAT}".')
    version = obj.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= VERSION:
        raise ChatFileError(f'Unsupported chat version {version!r}: this app reads version {VERSION}.')
    unknown = sorted(set(obj) - {"format", "version", "model", "quant", "settings", "messages"})
    if unknown:
        raise ChatFileError(f"Unknown field {unknown[0]!r} at the top level.")
    model, quant = obj.get("model", ""), obj.get("quant", "")
    for name, value in (("model", model), ("quant", quant)):
        _check_text(value, f'"{name}"')
    settings = obj.get("settings", {})
    if not isinstance(settings, dict):
        raise ChatFileError('"settings" must be an object like {"temperature": 0.2}.')
    for key, value in settings.items():
        if key not in SETTING_TYPES:
            raise ChatFileError(f"Unknown setting {key!r}; known: {', '.join(SETTING_TYPES)}.")
        _check_type(value, SETTING_TYPES[key], f'setting "{key}"')
        if isinstance(value, str):
            _check_text(value, f'setting "{key}"')
    messages = obj.get("messages")
    if not isinstance(messages, list):
        raise ChatFileError('"messages" must be a list of {"role": ..., "content": ...} objects.')
    if len(messages) > MAX_MESSAGES:
        raise ChatFileError(f"The chat has {len(messages):,} messages; at most {MAX_MESSAGES:,} are read.")
    return SavedChat(messages=[_message(m, i + 1) for i, m in enumerate(messages)], model=model, quant=quant,
                     settings=dict(settings))


def _message(message, number: int) -> dict:
    where = f"message {number}"
    if not isinstance(message, dict):
        raise ChatFileError(f'{where} must be an object like {{"role": "user", "content": "Hi"}}.')
    unknown = sorted(set(message) - {"role", "content", "metadata"})
    if unknown:
        raise ChatFileError(f"{where}: unknown field {unknown[0]!r}.")
    if message.get("role") not in ROLES:
        raise ChatFileError(f'{where}: "role" must be "user" or "assistant" (got {message.get("role")!r:.40}).')
    content = message.get("content")
    _check_text(content, f"{where}'s content")
    item = {"role": message["role"], "content": content}
    metadata = message.get("metadata")
    if metadata is not None:
        if not isinstance(metadata, dict):
            raise ChatFileError(f'{where}: "metadata" must be an object.')
        for key, value in metadata.items():
            if key not in METADATA_TYPES:
                raise ChatFileError(f"{where}: unknown metadata field {key!r}.")
            _check_type(value, METADATA_TYPES[key], f"{where}'s metadata {key!r}")
            if isinstance(value, str):
                _check_text(value, f"{where}'s metadata {key!r}")
        if metadata.get("status") not in (None, "pending", "done"):
            raise ChatFileError(f'{where}: metadata "status" must be "pending" or "done".')
        if metadata:
            item["metadata"] = dict(metadata)
    return item


def _check_type(value, types: tuple[type, ...], what: str) -> None:
    # bool is an int in Python; a true/false where a number belongs is still wrong.
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        words = {"str": "text", "int": "a whole number", "float": "a number", "bool": "true/false"}
        names = " or ".join(words[t.__name__] for t in types if not (t is int and float in types))
        raise ChatFileError(f"{what} must be {names} (got {type(value).__name__} {json.dumps(value)[:40]}).")


def _check_text(value, what: str) -> None:
    """Text without control characters other than tab and newlines, and without lone surrogates."""
    if not isinstance(value, str):
        raise ChatFileError(f"{what} must be text (got {type(value).__name__}).")
    for i, char in enumerate(value):
        if char in "\t\n\r":
            continue
        if unicodedata.category(char) in ("Cc", "Cs"):
            raise ChatFileError(f"{what} contains a control character (U+{ord(char):04X}) at position {i}; "
                                "a chat holds only printable text.")


def to_markdown(chat: SavedChat) -> str:
    """The chat as Markdown to read or share (not re-importable: export JSON for that)."""
    lines = ["# Chat (Small LLM Lab)", ""]
    if chat.model:
        lines.append(f"- Model: `{chat.model}` ({chat.quant or 'none'})")
    shown = {k: v for k, v in chat.settings.items() if k != "system_prompt"}
    if shown:
        lines.append("- Settings: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in shown.items()))
    if (chat.settings.get("system_prompt") or "").strip():
        lines += ["- System prompt:", "", _quote(chat.settings["system_prompt"])]
    lines.append("")
    for message in chat.messages:
        metadata = message.get("metadata") or {}
        if metadata and message["role"] == "assistant" and not message["content"]:
            note = metadata.get("title", "") + (f" — {metadata['log']}" if metadata.get("log") else "")
            lines += [f"> *{note}*", ""]
            continue
        head = "**You**" if message["role"] == "user" else "**Assistant**"
        if metadata.get("title"):
            head += f" ({metadata['title']})"
        lines += [head, "", message["content"], ""]
    return "\n".join(lines).rstrip() + "\n"


def _quote(text: str) -> str:
    return "\n".join("> " + line for line in text.splitlines())
