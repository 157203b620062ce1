"""Publish a finished cache folder under its final name, safe against other processes doing the same.

Unpacking a GGUF file, converting an InternLM2 checkpoint and storing int4 weights all write into a
temporary folder and rename it into place. Two processes can do this at once (two app instances, or the
test suite's two workers on a fresh cache). The one that finishes second must not delete the first one's folder: the
first may already be reading it.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Callable


def move_into_place(tmp: Path, dst: Path, is_complete: Callable[[Path], bool]) -> Path:
    """Rename `tmp` to `dst`, keeping a complete `dst` another process published first; return `dst`."""
    if dst.exists():
        if is_complete(dst):  # another process finished first, and may be reading it: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
            return dst
        # A stale or damaged copy. A rename over a non-empty folder fails, so move it aside first; a
        # unique name keeps two processes replacing the same stale copy from colliding.
        old = dst.parent / f".{dst.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            dst.rename(old)
        except FileNotFoundError:  # another process moved it aside first
            pass
        else:
            shutil.rmtree(old, ignore_errors=True)
    try:
        tmp.rename(dst)
    except OSError:
        if not is_complete(dst):
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # lost the race to a process that published between our checks
    return dst
