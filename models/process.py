"""Process-wide settings (called once from app.py): malloc arenas for a long-running server, quiet load bars."""

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


# transformers' per-tensor bars for steps the app reports itself ("[ 35%] Loading weights …").
QUIET_BARS = ("Loading weights", "Converting and de-quantizing GGUF tensors...", "Writing model shards")


def quiet_weight_loading_bar() -> None:
    """Hide transformers' weight-loading bars: the app prints its own progress lines for those steps.

    Only those: a hub download's bar (a real wait the user can watch) stays."""
    from transformers.utils import logging as hf_logging

    def hook(factory, args, kwargs):
        if kwargs.get("desc") in QUIET_BARS:
            kwargs = {**kwargs, "disable": True}
        return factory(*args, **kwargs)

    hf_logging.set_tqdm_hook(hook)
