"""The JSON objects OpenAI clients expect: model list, chat completion, streamed chunk, usage.

Our own figures (the wait for the GPU, TTFT from the request, decode speed) travel as an extra
top-level `smallchat` object on the completion and on the streamed chunk that finishes the answer,
and as X-Smallchat-* headers on a plain completion: OpenAI clients keep unknown fields
(`completion.model_extra["smallchat"]` in the openai package) and the schema stays valid.
"""

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


def _r(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 3)


def timings(done: Done) -> dict:
    """The `smallchat` extension: seconds waited for the GPU, TTFT from the request and after its turn, tok/s."""
    return {"waited_s": _r(done.waited_s), "ttft_s": _r(done.ttft_s), "ttft_after_turn_s": _r(done.turn_ttft_s),
            "tokens_per_s": None if done.tokens_per_s is None else round(done.tokens_per_s, 2)}


def timing_headers(done: Done) -> dict[str, str]:
    """The same figures as response headers (absent where unknown), for clients that read only headers."""
    figures = {"X-Smallchat-Waited-S": done.waited_s, "X-Smallchat-TTFT-S": done.ttft_s,
               "X-Smallchat-TTFT-After-Turn-S": done.turn_ttft_s, "X-Smallchat-Tokens-Per-S": done.tokens_per_s}
    return {name: f"{value:.3f}" for name, value in figures.items() if value is not None}


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
            "usage": usage(done), "smallchat": timings(done),
        }

    def chunk(self, delta: dict, finish_reason: str | None = None, done: Done | None = None) -> dict:
        """One streamed chunk with one choice; the finishing one (`done`) carries the `smallchat` figures."""
        chunk = {
            "id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
        }
        if done is not None:
            chunk["smallchat"] = timings(done)
        return chunk

    def usage_chunk(self, done: Done) -> dict:
        """The last chunk when stream_options.include_usage is set: no choices, only usage."""
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [], "usage": usage(done)}


def sse(obj: dict | str) -> str:
    """One server-sent event: `data: <json>` (or a literal such as [DONE]) and a blank line."""
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)
    return f"data: {data}\n\n"
