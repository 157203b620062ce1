"""Process-wide settings for a long-running server (called once from app.py before serving)."""

from __future__ import annotations

import ctypes
import os
import sys

M_ARENA_MAX = -8  # glibc's mallopt() parameter number (malloc.h)


def limit_malloc_arenas(arenas: int = 2) -> bool:
    """Cap glibc's malloc arenas so RSS stops climbing with every answer; True if applied.

    glibc gives threads that allocate their own arena (up to 8 per core) and seldom returns their
    free pages to the OS. Every answer runs in a fresh thread (generation, API, Gradio's pool), so
    a server's RSS grew ~1.8 MiB per answer over a 10-minute soak (bench/soak.py, BENCHMARKS.md);
    with two arenas, ~0.3 MiB beyond the KV caches it keeps, levelling off. MALLOC_ARENA_MAX in the environment
    (the user's own choice) wins; other C libraries are left alone.
    """
    if not sys.platform.startswith("linux") or "MALLOC_ARENA_MAX" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return False
    return bool(mallopt(M_ARENA_MAX, arenas))
