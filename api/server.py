"""Serving the API: mounted at /v1 inside the Gradio app (same process, same engine), or on its own.

Gradio builds its FastAPI app inside launch(); `launch(app_kwargs=gradio_app_kwargs(...))`
hands it our /v1 mount as a starting route, so the API is there from the first request and
Gradio's own routes stay untouched.
"""

from __future__ import annotations

import logging
import sys

from starlette.applications import Starlette
from starlette.routing import Mount

from models.facade import Engine

from .routes import build_api_app
from .service import ApiService, ApiSettings

PREFIX = "/v1"


def build_api(engine: Engine, settings: ApiSettings, api_key: str | None) -> Starlette:
    """The /v1 application over `engine`; its ApiService is `app.state.service`."""
    service = ApiService(engine, settings, keyed=api_key is not None)
    app = build_api_app(service, api_key)
    app.state.service = service
    return app


def gradio_app_kwargs(api_app: Starlette) -> dict:
    """launch(app_kwargs=...) for Gradio: its FastAPI app starts with our /v1 mount."""
    return {"routes": [Mount(PREFIX, app=api_app)]}


def standalone_app(api_app: Starlette) -> Starlette:
    """The API alone (--api-only): /v1 and nothing else."""
    return Starlette(routes=[Mount(PREFIX, app=api_app)])


def uvicorn_server(app: Starlette, host: str, port: int):
    """A uvicorn server for the standalone API; .run() blocks, or run it in a thread (tests)."""
    import uvicorn

    return uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False))


def log_to_stderr() -> None:
    """Show the API's one-line request log (status, tokens, time; never keys or chat text) on stderr."""
    log = logging.getLogger("smallchat.api")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s api %(levelname)s %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
