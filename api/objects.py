"""The JSON objects OpenAI clients expect: model list, chat completion, streamed chunk, usage."""

from __future__ import annotations

import json
import time
import uuid

from .service import Done

OWNER = "small-llm-lab"


def model_list(entries: list[tuple[str, dict]]) -> dict:
    """GET /v1/models: OpenAI's fields for each (id, our own fields such as "resident") entry."""
    now = int(time.time())
    return {"object": "list", "data": [{"id": i, "object": "model", "created": now, "owned_by": OWNER, **fields}
                                       for i, fields in entries]}


def usage(done: Done) -> dict:
    """`usage`, with the tokens served from the conversation's KV cache as OpenAI's cached_tokens."""
    return {
        "prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
        "total_tokens": done.prompt_tokens + done.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": done.cached_tokens},
    }


class CompletionIds:
    """The id, creation time and model every object of one answer shares."""

    def __init__(self, model: str):
        self.id = "chatcmpl-" + uuid.uuid4().hex
        self.created = int(time.time())
        self.model = model

    def completion(self, text: str, done: Done) -> dict:
        """A non-streamed chat completion."""
        return {
            "id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": done.finish_reason, "logprobs": None}],
            "usage": usage(done),
        }

    def chunk(self, delta: dict, finish_reason: str | None = None) -> dict:
        """One streamed chunk with one choice."""
        return {
            "id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
        }

    def usage_chunk(self, done: Done) -> dict:
        """The last chunk when stream_options.include_usage is set: no choices, only usage."""
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [], "usage": usage(done)}


def sse(obj: dict | str) -> str:
    """One server-sent event: `data: <json>` (or a literal such as [DONE]) and a blank line."""
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)
    return f"data: {data}\n\n"
