"""Chat history as the Chatbot holds it (Gradio messages), and what the model gets to see.

The Chatbot history also carries UI-only messages: per-answer metrics and notices are
assistant messages with `metadata` (shown as a small titled line). They are never sent
to the model.
"""

from __future__ import annotations

from typing import Any


def content_text(content: Any) -> str:
    """Plain text of a message's content (Gradio 6 may send a list of typed parts)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text") or content.get("content") or "")
    if isinstance(content, (list, tuple)):
        return "".join(content_text(part) for part in content)
    return str(content)


def is_ui_only(message: dict) -> bool:
    """Metrics and notices shown in the chat but not part of the conversation."""
    return bool(message.get("metadata"))


def model_messages(history: list[dict], system_prompt: str = "") -> list[dict]:
    """The conversation for the chat template: system prompt (if any) + user/assistant turns."""
    messages = [{"role": "system", "content": system_prompt.strip()}] if system_prompt.strip() else []
    for message in history:
        if is_ui_only(message) or message.get("role") not in ("user", "assistant"):
            continue
        messages.append({"role": message["role"], "content": content_text(message.get("content"))})
    return messages


def ui_note(title: str, log: str = "", pending: bool = False) -> dict:
    """A UI-only line in the chat (metrics of an answer, a notice, an error; `pending`: a spinner, e.g. waiting)."""
    metadata = {"title": title, "status": "pending" if pending else "done"}
    if log:
        metadata["log"] = log
    return {"role": "assistant", "content": "", "metadata": metadata}


UNSENT = "unsent"  # metadata id of a user message the model refused (too long): kept, never sent again


def mark_unsent(history: list[dict], title: str) -> None:
    """Mark the last user message as not sent (UI-only from now on), with a title saying why."""
    i = last_user_index(history)
    if i is not None:
        history[i]["metadata"] = {"title": title, "id": UNSENT, "status": "done"}


def unsent_text(history: list[dict]) -> str | None:
    """The text of the chat's last user message if it is marked unsent (None otherwise)."""
    for message in reversed(history):
        if message.get("role") == "user":
            if (message.get("metadata") or {}).get("id") == UNSENT:
                return content_text(message.get("content"))
            return None
    return None


def last_user_index(history: list[dict]) -> int | None:
    """Index of the last user message, or None."""
    for i in range(len(history) - 1, -1, -1):
        if history[i].get("role") == "user" and not is_ui_only(history[i]):
            return i
    return None


def drop_last_answer(history: list[dict]) -> list[dict]:
    """History up to and including the last user message (for Regenerate)."""
    i = last_user_index(history)
    return list(history) if i is None else list(history[: i + 1])


def drop_last_turn(history: list[dict]) -> tuple[list[dict], str]:
    """History before the last user message, and that message's text (for Undo)."""
    i = last_user_index(history)
    if i is None:
        return list(history), ""
    return list(history[:i]), content_text(history[i].get("content"))


def normalize(history: list[dict] | None) -> list[dict]:
    """A clean copy of the Chatbot value: dicts with text content (metadata kept)."""
    out = []
    for message in history or []:
        item = {"role": message.get("role", "assistant"), "content": content_text(message.get("content"))}
        if message.get("metadata"):
            item["metadata"] = dict(message["metadata"])
        out.append(item)
    return out


# ASCII punctuation: CommonMark lets a backslash make any of these literal, so a text with every
# one of them escaped renders as exactly the characters typed (no HTML, links, code or emphasis).
_PUNCT = frozenset("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")


def to_literal_markdown(text: str) -> str:
    """`text` as Markdown that renders as the literal characters (typed HTML stays text)."""
    return "".join("\\" + c if c in _PUNCT else c for c in text)


def is_literal_markdown(text: str) -> bool:
    """Whether `text` is to_literal_markdown's output (every punctuation mark backslash-escaped)."""
    i = 0
    while i < len(text):
        if text[i] in _PUNCT:
            if text[i] != "\\" or i + 1 >= len(text) or text[i + 1] not in _PUNCT:
                return False
            i += 2
        else:
            i += 1
    return True


def from_literal_markdown(text: str) -> str:
    """The typed text back from to_literal_markdown's output; other text is returned as is."""
    if not is_literal_markdown(text):
        return text  # e.g. an API client's raw message
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\":
            i += 1
        out.append(text[i])
        i += 1
    return "".join(out)
