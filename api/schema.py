"""Validate an /v1/chat/completions body into a ChatRequest; every wrong field is a 400 naming it.

Unknown fields are ignored (OpenAI clients send many); fields we cannot honour with a
non-default value (n > 1, tools, logprobs, penalties) are refused rather than silently dropped.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from .errors import ApiError, bad_request

ROLES = {"system", "user", "assistant", "developer"}
MAX_STOPS = 4  # as OpenAI's API
MAX_STOP_CHARS = 200
MAX_BODY_BYTES = 4 << 20  # a chat far beyond any small model's context is refused before parsing


@dataclass(frozen=True)
class ChatRequest:
    """A validated chat completion request."""

    messages: list[dict]  # [{"role", "content": str}], "developer" already mapped to "system"
    model: str | None  # None: whatever the app has loaded
    max_tokens: int | None  # None: the server's default
    temperature: float = 1.0  # OpenAI's default; 0 means greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk carries `usage`
    user: str | None = None


def parse_json(raw: bytes) -> dict:
    """The request body as a JSON object, or a 400 saying what is wrong with it."""
    if len(raw) > MAX_BODY_BYTES:
        raise ApiError(413, f"The request body is over {MAX_BODY_BYTES >> 20} MiB.", code="body_too_large")
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad_request(f"The request body is not valid JSON: {e}.", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.", code="invalid_json")
    return body


def _number(body: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    # bool is an int in Python, but `"temperature": true` is a client bug worth naming.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad_request(f"'{name}' must be a number, got {json.dumps(value)}.", param=name, code="invalid_type")
    if value < low or value > high or (low_open and value == low):
        bracket = "(" if low_open else "["
        raise bad_request(f"'{name}' must be in {bracket}{low}, {high}], got {value}.", param=name)
    return float(value)


def _integer(body: dict, name: str, low: int, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(f"'{name}' must be an integer, got {json.dumps(value)}.", param=name, code="invalid_type")
    if value < low or (high is not None and value > high):
        raise bad_request(f"'{name}' must be at least {low}" + (f" and at most {high}" if high is not None else "")
                          + f", got {value}.", param=name)
    return value


def _boolean(body: dict, name: str, where: str | None = None) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad_request(f"'{where or name}' must be true or false, got {json.dumps(value)}.",
                          param=where or name, code="invalid_type")
    return value


def _string(body: dict, name: str) -> str | None:
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise bad_request(f"'{name}' must be a string, got {json.dumps(value)}.", param=name, code="invalid_type")
    return value


def _valid_text(text: str, where: str) -> str:
    """`text` if it is valid Unicode; a 400 naming the field if it holds half of a surrogate pair ("\\ud800")."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise bad_request(f"'{where}' is not valid Unicode text: an unpaired surrogate {text[e.start]!a} at character "
                          f"{e.start + 1}.", param=where) from None
    return text


def _content(value, where: str) -> str:
    """Message content as text: a string, or a list of {"type": "text", "text": ...} parts joined."""
    if isinstance(value, str):
        return _valid_text(value, where)
    if isinstance(value, list):
        texts = []
        for j, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise bad_request(f"'{where}[{j}]' must be a text part {{\"type\": \"text\", \"text\": \"...\"}}; "
                                  f"got {kind!r} (this server handles text only).", param=f"{where}[{j}]")
            texts.append(part["text"])
        return _valid_text("".join(texts), where)
    raise bad_request(f"'{where}' must be a string or a list of text parts, got {json.dumps(value)}.",
                      param=where, code="invalid_type")


def _messages(value) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise bad_request("'messages' must be a non-empty list of {\"role\", \"content\"} objects.",
                          param="messages", code="invalid_type" if not isinstance(value, list) else "invalid_value")
    messages = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad_request(f"'{where}' must be an object with 'role' and 'content'.", param=where, code="invalid_type")
        role = message.get("role")
        if role not in ROLES:
            raise bad_request(f"'{where}.role' must be one of {', '.join(sorted(ROLES))}; got {json.dumps(role)} "
                              "(tool calls are not supported).", param=f"{where}.role")
        if message.get("tool_calls"):
            raise bad_request(f"'{where}.tool_calls': tool calls are not supported.", param=f"{where}.tool_calls")
        if "content" not in message or message["content"] is None:
            raise bad_request(f"'{where}.content' is missing.", param=f"{where}.content")
        # Chat templates know "system"; OpenAI's newer "developer" role means the same.
        messages.append({"role": "system" if role == "developer" else role,
                         "content": _content(message["content"], f"{where}.content")})
    if all(m["role"] == "system" for m in messages):
        raise bad_request("'messages' needs at least one user or assistant message.", param="messages")
    return messages


def _stops(value) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad_request("'stop' must be a string or a list of strings.", param="stop", code="invalid_type")
    if len(stops) > MAX_STOPS:
        raise bad_request(f"'stop' takes at most {MAX_STOPS} strings, got {len(stops)}.", param="stop")
    if any(not s or len(s) > MAX_STOP_CHARS for s in stops):
        raise bad_request(f"Each 'stop' string must have 1 to {MAX_STOP_CHARS} characters.", param="stop")
    return tuple(stops)


def _refuse_unsupported(body: dict) -> None:
    """Fields that would change the answer and that this server cannot honour."""
    n = _integer(body, "n", 1)
    if n not in (None, 1):
        raise bad_request("'n' must be 1: this server returns one choice per request.", param="n")
    for name in ("tools", "functions"):
        if body.get(name):
            raise bad_request(f"'{name}' is not supported by this server.", param=name, code="unsupported")
    if body.get("logprobs"):
        raise bad_request("'logprobs' is not supported by this server.", param="logprobs", code="unsupported")
    for name in ("presence_penalty", "frequency_penalty"):
        if _number(body, name, 0.0, -2.0, 2.0) != 0.0:
            raise bad_request(f"'{name}' is not supported (only 0).", param=name, code="unsupported")
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise bad_request("'response_format' supports only {\"type\": \"text\"}.", param="response_format",
                          code="unsupported")


def parse_chat_request(body: dict) -> ChatRequest:
    """Validate a chat completion body (already a JSON object) into a ChatRequest."""
    model = _string(body, "model")
    messages = _messages(body.get("messages"))
    _refuse_unsupported(body)
    # max_completion_tokens is the newer name; when both are given, the newer one wins.
    max_tokens = _integer(body, "max_completion_tokens", 1)
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens", 1)
    stream = _boolean(body, "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad_request("'stream_options' must be an object.", param="stream_options", code="invalid_type")
    include_usage = _boolean(options or {}, "include_usage", "stream_options.include_usage")
    seed = _integer(body, "seed", -(2 ** 63), 2 ** 63 - 1)
    return ChatRequest(
        messages=messages, model=model or None, max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0), top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
        # torch.manual_seed takes any 64-bit int; a negative seed is folded into that range.
        seed=None if seed is None else seed % (2 ** 63), stop=_stops(body.get("stop")), stream=stream,
        include_usage=stream and include_usage, user=_string(body, "user"),
    )
