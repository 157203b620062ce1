"""Errors the user can act on carry a message code and the values in their message.

`str(error)` stays the English message (what the CLI prints); the code and values let the UI
say the same thing in the user's language (ui/i18n.explain). The engine knows nothing of
languages, and the UI never parses English text.
"""

from __future__ import annotations

from typing import TypeVar

E = TypeVar("E", bound=BaseException)


def coded(error: E, code: str, **params) -> E:
    """Attach a message code and its values to `error`; returns it, for `raise coded(...)`."""
    error.code = code
    error.params = params
    return error
