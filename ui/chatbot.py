"""The chat component: Gradio's Chatbot, with the user's messages shown as the literal text typed.

Gradio renders every message as Markdown with sanitized HTML, so a typed `<img src=x onerror=…>`
becomes a broken image that fetches /x and `<script>` an empty bubble. Here user messages are
escaped on the way to the browser and unescaped on the way back, so handlers, the model and
exports always see the raw text. Model answers are still Markdown, sanitized by Gradio.
"""

from __future__ import annotations

from typing import Any

import gradio as gr
from gradio.components.chatbot import ChatbotDataMessages
from pydantic import ValidationError, model_validator

from .chat_history import content_text, from_literal_markdown, to_literal_markdown

ROLES = ("user", "assistant", "system")


class ChatHistoryData(ChatbotDataMessages):
    """The Chatbot's wire format, also accepting plain-string content (as OpenAI-style clients send it)."""

    @model_validator(mode="before")
    @classmethod
    def _plain_strings(cls, value: Any) -> Any:
        root = value.get("root") if isinstance(value, dict) and "root" in value else value
        if not isinstance(root, list):
            raise ValueError("The chat history must be a list of messages like {\"role\": \"user\", \"content\": \"Hi\"}.")
        out = []
        for i, message in enumerate(root):
            if not isinstance(message, dict) or message.get("role") not in ROLES:
                raise ValueError(f"Message {i} must be a dict with a role of {', '.join(ROLES)} and a content.")
            content = message.get("content")
            if isinstance(content, str):
                content = [{"type": "text", "text": content}]
            elif not isinstance(content, list):
                raise ValueError(f"Message {i}: content must be a string or a list of parts like "
                               "{\"type\": \"text\", \"text\": \"Hi\"}.")
            out.append({**message, "content": content})
        return out

    @classmethod
    def model_validate(cls, obj, **kwargs):
        """Validate, turning a pydantic error into a gr.Error an API caller can read (no traceback)."""
        try:
            return super().model_validate(obj, **kwargs)
        except ValidationError as e:
            first = e.errors()[0]
            cause = (first.get("ctx") or {}).get("error")
            where = ".".join(str(p) for p in first.get("loc", ()))
            raise gr.Error(str(cause) if cause else f"Bad chat history at {where or 'top level'}: {first['msg']}") from None


class LiteralChatbot(gr.Chatbot):
    """gr.Chatbot whose user messages display as typed; its value for handlers is the raw text."""

    data_model = ChatHistoryData

    def get_block_name(self) -> str:
        """The browser side is Gradio's own chatbot."""
        return "chatbot"

    def preprocess(self, payload):
        """The browser's history with the user's messages unescaped back to what was typed."""
        messages = super().preprocess(payload)
        for message in messages:
            if message.get("role") == "user":
                message["content"] = [
                    {**part, "text": from_literal_markdown(part["text"])} if part.get("type") == "text" else part
                    for part in message["content"]
                ]
        return messages

    def postprocess(self, value):
        """The history with each user message escaped, so the browser shows its literal text."""
        if value is None:
            return super().postprocess(value)
        shown = []
        for message in value:
            if isinstance(message, dict) and message.get("role") == "user":
                # A text part, not a str: Gradio's str path runs inspect.cleandoc, which eats indentation.
                message = {**message, "content": [{"type": "text",
                                                   "text": to_literal_markdown(content_text(message.get("content")))}]}
            shown.append(message)
        return super().postprocess(shown)
