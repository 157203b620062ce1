"""The engine: one object that owns the loaded model and the GPU, shared by the UI and the CLI.

All GPU work (load, unload, generate) runs under one lock, so two users can never run
forward passes in parallel threads that would OOM each other; per-user chat history
lives with the caller (gr.State in the UI), never here.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

import torch

from . import hardware
from .catalog import Catalog, ModelRef, ModelShape, UnknownModelError
from .generation import SamplingSettings, StreamUpdate, chat_input_ids, stream_generate
from .loading import (
    LoadedModel, LoadSettings, ModelLoadError, free_cuda_memory, load_model, make_budget, plan_for,
)
from .memory import FitPlan
from .quant import QuantOption, quant_options
from .sources import ModelSourceError, default_cache_dir

ProgressFn = Callable[[float, str], None]


@dataclass(frozen=True)
class UnloadReport:
    """What unloading gave back, and what (if anything) stayed behind."""

    model_label: str
    seconds: float
    freed_bytes: int
    residual_bytes: int  # device memory still held above the level before the load


@dataclass(frozen=True)
class LoadReport:
    """The outcome of a load or switch."""

    loaded: LoadedModel
    unloaded: UnloadReport | None
    switch_seconds: float  # unload + load


def _cache_bytes(cache) -> int:
    """Bytes held by a transformers Cache object's key/value tensors."""
    if cache is None:
        return 0
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


class Engine:
    """Owns the model and serializes GPU work; the UI and the CLI both drive it."""

    def __init__(self, catalog: Catalog, cache_dir: Path | None = None):
        self.catalog = catalog
        self.cache_dir = cache_dir or default_cache_dir()
        # A plain Lock, not an RLock: a streaming answer takes it in the UI's thread and its
        # worker thread gives it back when the computation ends.
        self._lock = threading.Lock()
        self._loaded: LoadedModel | None = None
        self._live_cache = None  # the KV cache of the answer being generated, for the VRAM panel
        # Device-wide GPU use before we create a CUDA context: what other processes hold.
        self._baseline_used = hardware.nvml_used_bytes() if hardware.cuda_available() else None
        self._runtime_bytes: int | None = None
        self._idle_level = 0  # allocator bytes with no model loaded

    # ----- what is there -------------------------------------------------------------
    @property
    def device(self) -> str:
        """'cuda' when a GPU is usable, else 'cpu'."""
        return "cuda" if hardware.cuda_available() else "cpu"

    @property
    def loaded(self) -> LoadedModel | None:
        """The loaded model, if any."""
        return self._loaded

    def quant_options(self) -> list[QuantOption]:
        """Quantizations with whether each runs on this machine (and why not)."""
        cc = torch.cuda.get_device_capability(0) if self.device == "cuda" else None
        return quant_options(self.device, cc)

    def cuda_runtime_bytes(self) -> int:
        """CUDA context + kernel images of this process, measured once CUDA is up."""
        if self.device != "cuda":
            return 0
        if self._runtime_bytes is None:
            torch.cuda.init()
            torch.empty(1, device="cuda")  # creates the context so it can be measured
            self._runtime_bytes = self._measure_runtime()
        return self._runtime_bytes

    def _measure_runtime(self) -> int:
        snap = hardware.snapshot(baseline_used=self._baseline_used)
        return snap.runtime

    def memory(self) -> hardware.MemorySnapshot:
        """Memory by owner now, for the VRAM panel."""
        loaded = self._loaded
        weights = loaded.weights_bytes if loaded else 0
        kv = _cache_bytes(self._live_cache)
        if self.device == "cuda" and not torch.cuda.is_initialized():
            return hardware.snapshot(weights, kv, baseline_used=self._baseline_used)
        return hardware.snapshot(weights, kv, baseline_used=self._baseline_used)

    # ----- planning ------------------------------------------------------------------
    def resolve(self, choice: str) -> ModelRef:
        """Resolve a catalog id, path or hub id (raises UnknownModelError)."""
        return self.catalog.resolve(choice)

    def shape_of(self, ref: ModelRef) -> ModelShape:
        """The architecture shape of a model without loading it (catalog data or config.json)."""
        if ref.entry is not None:
            return ref.entry.shape
        from transformers import AutoConfig

        try:
            if ref.kind == "gguf":
                path = Path(ref.location)
                config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
            else:
                config = AutoConfig.from_pretrained(ref.location)
        except (OSError, ValueError) as e:
            first = (str(e).strip().splitlines() or [""])[0]
            raise ModelSourceError(f"Cannot read the config of {ref.location}: {first}") from None
        if getattr(config, "model_type", "") == "internlm2":
            from .internlm2 import internlm2_shape

            return internlm2_shape(config.to_dict())
        return ModelShape.from_config(config)

    def plan(self, choice: str, settings: LoadSettings) -> tuple[ModelRef, FitPlan]:
        """Will it fit? The plan for a model and settings, before anything is loaded."""
        ref = self.resolve(choice)
        shape = self.shape_of(ref)
        budget = make_budget(settings, self.cuda_runtime_bytes(), self.cache_dir)
        # Memory the current model holds would be given back before loading another.
        loaded = self._loaded
        if loaded is not None and budget.gpu_bytes is None:
            budget = replace(budget, ram_bytes=budget.ram_bytes + loaded.weights_bytes)
        return ref, plan_for(shape, settings, budget)

    # ----- loading -------------------------------------------------------------------
    def unload(self) -> UnloadReport | None:
        """Drop the model and give its memory back; report anything left behind."""
        with self._lock:
            return self._unload_locked()

    def _unload_locked(self) -> UnloadReport | None:
        if self._loaded is None:
            return None
        started = time.perf_counter()
        label = self._loaded.ref.label
        before = self._allocated()
        self._loaded = None
        self._live_cache = None
        free_cuda_memory()
        after = self._allocated()
        return UnloadReport(
            model_label=label, seconds=time.perf_counter() - started,
            freed_bytes=max(0, before - after), residual_bytes=max(0, after - self._idle_level),
        )

    def load(self, choice: str, settings: LoadSettings, progress: ProgressFn | None = None) -> LoadReport:
        """Switch to a model: unload the current one first, then load and report."""
        ref = self.resolve(choice)
        with self._lock:
            started = time.perf_counter()
            unloaded = self._unload_locked()
            self._idle_level = self._allocated()
            runtime = self.cuda_runtime_bytes()
            if self.device == "cuda":
                self._apply_budget(settings, runtime)
            try:
                loaded = load_model(ref, settings, runtime, progress)
            except torch.OutOfMemoryError:
                free_cuda_memory()
                raise ModelLoadError(f"Out of GPU memory while loading {ref.label}.") from None
            self._loaded = loaded
            return LoadReport(loaded=loaded, unloaded=unloaded, switch_seconds=time.perf_counter() - started)

    def _apply_budget(self, settings: LoadSettings, runtime: int) -> None:
        # Cap torch's allocator at the budget (minus the CUDA context it does not manage),
        # so the app can never use more VRAM than the user allowed, even on a bigger card.
        total = torch.cuda.get_device_properties(0).total_memory
        if settings.gpu_budget_bytes:
            fraction = max(0.01, min(1.0, (settings.gpu_budget_bytes - runtime) / total))
        else:
            fraction = 1.0
        torch.cuda.set_per_process_memory_fraction(fraction, 0)

    def _allocated(self) -> int:
        if self.device == "cuda" and torch.cuda.is_initialized():
            return torch.cuda.memory_allocated(0)
        return 0

    # ----- chatting ------------------------------------------------------------------
    def chat(
        self, messages: list[dict], sampling: SamplingSettings, stop_event: threading.Event
    ) -> Iterator[StreamUpdate]:
        """Stream an answer to a chat (list of {role, content}) with the loaded model."""
        from transformers import DynamicCache

        self._lock.acquire()
        released = threading.Event()
        release_guard = threading.Lock()

        def release() -> None:
            with release_guard:  # called from the worker and from here: release exactly once
                if not released.is_set():
                    released.set()
                    self._live_cache = None
                    self._lock.release()

        out_of_memory = False
        try:
            loaded = self._loaded
            if loaded is None:
                raise ModelLoadError("No model is loaded yet: pick one and press Load.")
            ids = chat_input_ids(loaded.tokenizer, messages)
            cache = DynamicCache(config=loaded.model.config)
            self._live_cache = cache
            updates = stream_generate(
                loaded.model, loaded.tokenizer, ids, sampling, stop_event, cache, on_worker_done=release
            )
            del cache
            yield from updates
        except torch.OutOfMemoryError as e:
            # Drop the traceback: its frames hold the activations and cache we must free.
            e.__traceback__ = None
            out_of_memory = True
        finally:
            release()  # no-op if the worker already released; else it never started
        if out_of_memory:
            free_cuda_memory()
            raise ModelLoadError(
                "Out of GPU memory during the answer. The chat is kept; lower max new tokens, "
                "shorten the chat, or pick a smaller quantization."
            )


__all__ = ["Engine", "LoadReport", "UnloadReport", "UnknownModelError", "ModelLoadError", "ModelSourceError"]
