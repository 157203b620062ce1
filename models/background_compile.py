"""The fast decoder's background compile: torch.compile of its step, beside answers, swapped in when ready.

Why in the background: compiling a 7B's step takes seconds to tens of seconds (one decoder layer
compiled for all, models/layer_step.py), and a load should answer as soon as its uncompiled step
is captured. The compile itself (tracing, Inductor, Triton) runs beside answers; the compiled
step's first run and the capture of its graphs wait until no answer is running. Inductor's and
Triton's caches live under the app's cache (compile_cache), so a later load of the same shape
reuses the compiled kernels. A corrupt cache is wiped and the compile retried once; a compile
that fails leaves the uncompiled step answering, and says why (compile_status).

BackgroundCompile is a mixin of models.fast_decode.FastDecoder, which owns the state it uses:
the model and cache, the `_busy` lock answers hold, the `_closed` event, `_forward` (the step
the graphs capture), `_capture_graphs` and the scratch token/position of the compile's first run.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import Callable

import torch

from . import compile_cache
from .layer_step import LayerLoop, step_inputs, supports_layer_loop

log = logging.getLogger(__name__)
# While the background compile holds the GIL for long stretches, an answer's eager prefill (which
# gives the GIL back at every op) waits up to the interpreter's switch interval (5 ms) to get it
# back each time: a 7B 512-token prefill took 8.5 s instead of 0.14 s on an H200. A shorter
# interval while compiling bounds that wait.
COMPILE_SWITCH_INTERVAL_S = 0.0005


def _prime_inductor_tracer() -> None:
    """Run, in this thread, the one torch.fx symbolic trace Inductor makes once per process.

    Why: torch.fx's Tracer.trace patches nn.Module.__call__ for every thread while it runs.
    Inductor's loop_body traces a dummy graph that way the first time it lowers a kernel; in the
    compile thread that would send a concurrent answer's module calls into that tracer, which
    fails them ("module is not installed as a submodule", seen once in CI). Its result is cached,
    so doing it here, before the compile thread exists and before the first answer, closes that
    window. The other traces of a compile (make_fx's) pass module calls straight through."""
    try:
        from torch._inductor.loop_body import InterpreterShim
        InterpreterShim._dummy_gm()
    except (ImportError, AttributeError):  # another torch: nothing of this form to prime
        log.debug("Inductor's dummy trace not found; nothing to prime", exc_info=True)


class _Closed(Exception):
    """The decoder was closed while its step was being compiled."""


class _CompileThread(threading.Thread):
    """The thread that compiles one decoder's step; it carries that decoder's `closed` event to the backend."""

    def __init__(self, target: Callable, closed: threading.Event):
        super().__init__(target=target, name="fast-decode-compile", daemon=True)
        self.closed = closed


def _inductor_unless_closed(gm, example_inputs):
    """torch.compile's Inductor backend, refused once the compiling decoder is closed.

    A decoder unloaded while its step was still being traced skips Inductor (the long part), so its
    compile thread lets go of the model within seconds; the decoder is the one whose _CompileThread
    runs this. Why one module-level function rather than a backend per decoder: dynamo keys its
    cache entries by backend, so a new backend for every load made every load trace and compile
    again. With one backend, a second load of a shape already compiled in this process (a user
    switching back from the dropdown) finds dynamo's entry: no trace, no Inductor, only the
    guards. Weights are inputs of the compiled layer, not constants (it already serves every layer
    of a model), so one entry serves every model of that shape; a shape or GEMV tile that differs
    fails a guard and compiles its own (tests/test_fast_decode.py).
    """
    from torch._inductor.compile_fx import compile_fx

    closed = getattr(threading.current_thread(), "closed", None)
    if closed is not None and closed.is_set():
        raise _Closed()
    return compile_fx(gm, example_inputs)


class BackgroundCompile:
    """torch.compile of FastDecoder's step in a thread of its own, swapped in between answers."""

    def start_background_compile(self) -> threading.Thread | None:
        """Compile the step in a background thread and swap it in when ready (None if compile is off).

        The compile itself (tracing, Inductor, Triton) runs beside answers; the compiled step's
        first run and the capture of its graphs wait until no answer is running.
        """
        if not self.compile_enabled or self._compile_thread is not None:
            return None
        _prime_inductor_tracer()
        self.compile_state = "compiling"
        self._compile_started = time.perf_counter()
        self._compile_thread = _CompileThread(self._compile_and_swap, self._closed)
        self._compile_thread.start()
        return self._compile_thread

    def wait_compiled(self, timeout: float | None = None) -> bool:
        """Block until the background compile has ended (swapped in or failed); whether it ended."""
        thread = self._compile_thread
        if thread is not None:
            thread.join(timeout)
            return not thread.is_alive()
        return self.compile_state in ("compiled", "failed", "off")

    def _idle_first_run(self, compiled: Callable) -> Callable:
        """Wrap Inductor's compiled step: its first run waits for the decoder to be idle and writes
        its keys/values into the scratch slot; later runs (and graph captures) go straight through."""
        def run(*args):
            if self._first_compiled_run.is_set():
                return compiled(*args)
            with self._busy:
                if self._closed.is_set():
                    raise _Closed()
                self._set_length(self.max_context)  # the scratch slot, beyond every answer's context
                try:
                    return compiled(*args)
                finally:
                    self._first_compiled_run.set()
                    self._set_length(0)
                    self.token_ids = []  # the next answer prefills again: nothing stale is trusted
        return run

    def _backend(self):
        return lambda gm, example_inputs: self._idle_first_run(_inductor_unless_closed(gm, example_inputs))

    def _compile_once(self) -> Callable:
        if supports_layer_loop(self.model):
            return self._compile_layer_once()
        step = torch.compile(self._forward_eager, fullgraph=True, backend=self._backend())
        positions = self.kv_positions[:self.windows[-1]]
        # One compile for every window: its length is a symbol, not a constant (dynamic=False
        # would compile the step once per window). Everything else keeps its static shape.
        torch._dynamo.mark_dynamic(positions, 0, min=2, max=positions.shape[0])
        with torch.inference_mode():
            step(self._scratch_token, self._scratch_pos, positions)  # traces, compiles, then runs once when idle
        return step

    def _compile_layer_once(self) -> Callable:
        """Compile one decoder layer for all (models/layer_step.py), and the first layer's inputs
        (layer_step.step_inputs); the step runs the layer per layer.

        Its first run (which compiles) writes at the scratch position, beyond every answer's
        context, so it needs no idle decoder: nothing an answer reads or advances is touched."""
        loop = LayerLoop(self.model, self.cache, fold_norms=self.norms_folded)  # as the uncompiled step runs
        layer_fn = torch.compile(loop.layer_fn, fullgraph=True, backend=_inductor_unless_closed)
        inputs_fn = torch.compile(step_inputs, fullgraph=True, backend=_inductor_unless_closed)
        positions = self.kv_positions[:self.windows[-1]]
        with torch.inference_mode():
            loop.logits(self._scratch_token, self._scratch_pos, positions, layer_fn, dynamic_window=True,
                        inputs_fn=inputs_fn)
        self.compiled_layer_loop = True
        return lambda token, pos, window: loop.logits(token, pos, window, layer_fn, inputs_fn=inputs_fn)

    def _compile_and_swap(self) -> None:
        interval = sys.getswitchinterval()
        sys.setswitchinterval(min(interval, COMPILE_SWITCH_INTERVAL_S))
        try:
            if self.compile_cache_dir is not None:
                compile_cache.configure(self.compile_cache_dir)
            try:
                step = self._compile_once()
            except Exception:  # noqa: BLE001 - e.g. a corrupt or mismatched cache entry: rebuild once
                if self.compile_cache_dir is None or self._closed.is_set():
                    raise
                log.warning("compiling the decode step failed; retrying with a fresh compile cache", exc_info=True)
                compile_cache.reset(self.compile_cache_dir)
                torch._dynamo.reset()
                self._first_compiled_run.clear()
                step = self._compile_once()
            self.phases["compile_trace_and_build_s"] = time.perf_counter() - self._compile_started
            with self._busy, torch.inference_mode():
                if self._closed.is_set():
                    raise _Closed()
                waited = time.perf_counter()
                self._forward = step
                if self.use_graphs:
                    self._capture_graphs(min(8, self.max_context - 4))
                self.phases["compile_capture_s"] = time.perf_counter() - waited
                self._set_length(0)
                self.token_ids = []
            self.compile_state = "compiled"
        except Exception as e:  # noqa: BLE001 - the uncompiled step keeps answering
            if self._closed.is_set():  # unloaded meanwhile (dynamo wraps the backend's _Closed in its own error)
                self.compile_state = "off"
                return
            log.warning("the decode step could not be compiled; staying on the uncompiled step", exc_info=True)
            self.compile_error = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            self.compile_state = "failed"
        finally:
            sys.setswitchinterval(interval)
            self.background_compile_seconds = time.perf_counter() - self._compile_started

    def compile_status(self) -> str:
        """Which step answers now, in words (for the memory panel and the CLI)."""
        graph = "CUDA-graph " if self.use_graphs else ""
        if self.compile_state == "compiling":
            return f"uncompiled {graph}step; compiling in the background ({time.perf_counter() - self._compile_started:.0f} s)"
        if self.compile_state == "compiled":
            return f"compiled {graph}step (compiled in the background in {self.background_compile_seconds:.0f} s)"
        if self.compile_state == "failed":
            return f"uncompiled {graph}step (compile failed: {self.compile_error})"
        return f"uncompiled {graph}step"
