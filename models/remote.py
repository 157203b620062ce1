"""Remote OpenAI-compatible engines (vLLM, LMDeploy, the llama.cpp server, Ollama, another instance
of this app) used as models.

A model choice `openai:http://HOST:PORT/v1` names a running server; `#NAME` picks one of its
models (default: the first one /v1/models lists). The API key, if the server wants one, comes from
the environment variable SMALLCHAT_REMOTE_API_KEY, or from the variable named by `?key_env=VAR`
(`openai:http://HOST:PORT/v1#NAME?key_env=VAR`), so a key never appears in a model box or a CSV.

The engine (models/engine.py) keeps a connected server as a resident "model" that holds no local
memory: its weights and KV cache live in the engine's own memory. Answers stream as server-sent
events from /v1/chat/completions and come out as the same StreamUpdates as local generation.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from dataclasses import dataclass
from typing import Iterator
from urllib.parse import parse_qs, urlsplit

import httpx

from .backend import AnswerRequest
from .catalog import ModelRef, UnknownModelError
from .generation import GenerationStats, SamplingSettings, StreamUpdate
from .loading import LoadedModel
from .settings import LoadSettings, ModelLoadError
from .memory import FitPlan, Verdict
from .messages import Message

PREFIX = "openai:"
DEFAULT_KEY_ENV = "SMALLCHAT_REMOTE_API_KEY"
TIMEOUT_ENV = "SMALLCHAT_REMOTE_TIMEOUT"  # seconds to wait for a server's next bytes (default 120)
CONNECT_TIMEOUT_S = 5.0
CHECK_TIMEOUT_S = 10.0  # the /v1/models check at load
METRICS_TIMEOUT_S = 1.0  # the memory panel refreshes on a timer: never wait long for it
DEVICE = "remote"  # LoadedModel.device of a remote model

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# vLLM's engine-wide KV cache use, a fraction 0..1 (older releases: vllm:gpu_cache_usage_perc).
_METRICS = {
    "kv_cache_usage": ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
    "running": ("vllm:num_requests_running",),
    "waiting": ("vllm:num_requests_waiting",),
}


class RemoteEngineError(ModelLoadError):
    """A remote engine could not be reached, refused, or answered with an error; the message says which."""


@dataclass(frozen=True)
class RemoteSpec:
    """Where a remote engine is: its API base URL, which model, and where its key comes from."""

    base_url: str  # e.g. http://127.0.0.1:8000/v1, no trailing slash
    model: str = ""  # "" = the server's first model
    key_env: str = DEFAULT_KEY_ENV

    @property
    def location(self) -> str:
        """The canonical model choice, 'openai:URL[#MODEL][?key_env=VAR]' (what parse_remote reads)."""
        text = PREFIX + self.base_url + (f"#{self.model}" if self.model else "")
        if self.key_env != DEFAULT_KEY_ENV:
            text += ("" if self.model else "#") + f"?key_env={self.key_env}"
        return text

    def headers(self) -> dict[str, str]:
        """Request headers, with the bearer key if its environment variable is set."""
        key = os.environ.get(self.key_env, "")
        return {"Authorization": f"Bearer {key}"} if key else {}


@dataclass(frozen=True)
class EngineMetrics:
    """What a remote engine reports about itself on /metrics (vLLM's Prometheus names); None = not reported."""

    kv_cache_usage: float | None = None  # fraction of the engine's KV cache in use, 0..1
    running: int | None = None
    waiting: int | None = None


def is_remote(choice: str | None) -> bool:
    """Whether a model choice names a remote OpenAI-compatible engine."""
    return (choice or "").strip().lower().startswith(PREFIX)


def parse_remote(choice: str) -> RemoteSpec:
    """Parse 'openai:URL[#MODEL][?key_env=VAR]' (UnknownModelError with the expected form if malformed)."""
    text = choice.strip()[len(PREFIX):].strip()
    url, _, fragment = text.partition("#")
    model, _, fragment_query = fragment.partition("?")
    parts = urlsplit(url)
    form = "expected openai:http://HOST:PORT/v1, optionally #MODEL and ?key_env=VAR"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UnknownModelError("remote_bad_url", choice=choice.strip(), form=form)
    query = {**parse_qs(parts.query), **parse_qs(fragment_query)}
    unknown = sorted(set(query) - {"key_env"})
    if unknown:
        raise UnknownModelError("remote_bad_option", choice=choice.strip(), options=", ".join(unknown), form=form)
    key_env = query.get("key_env", [DEFAULT_KEY_ENV])[-1]
    if not _ENV_NAME.match(key_env):
        raise UnknownModelError("remote_bad_key_env", choice=choice.strip(), key_env=key_env)
    base = f"{parts.scheme}://{parts.netloc}{parts.path}".rstrip("/")
    return RemoteSpec(base_url=base, model=model.strip(), key_env=key_env)


def remote_ref(choice: str) -> ModelRef:
    """The ModelRef of a remote choice (kind 'remote', location the canonical form)."""
    return ModelRef("remote", parse_remote(choice).location)


def read_timeout_s() -> float:
    """Seconds to wait for a server's next bytes before giving up ($SMALLCHAT_REMOTE_TIMEOUT, default 120)."""
    try:
        return max(0.1, float(os.environ.get(TIMEOUT_ENV, "120")))
    except ValueError:
        return 120.0


def _first_line(text: str, width: int = 300) -> str:
    line = (text.strip().splitlines() or [""])[0]
    return line if len(line) <= width else line[: width - 1] + "…"


def _server_message(response: httpx.Response) -> str:
    """The error text an OpenAI-style server put in its body ({"error": {"message": …}} or {"message": …})."""
    try:
        body = response.json()
    except ValueError:
        return _first_line(response.text)
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict):
            return _first_line(str(error.get("message") or error.get("detail") or body))
        return _first_line(str(error))
    return _first_line(str(body))


def _transport_error(spec: RemoteSpec, e: httpx.HTTPError, timeout_s: float) -> RemoteEngineError:
    """A clear message for a request that got no usable HTTP answer."""
    if isinstance(e, httpx.TimeoutException):
        return RemoteEngineError("remote_timeout", url=spec.base_url, seconds=f"{timeout_s:g}", env=TIMEOUT_ENV)
    if isinstance(e, httpx.ConnectError):
        detail = _first_line(str(e)) or "connection failed"
        return RemoteEngineError("remote_unreachable", url=spec.base_url, detail=detail)
    if isinstance(e, httpx.RemoteProtocolError):
        return RemoteEngineError("remote_closed", url=spec.base_url, detail=_first_line(str(e)))
    return RemoteEngineError("remote_request_failed", url=spec.base_url, kind=type(e).__name__, detail=_first_line(str(e)))


def _status_error(spec: RemoteSpec, response: httpx.Response, what: str) -> RemoteEngineError:
    """A clear message for an HTTP error status."""
    code = response.status_code
    detail = _server_message(response)
    if code in (401, 403):
        return RemoteEngineError("remote_key_refused", url=spec.base_url, status=code, detail=detail, env=spec.key_env)
    if code == 404 and what == "models":
        return RemoteEngineError("remote_not_openai", url=spec.base_url)
    return RemoteEngineError("remote_http_error", url=spec.base_url, status=code, what=what, detail=detail)


class RemoteModel:
    """One model of a running OpenAI-compatible server, checked at connect; streams chat answers."""

    def __init__(self, spec: RemoteSpec, name: str, max_context: int | None, served: list[str]):
        self.spec = spec
        self.name = name  # the model name the server knows
        self.max_context = max_context  # the server's context length for it, when it says (vLLM: max_model_len)
        self.served = served  # every model the server listed

    @property
    def label(self) -> str:
        """'openai:URL#NAME', the name resolved."""
        return PREFIX + self.spec.base_url + f"#{self.name}"

    @classmethod
    def connect(cls, spec: RemoteSpec, timeout_s: float | None = None) -> "RemoteModel":
        """Ask the server which models it serves (GET /models); raise RemoteEngineError if ours is not there."""
        timeout_s = timeout_s or min(CHECK_TIMEOUT_S, read_timeout_s())
        if spec.key_env != DEFAULT_KEY_ENV and spec.key_env not in os.environ:
            raise RemoteEngineError("remote_key_env_unset", env=spec.key_env)
        try:
            response = httpx.get(f"{spec.base_url}/models", headers=spec.headers(),
                                 timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, CONNECT_TIMEOUT_S)))
        except httpx.HTTPError as e:
            raise _transport_error(spec, e, timeout_s) from None
        if response.status_code != 200:
            raise _status_error(spec, response, "models")
        try:
            data = response.json()["data"]
            models = {str(m["id"]): m for m in data}
        except (ValueError, KeyError, TypeError):
            raise RemoteEngineError("remote_bad_model_list", url=spec.base_url,
                                    detail=_first_line(response.text, 120)) from None
        if not models:
            raise RemoteEngineError("remote_no_models", url=spec.base_url)
        name = spec.model or next(iter(models))
        if name not in models:
            raise RemoteEngineError("remote_no_model", url=spec.base_url, model=name, served=", ".join(models))
        max_context = models[name].get("max_model_len")
        return cls(spec, name, int(max_context) if isinstance(max_context, int) else None, list(models))

    def request_body(self, messages: list[dict], sampling: SamplingSettings) -> dict:
        """The /chat/completions request for a chat and sampling settings (streamed, with usage)."""
        greedy = sampling.temperature <= 0
        body = {
            "model": self.name, "messages": messages, "stream": True, "stream_options": {"include_usage": True},
            "max_tokens": sampling.max_new_tokens, "temperature": 0.0 if greedy else sampling.temperature,
            "top_p": 1.0 if greedy else sampling.top_p,
        }
        if sampling.seed is not None:
            body["seed"] = sampling.seed
        return body

    def answer(self, request: AnswerRequest) -> Iterator[StreamUpdate]:
        """The Backend interface: the server fits, templates and caches the chat itself (no GPU lock here)."""
        return self.stream(request.messages, request.sampling, request.stop_event)

    def stream(self, messages: list[dict], sampling: SamplingSettings,
               stop_event: threading.Event) -> Iterator[StreamUpdate]:
        """Stream an answer; the last update (done) has TTFT, tok/s, finish reason and the server's token counts.

        Stop (stop_event) is checked between chunks and closes the stream, which tells the server
        to abort the request; closing this iterator early does the same.
        """
        stats = GenerationStats(prompt_tokens=0)
        started = time.perf_counter()
        first = last = None
        text, chunks, finish, usage, stopped = "", 0, "", None, False
        timeout_s = read_timeout_s()
        timeout = httpx.Timeout(timeout_s, connect=min(timeout_s, CONNECT_TIMEOUT_S))
        try:
            with httpx.Client(timeout=timeout) as client, client.stream(
                "POST", f"{self.spec.base_url}/chat/completions", json=self.request_body(messages, sampling),
                headers=self.spec.headers(),
            ) as response:
                if response.status_code != 200:
                    response.read()
                    raise _status_error(self.spec, response, "the chat request")
                for line in response.iter_lines():
                    if stop_event.is_set():
                        stopped = True
                        break  # leaving the `with` closes the stream: the server aborts the request
                    if not line.startswith("data:"):
                        continue  # SSE comments, keep-alives, blank separators
                    data = line[len("data:"):].strip()
                    if data == "[DONE]":
                        break
                    chunk = self._parse_chunk(data)
                    usage = chunk.get("usage") or usage
                    for choice in chunk.get("choices") or []:
                        finish = choice.get("finish_reason") or finish
                        delta = (choice.get("delta") or {}).get("content") or ""
                        if not delta:
                            continue
                        last = time.perf_counter()
                        first = first or last
                        chunks += 1
                        text += delta
                        stats.new_tokens, stats.ttft_s = chunks, first - started
                        yield StreamUpdate(text=text, stats=stats)
        except httpx.HTTPError as e:
            raise _transport_error(self.spec, e, timeout_s) from None
        stats.total_s = time.perf_counter() - started
        if usage:  # the server's own token counts; without them (Stop), one content chunk ≈ one token
            stats.prompt_tokens = int(usage.get("prompt_tokens") or 0)
            stats.new_tokens = int(usage.get("completion_tokens") or chunks)
        if first is not None:
            stats.ttft_s = first - started
            if stats.new_tokens > 1 and last > first:
                stats.decode_tokens_per_s = (stats.new_tokens - 1) / (last - first)
        if stopped or (stop_event.is_set() and not finish):
            stats.finish_reason = "stopped"
        elif finish == "stop":
            stats.finish_reason = "eos"  # an end-of-sequence token or a stop string
        elif finish == "length":
            stats.finish_reason = "length"
        elif not finish:
            raise RemoteEngineError("remote_no_finish", url=self.spec.base_url, chunks=chunks)
        else:
            stats.finish_reason = finish
        yield StreamUpdate(text=text, stats=stats, done=True)

    def _parse_chunk(self, data: str) -> dict:
        try:
            chunk = json.loads(data)
        except ValueError:
            raise RemoteEngineError("remote_bad_chunk", url=self.spec.base_url, detail=_first_line(data, 120)) from None
        if not isinstance(chunk, dict):
            raise RemoteEngineError("remote_odd_chunk", url=self.spec.base_url, detail=_first_line(data, 120))
        if chunk.get("error"):  # vLLM reports errors that happen mid-stream inside the stream
            error = chunk["error"]
            message = error.get("message", error) if isinstance(error, dict) else error
            raise RemoteEngineError("remote_failed_mid_answer", url=self.spec.base_url, detail=_first_line(str(message)))
        return chunk

    def metrics(self, timeout_s: float = METRICS_TIMEOUT_S) -> EngineMetrics | None:
        """The engine's own KV-cache use and queue from its Prometheus /metrics, or None if it exposes none."""
        root = self.spec.base_url.removesuffix("/v1")
        try:
            response = httpx.get(f"{root}/metrics", headers=self.spec.headers(), timeout=timeout_s)
        except httpx.HTTPError:
            return None  # the panel then just says the memory is the engine's
        if response.status_code != 200:
            return None
        values = parse_prometheus(response.text)
        found = {field: next((values[n] for n in names if n in values), None) for field, names in _METRICS.items()}
        if all(v is None for v in found.values()):
            return None
        # One sample per engine (data-parallel ranks): the fullest cache, and the requests of all.
        return EngineMetrics(
            kv_cache_usage=None if found["kv_cache_usage"] is None else max(found["kv_cache_usage"]),
            running=None if found["running"] is None else int(sum(found["running"])),
            waiting=None if found["waiting"] is None else int(sum(found["waiting"])),
        )


def parse_prometheus(text: str) -> dict[str, list[float]]:
    """Each metric's samples, one per label set ('name{labels} value' lines; comments skipped)."""
    values: dict[str, list[float]] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, _, rest = line.rpartition("}") if "}" in line else line.partition(" ")
        name = name_labels.split("{", 1)[0].strip()
        fields = rest.split()
        if not name or not fields:
            continue
        try:
            values.setdefault(name, []).append(float(fields[0]))
        except ValueError:
            continue
    return values


def remote_plan(ref: ModelRef, settings: LoadSettings) -> FitPlan:
    """The 'plan' of a remote model: nothing is placed on this machine."""
    return FitPlan(
        verdict=Verdict.REMOTE, device=DEVICE, quant=settings.quant, context_tokens=settings.context_tokens,
        weights_bytes=0, gpu_weights_bytes=0, kv_bytes=0, workspace_bytes=0, cuda_context_bytes=0,
        predicted_peak_bytes=0, gpu_layers=0, cpu_layers=0, disk_layers=0, lm_head_on_gpu=False,
        reason=Message("plan_remote", {"url": parse_remote(ref.location).base_url}),
    )


def connect_loaded(ref: ModelRef, settings: LoadSettings) -> LoadedModel:
    """Check the server and return the remote model as a LoadedModel holding no local memory.

    `model` is the RemoteModel; tokenizer and shape are None (the server templates and
    tokenizes); device and dtype are 'remote'.
    """
    started = time.perf_counter()
    remote = RemoteModel.connect(parse_remote(ref.location))
    return LoadedModel(
        ref=ModelRef("remote", remote.label), model=remote, tokenizer=None, shape=None, settings=settings,
        dtype=DEVICE, device=DEVICE, plan=remote_plan(ref, settings), load_seconds=time.perf_counter() - started,
        weights_bytes=0,
    )


def remote_of(loaded: LoadedModel | None) -> RemoteModel | None:
    """The RemoteModel behind a loaded model, or None for a local one."""
    return loaded.model if loaded is not None and loaded.device == DEVICE else None
