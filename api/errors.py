"""OpenAI-style errors: `{"error": {"message", "type", "param", "code"}}` with the right HTTP status."""

from __future__ import annotations

import logging
import uuid

# Through the engine facade, like the UI: the API never reaches below it for its errors.
from models.facade import ContextOverflowError, ModelLoadError, ModelSourceError, UnknownModelError, UserFacingError

log = logging.getLogger("smallchat.api")

# OpenAI's error "type" strings, by HTTP status.
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
          405: "invalid_request_error", 409: "invalid_request_error", 413: "invalid_request_error",
          500: "server_error", 503: "server_error", 507: "server_error"}


class ApiError(Exception):
    """An error the client gets as JSON with an HTTP status (and maybe extra headers)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        """The JSON body OpenAI clients parse."""
        return {"error": {"message": self.message, "type": _TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = "invalid_value") -> ApiError:
    """A 400 for a field the client got wrong."""
    return ApiError(400, message, param=param, code=code)


def from_engine_error(error: BaseException) -> ApiError | None:
    """The ApiError for an error the engine raised, or None if it is unexpected (a bug: 500)."""
    code = getattr(error, "code", None)
    params = getattr(error, "params", {}) or {}
    if isinstance(error, ContextOverflowError):
        if "needed" in params:
            message = (f"This request needs {params['needed']} prompt tokens but the model's context allows "
                       f"{params['allowed']} (with room kept for the answer). Shorten the messages or lower max_tokens.")
        else:
            message = str(error)
        return ApiError(400, message, param="messages", code="context_length_exceeded")
    if code in ("oom_answer", "oom_load") or _is_out_of_memory(error):
        return ApiError(507, "Out of memory while answering; the request's cache was dropped. "
                             "Retry with a shorter conversation or a lower max_tokens.", code="out_of_memory")
    if code == "no_model":
        return ApiError(503, "No model is loaded in the app yet; load one in the web UI (or start the app with "
                             "--model).", code="no_model_loaded", headers={"Retry-After": "10"})
    if code == "evicted":
        return ApiError(409, "The model was unloaded by another user before this answer could start; "
                             "send the request again.", param="model", code="model_changed")
    if isinstance(error, UnknownModelError):
        return ApiError(404, str(error), param="model", code="model_not_found")
    if isinstance(error, (ModelLoadError, ModelSourceError)):
        return ApiError(409, f"The model could not be loaded: {error}", param="model", code="model_load_failed")
    if isinstance(error, UserFacingError):  # e.g. the chat template rejected the chat (no system role)
        return ApiError(400, str(error), param="messages", code="invalid_messages")
    return None


def _is_out_of_memory(error: BaseException) -> bool:
    import torch

    return isinstance(error, torch.OutOfMemoryError)


def internal_error(error: BaseException, where: str) -> ApiError:
    """A 500 for an unexpected exception: logged with its traceback under an id the client also gets."""
    error_id = uuid.uuid4().hex[:12]
    log.error("internal error %s in %s", error_id, where, exc_info=(type(error), error, error.__traceback__))
    return ApiError(500, f"Internal error (id {error_id}); the server logged the details and keeps running.",
                    code="internal_error")
