"""The HTTP endpoints under /v1: models, chat completions (JSON or server-sent events), errors as JSON.

Everything a client can get wrong is answered before the response starts, with its status;
the answer itself runs in a worker thread (api/bridge.py). A client that goes away stops its
answer: while it waits or before the first token we poll for the disconnect; during a stream
Starlette cancels our generator and its `finally` sets the stop event.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import AsyncIterator, Awaitable, Callable

from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .auth import check_key
from .bridge import ThreadedStream
from .errors import ApiError, from_engine_error, internal_error
from .objects import CompletionIds, model_list, sse, timing_headers
from .schema import MAX_BODY_BYTES, parse_chat_request, parse_json
from .service import ApiService, Delta, Done
from .waiting import QueueFull

log = logging.getLogger("smallchat.api")

DISCONNECT_POLL_S = 0.25  # how soon a client that left while waiting frees its place


class ClientGone(Exception):
    """The client closed the connection before its answer was sent."""


def error_response(error: ApiError) -> JSONResponse:
    """An ApiError as OpenAI's JSON error body with its status and headers."""
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def _as_api_error(error: BaseException, where: str) -> ApiError:
    if isinstance(error, ApiError):
        return error
    return from_engine_error(error) or internal_error(error, where)


class _Watch:
    """Reads a stream's items while checking, at most every DISCONNECT_POLL_S, that the client is still there.

    Only until the response starts: then Starlette itself watches for the disconnect.
    """

    def __init__(self, stream: ThreadedStream, request: Request):
        self.stream = stream
        self.request = request
        self._checked = time.monotonic()

    async def _check(self) -> None:
        self._checked = time.monotonic()
        if await self.request.is_disconnected():
            self.stream.cancel()
            raise ClientGone

    async def next(self):
        """The stream's next item; ClientGone if the client left first."""
        while True:
            # Also between items: a long answer streams items without pause for minutes.
            if time.monotonic() - self._checked >= DISCONNECT_POLL_S:
                await self._check()
            try:
                return await self.stream.next(timeout=DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                await self._check()


class Api:
    """The endpoints, bound to a service and an API key (None: no key needed)."""

    def __init__(self, service: ApiService, api_key: str | None):
        self.service = service
        self._key = api_key  # never logged

    def _endpoint(self, handler: Callable[[Request], Awaitable[Response]]):
        """Wrap a handler: API key first; ApiError -> its JSON; anything unexpected -> logged 500, server keeps running."""
        async def endpoint(request: Request) -> Response:
            try:
                check_key(self._key, request.headers.get("authorization"))
                return await handler(request)
            except ClientGone:
                log.info("499 client closed the request to %s before its answer", request.url.path)
                return Response(status_code=499)
            except Exception as e:
                error = _as_api_error(e, request.url.path)
                log.info("%d %s %s code=%s", error.status, request.method, request.url.path, error.code)
                return error_response(error)
        return endpoint

    async def models(self, request: Request) -> Response:
        """GET /v1/models: the models in memory ("resident": true), then the catalog's ("loadable": by this caller)."""
        return JSONResponse(model_list(self.service.model_entries()))

    async def model(self, request: Request) -> Response:
        """GET /v1/models/{id}."""
        model_id = request.path_params["model_id"]
        entries = [e for e in self.service.model_entries() if e[0] == model_id]
        if not entries:
            raise ApiError(404, f"The model {model_id!r} does not exist here.", param="model", code="model_not_found")
        return JSONResponse(model_list(entries)["data"][0])

    async def chat_completions(self, request: Request) -> Response:
        """POST /v1/chat/completions."""
        started = time.perf_counter()
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > MAX_BODY_BYTES:  # refused before it is read into memory
            raise ApiError(413, f"The request body is over {MAX_BODY_BYTES >> 20} MiB.", code="body_too_large")
        chat = parse_chat_request(parse_json(await request.body()))
        model = self.service.check_model(chat.model)
        try:
            ticket = self.service.queue.admit()
        except QueueFull as e:
            raise ApiError(503, f"The server is busy: {e.waiting} requests are waiting. Retry in about "
                                f"{e.retry_after_s} s.", code="queue_full",
                           headers={"Retry-After": str(e.retry_after_s)}) from None
        try:
            stream = ThreadedStream(lambda stop: self.service.answer(chat, ticket, stop))
        except BaseException:
            ticket.release()
            raise
        ids = CompletionIds(model.name)
        streaming = False
        watch = _Watch(stream, request)
        try:
            try:
                first = await watch.next()  # errors (overflow, model changed) still get their status
            except StopAsyncIteration:
                raise internal_error(RuntimeError("the answer ended without a result"), request.url.path) from None
            if chat.stream:
                streaming = True
                # The background task runs even when the client left before the body started
                # (then the generator below never runs its own cleanup).
                return StreamingResponse(self._events(stream, first, ids, chat.include_usage, started),
                                         media_type="text/event-stream", background=BackgroundTask(stream.cancel),
                                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            text, item = "", first
            while not isinstance(item, Done):
                text += item.text
                item = await watch.next()
            self._log_done(ids, item, started, stream=False)
            return JSONResponse(ids.completion(text, item), headers=timing_headers(item))
        finally:
            if not streaming:
                stream.cancel()  # a no-op after a finished answer; else the computation stops

    async def _events(self, stream: ThreadedStream, first: Delta | Done, ids: CompletionIds, include_usage: bool,
                      started: float) -> AsyncIterator[str]:
        """The SSE body: a role chunk, text chunks, a finish chunk, maybe usage, then [DONE]."""
        ended = False
        try:
            yield sse(ids.chunk({"role": "assistant", "content": ""}))
            item = first
            while True:
                if isinstance(item, Done):
                    yield sse(ids.chunk({}, item.finish_reason, done=item))
                    if include_usage:
                        yield sse(ids.usage_chunk(item))
                    self._log_done(ids, item, started, stream=True)
                    break
                yield sse(ids.chunk({"content": item.text}))
                item = await stream.next()
            ended = True
            yield sse("[DONE]")
        except (asyncio.CancelledError, GeneratorExit):
            if not ended:
                log.info("499 client closed the stream %s mid-answer; generation stopped", ids.id)
            raise
        except Exception as e:  # the status line is sent: say it in the stream, as OpenAI does
            ended = True
            yield sse(_as_api_error(e, "/v1/chat/completions (stream)").body())
            yield sse("[DONE]")
        finally:
            stream.cancel()  # a no-op once the answer is done; else it stops the computation

    def _log_done(self, ids: CompletionIds, done: Done, started: float, stream: bool) -> None:
        log.info("200 %s %s model=%s prompt=%d cached=%d completion=%d finish=%s %.2fs", ids.id,
                 "stream" if stream else "json", ids.model, done.prompt_tokens, done.cached_tokens,
                 done.completion_tokens, done.finish_reason, time.perf_counter() - started)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    """Starlette's own 404/405 (unknown path or method under /v1), as OpenAI-style JSON."""
    return error_response(ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}.",
                                   code="not_found" if exc.status_code == 404 else "method_not_allowed"))


def build_api_app(service: ApiService, api_key: str | None) -> Starlette:
    """The /v1 application (routes relative to /v1), to mount under Gradio's app or serve alone."""
    api = Api(service, api_key)
    routes = [
        Route("/models", api._endpoint(api.models), methods=["GET"]),
        Route("/models/{model_id:path}", api._endpoint(api.model), methods=["GET"]),
        Route("/chat/completions", api._endpoint(api.chat_completions), methods=["POST"]),
    ]
    return Starlette(routes=routes, exception_handlers={HTTPException: _http_error})
