"""API keys: none needed on loopback; required anywhere else, and checked in constant time."""

from __future__ import annotations

import hmac
import ipaddress
import os

from .errors import ApiError

KEY_ENV = "SMALLCHAT_API_KEY"


class ApiKeyMissing(ValueError):
    """The API would listen beyond this machine without a key."""


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything, so it is not trusted as local
        return False


def api_key_for(host: str, key_arg: str | None, environ=os.environ) -> str | None:
    """The key the API requires (from --api-key, else the environment), or ApiKeyMissing if a non-loopback host has none."""
    key = key_arg or environ.get(KEY_ENV) or None
    if key is None and not is_loopback(host):
        raise ApiKeyMissing(
            f"The API would listen on {host}, beyond this machine, without a key. Set one with --api-key or the "
            f"{KEY_ENV} environment variable (clients send it as 'Authorization: Bearer KEY'), or listen on 127.0.0.1."
        )
    return key


def check_key(expected: str | None, authorization: str | None) -> None:
    """Raise a 401 unless `authorization` is 'Bearer <expected>' (no key expected: anything passes)."""
    if expected is None:
        return
    scheme, _, given = (authorization or "").partition(" ")
    # compare_digest takes as long for a wrong key as for a right one, so timing tells nothing.
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected.encode()):
        raise ApiError(401, "Missing or wrong API key: send 'Authorization: Bearer YOUR_KEY'.",
                       code="invalid_api_key")
