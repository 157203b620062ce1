"""Compiling Triton kernels from several threads at once, safely (int4_precompile does; so do the compile tests).

Why: Triton parses a kernel's Python source with `ast.parse` at every compile, and CPython 3.11's AST
builder keeps its recursion counter per interpreter, not per thread. A thread switch inside it (a
garbage collection can run other code) lets a second thread's parse move the counter, and the first
fails with "SystemError: AST constructor recursion depth mismatch" (seen in CI, two threads compiling
the GEMV's tiles). The parse takes microseconds of a compile's ~1 s, so threads take turns at it under
one lock and still overlap the rest (the passes and ptxas, which run without the GIL).
"""

from __future__ import annotations

import threading


def serialize_source_parsing() -> None:
    """Make Triton's JITFunction.parse (its `ast.parse` of a kernel's source) run one thread at a time; idempotent."""
    from triton.runtime.jit import JITFunction

    if getattr(JITFunction.parse, "serialized", False):
        return
    original = JITFunction.parse
    lock = threading.Lock()

    def parse(self):
        with lock:
            return original(self)
    parse.serialized = True
    JITFunction.parse = parse
