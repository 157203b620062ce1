"""The engine: one object that owns the loaded models, the chat sessions' KV caches and the GPU.

Shared by the UI (every browser tab), the API and the CLI. All GPU work (load, unload, generate,
quality checks) takes turns in one fair queue (models/gpu_queue.py), in arrival order: no two users
run forward passes in parallel threads that would OOM each other, and nobody is starved. Per-user
chat history lives with the caller (gr.State in the UI); the engine only keeps each session's KV
cache, keyed by an opaque session id, so a session's next turn prefills only what changed.

Several models may be resident at once: each session chats with its own model and
quantization, the Compare tab keeps A and B loaded when both fit. Least recently used ones
are evicted when a new one would not fit the budget (models/residency.py).
"""

from __future__ import annotations

import threading
import time
import weakref
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import torch

from . import hardware
from .backend import AnswerRequest, Backend
from .catalog import Catalog, ModelRef
from .generation import SamplingSettings, StreamUpdate
from .gpu_queue import GpuQueue, Work
from .kv_cache import KVPrecision, OverflowPolicy, SessionCacheStore, cache_bytes
from .loading import LoadedModel, PreparedLoad, free_cuda_memory, load_prepared, prepare_load
from .local_answer import LocalBackend, kv_token_bytes
from .memory import FitPlan
from .memory_split import kv_room_bytes
from .model_roots import ModelRoots
from .placement import cap_allocator, default_gpu_budget_bytes, kv_split, less_held, make_budget, plan_for
from .quant import QuantOption, quant_options
from .remote import connect_loaded, is_remote, remote_of, remote_plan, remote_ref
from .reports import LoadReport, UnloadReport
from .residency import ModelSpec, ResidentModel, answer_target, ensure_locked, labelled, resident_status
from .settings import LoadSettings, ModelKey
from .sources import default_cache_dir, shape_of

ProgressFn = Callable[[float, str], None]
T = TypeVar("T")


class Engine:
    """Owns the models, the session caches and the GPU lock; the UI and the CLI both drive it."""

    def __init__(self, catalog: Catalog, cache_dir: Path | None = None, kv_budget_bytes: int | None = None,
                 ram_budget_bytes: int | None = None, model_roots: ModelRoots | None = None):
        self.catalog = catalog
        self.model_roots = model_roots  # set when the app is exposed: local paths must lie under these
        self.cache_dir = cache_dir or default_cache_dir()
        # The GPU's fair queue (a lock that serves in arrival order), not an RLock: a streaming answer
        # takes its turn in the caller's thread and its worker thread gives it back when the computation ends.
        self._lock = GpuQueue()
        self._residents: OrderedDict[ModelKey, LoadedModel] = OrderedDict()  # least recently used first
        # The app's default model (for sessions that chose none): its key, and how to load it again if evicted.
        # One attribute, assigned at once, so no reader pairs one model's key with another's spec.
        self._default: tuple[ModelKey, tuple[str, LoadSettings]] | None = None
        self._loading: str | None = None  # the model being loaded now, for the status every tab shows
        self._sessions = SessionCacheStore()
        self._kv_budget_override = kv_budget_bytes  # tests and the CLI may cap the KV budget
        self._ram_budget = ram_budget_bytes  # cap on RAM for weights on a CPU-only machine (tests)
        self._live_cache = None  # cache of an answer in progress that no session owns yet
        self._pending_drops: set[str] = set()  # sessions closed while the GPU lock was busy
        self._pending_lock = threading.Lock()  # guards _pending_drops only; never held for long
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
        """The app's default model (the one sessions without a choice of their own use), if loaded."""
        return self._residents.get(default[0]) if (default := self._default) else None

    def residents(self) -> list[LoadedModel]:
        """Every model in memory, least recently used first."""
        return list(self._residents.values())

    def resident(self, key: ModelKey | None) -> LoadedModel | None:
        """The resident model with this key, or None (not loaded, or unloaded to make room)."""
        return self._residents.get(key) if key is not None else None

    def residents_status(self) -> list[ResidentModel]:
        """What is in memory now (most recently used first) and what is being loaded: the status all tabs share."""
        return resident_status(self)

    def default_spec(self) -> ModelSpec | None:
        """The app's default model as a choice (what a session that chose none talks to), or None."""
        return ModelSpec(*default[1], key=default[0]) if (default := self._default) is not None else None

    def make_default(self, choice: str, settings: LoadSettings) -> None:
        """Sessions that chose no model of their own talk to this one from now on (a script's load, like --model)."""
        self._default = self.model_key(choice, settings), (choice, self._with_cache_dir(settings))

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
            self._runtime_bytes = hardware.snapshot(baseline_used=self._baseline_used).runtime
        return self._runtime_bytes

    def kv_cache_bytes(self) -> int:
        """KV bytes held now: every session's cache, an answer in progress, and fast decoders' static caches."""
        static = sum(m.fast.cache_bytes for m in list(self._residents.values()) if m.fast is not None)
        return self._sessions.total_bytes() + cache_bytes(self._live_cache) + static

    def memory(self) -> hardware.MemorySnapshot:
        """Memory by owner now, for the VRAM panel."""
        residents = list(self._residents.values())
        weights = sum(m.weights_bytes for m in residents)
        kv = self.kv_cache_bytes()
        count = hardware.cuda_device_count()
        per_device = None
        if count > 1:
            # Weights as measured on each GPU at load; KV split as the chat model's plan places its layers.
            per_gpu = [sum(m.weights_bytes_per_device[d] if d < len(m.weights_bytes_per_device) else
                           (m.weights_bytes if d == 0 else 0) for m in residents) for d in range(count)]
            kv_per_gpu = kv_split(kv, self.loaded.plan if self.loaded else None, count)
            per_device = list(zip(per_gpu, kv_per_gpu))
        return hardware.snapshot(weights, kv, baseline_used=self._baseline_used, per_device=per_device)

    def session_count(self) -> int:
        """How many chat sessions hold a KV cache."""
        return len(self._sessions)

    # ----- planning ------------------------------------------------------------------
    def resolve(self, choice: str) -> ModelRef:
        """Resolve a catalog id, path, hub id or remote engine 'openai:URL' (raises UnknownModelError)."""
        if is_remote(choice):
            return remote_ref(choice)
        if self.model_roots is not None:
            self.model_roots.check(choice, self.catalog)
        return self.catalog.resolve(choice)

    def model_key(self, choice: str, settings: LoadSettings) -> ModelKey:
        """The identity of a loaded model: what it is and how it was quantized."""
        return ModelKey.of(self.resolve(choice), settings)

    def default_gpu_budget_bytes(self, device: int = 0) -> int | None:
        """The GPU budget a load gets when the user sets none (None without a GPU): what the slider starts at."""
        if self.device != "cuda":
            return None
        return default_gpu_budget_bytes(device, self.cuda_runtime_bytes())

    def _held_bytes(self, key: ModelKey, loaded: LoadedModel) -> int:
        """What a resident model holds while idle: weights, its fast decoder's static cache, its sessions' KV."""
        static = loaded.fast.cache_bytes if loaded.fast is not None else 0
        return loaded.weights_bytes + static + self._sessions.model_bytes(key)

    def _budget(self, settings: LoadSettings, keep: set[ModelKey]):
        """The budget for a new model, with what the kept residents hold taken out."""
        budget = make_budget(settings, self.cuda_runtime_bytes(), self.cache_dir)
        residents = list(self._residents.items())  # a copy: the panel's timer reads from another thread
        held = sum(self._held_bytes(k, m) for k, m in residents if k in keep)
        if budget.gpu_bytes is None:
            if self._ram_budget is not None:
                return replace(budget, ram_bytes=max(0, self._ram_budget - held))
            # RAM freed by evicting the others is ours to use.
            others = sum(self._held_bytes(k, m) for k, m in residents if k not in keep)
            return replace(budget, ram_bytes=budget.ram_bytes + others)
        return replace(budget, gpu_bytes=max(0, budget.gpu_bytes - held),
                       gpu_bytes_per_device=less_held(budget.gpu_bytes_per_device, held))

    def plan(self, choice: str, settings: LoadSettings, keep: tuple[ModelKey, ...] = ()) -> tuple[ModelRef, FitPlan]:
        """Will it fit? The plan for a model and settings, before anything is loaded (memory of resident models
        counted as given back, except for those in `keep`)."""
        ref = self.resolve(choice)
        if ref.kind == "remote":
            return ref, remote_plan(ref, settings)
        return ref, plan_for(shape_of(ref), settings, self._budget(settings, set(keep)))

    # ----- loading -------------------------------------------------------------------
    def unload(self) -> list[UnloadReport]:
        """Drop every model and give its memory back; report anything left behind."""
        with self._lock.turn(Work("unload")):
            self._default = None
            return self._unload_all_locked()

    def _unload_locked(self, key: ModelKey) -> UnloadReport:
        started = time.perf_counter()
        before = self._allocated()
        loaded = self._residents.pop(key)
        cpu_held = self._held_bytes(key, loaded) if loaded.device == "cpu" else 0
        self._sessions.drop_model(key)
        if loaded.fast is not None:
            loaded.fast.close()  # a background compile still running ends without swapping in
        label = f"{loaded.ref.label} ({loaded.settings.quant.value})"
        gone = weakref.ref(loaded.model) if cpu_held else None
        del loaded
        free_cuda_memory()
        if gone is not None:
            # On a CPU, RSS rarely drops (the allocator keeps freed pages), so "freed" is the model's own
            # tensors and KV, once nothing references the model any more; if something still does, it stays.
            freed = 0 if gone() is not None else cpu_held
            return UnloadReport(model_label=label, seconds=time.perf_counter() - started, freed_bytes=freed,
                                residual_bytes=cpu_held - freed)
        after = self._allocated()
        still_held = sum(self._held_bytes(k, m) for k, m in self._residents.items())
        return UnloadReport(
            model_label=label, seconds=time.perf_counter() - started, freed_bytes=max(0, before - after),
            residual_bytes=max(0, after - self._idle_level - still_held),
        )

    def _unload_all_locked(self) -> list[UnloadReport]:
        reports = [self._unload_locked(key) for key in list(self._residents)]
        self._sessions = SessionCacheStore()
        return reports

    def load(self, choice: str, settings: LoadSettings, progress: ProgressFn | None = None) -> LoadReport:
        """Switch the Chat tab's model: unload every model first (VRAM really freed), then load.

        Everything that can fail without loading weights (unknown or offline source, missing
        tokenizer or chat template, won't fit) is checked first, so such a failure leaves
        the current model loaded.
        """
        ref = self.resolve(choice)
        key = self.model_key(choice, settings)
        settings = self._with_cache_dir(settings)
        if ref.kind == "remote":
            return self._connect_remote(ref, key, settings, switch=(choice, settings))
        with self._lock.turn(Work.load(ref.label, settings.quant.value), progress) as turn:
            progress = turn.reporting(progress)
            started = time.perf_counter()
            # Planned as if every resident were unloaded, which is what happens next.
            prepared = prepare_load(ref, settings, self._budget(settings, set()), progress)
            unloaded = self._unload_all_locked()
            self._default = None
            loaded = self._load_locked(prepared, key, progress)
            self._default = key, (choice, settings)
            return LoadReport(loaded=loaded, unloaded=unloaded, switch_seconds=time.perf_counter() - started)

    def ensure(self, choice: str, settings: LoadSettings, progress: ProgressFn | None = None,
               keep: tuple[ModelKey, ...] = ()) -> LoadReport:
        """Make a model resident in its turn on the GPU, keeping others loaded while everything fits (no other
        session's choice changes); residency.ensure_locked: who is unloaded (`keep` is not), the report lists them."""
        ref = self.resolve(choice)
        key = self.model_key(choice, settings)
        settings = self._with_cache_dir(settings)
        if ref.kind == "remote":
            with self._lock:
                if key in self._residents:
                    self._residents.move_to_end(key)
                    return LoadReport(loaded=self._residents[key], reused=True)
            return self._connect_remote(ref, key, settings)
        with self._lock.turn(Work.load(ref.label, settings.quant.value), progress) as turn:
            return ensure_locked(self, ref, key, settings, turn.reporting(progress), keep)

    def _connect_remote(self, ref: ModelRef, key: ModelKey, settings: LoadSettings,
                        switch: tuple[str, LoadSettings] | None = None) -> LoadReport:
        """Make a remote engine's model resident; with `switch`, as the default model, unloading the others. The
        server is checked first, outside the lock: an unreachable or wrong one leaves everything loaded as it was
        (and never holds up other users' answers while it times out)."""
        started = time.perf_counter()
        loaded = connect_loaded(ref, settings)
        with self._lock:
            unloaded = self._unload_all_locked() if switch else []
            loaded.key = key
            self._residents[key] = loaded
            if switch:
                self._default = key, switch
            return LoadReport(loaded=loaded, unloaded=unloaded, switch_seconds=time.perf_counter() - started)

    def _with_cache_dir(self, settings: LoadSettings) -> LoadSettings:
        return settings if settings.cache_dir is not None else replace(settings, cache_dir=self.cache_dir)

    def _load_locked(self, prepared: PreparedLoad, key: ModelKey, progress: ProgressFn | None) -> LoadedModel:
        if not self._residents:
            free_cuda_memory()
            self._idle_level = self._allocated()
        # Replanned under what is free now, after any unloads.
        prepared = prepared.replanned(self._budget(prepared.settings, set(self._residents)))
        if self.device == "cuda":
            cap_allocator(prepared.settings, self.cuda_runtime_bytes())
        loaded = load_prepared(prepared, progress)
        loaded.key = key
        self._residents[key] = loaded
        return loaded

    def _allocated(self) -> int:
        if self.device == "cuda" and torch.cuda.is_initialized():
            return torch.cuda.memory_allocated(0)
        return 0

    def run_exclusive(self, fn: Callable[[], T]) -> T:
        """Run `fn` in its turn on the GPU (for work other than chat, e.g. a perplexity check)."""
        with self._lock.turn(Work("check")):
            return fn()

    # ----- context budget ------------------------------------------------------------
    def kv_budget_bytes(self, loaded: LoadedModel | None = None) -> int:
        """Bytes all sessions' KV caches may hold together."""
        if self._kv_budget_override is not None:
            return self._kv_budget_override
        loaded = loaded or self.loaded
        if loaded is None:
            return 0
        if loaded.device != "cuda":
            return kv_room_bytes(loaded.plan)
        # The budget minus what the residents' weights, the workspace and the CUDA context need.
        others = sum(self._held_bytes(k, m) - self._sessions.model_bytes(k)
                     for k, m in list(self._residents.items()) if m is not loaded)
        return max(0, kv_room_bytes(loaded.plan) - others)

    def context_limit(self, loaded: LoadedModel | None = None, kv: KVPrecision | str = KVPrecision.FULL) -> int:
        """Most tokens one chat may hold: the user's context, the model's maximum, and what memory allows."""
        loaded = loaded or self.loaded
        if loaded is None:
            return 0
        remote = remote_of(loaded)
        if remote is not None:  # the server's own limit, when it says
            return min(loaded.settings.context_tokens, remote.max_context or loaded.settings.context_tokens)
        limit = min(loaded.settings.context_tokens, loaded.shape.max_context)
        if loaded.fast is not None:  # its static cache was sized (and allocated) at load
            return min(limit, loaded.fast.max_context)
        memory = self.memory_context_tokens(loaded, kv)
        return max(0, limit if memory is None else min(limit, memory))

    def memory_context_tokens(self, loaded: LoadedModel | None = None,
                              kv: KVPrecision | str = KVPrecision.FULL) -> int | None:
        """Tokens of context the memory left for KV caches holds (capped at the model's maximum).

        None where memory sets no such bound: a CPU-only machine (RAM is planned at load), a
        cache offloaded to CPU RAM, or a fast decoder whose static cache was allocated at load.
        """
        loaded = loaded or self.loaded
        if loaded is None or loaded.fast is not None or remote_of(loaded) is not None:
            return None
        kv = KVPrecision(kv)
        if kv is KVPrecision.OFFLOAD or (loaded.device != "cuda" and self._kv_budget_override is None):
            return None
        return min(loaded.shape.max_context, self.kv_budget_bytes(loaded) // kv_token_bytes(loaded, kv))

    # ----- chatting ------------------------------------------------------------------
    def drop_session(self, session_id: str) -> None:
        """Forget a session's KV cache (its tab was closed); never waits for a running answer.

        Called from the web server's threads: if the GPU is busy (or others wait for it), the drop
        is queued and done by whoever holds the GPU when it next gives it back.
        """
        with self._pending_lock:
            self._pending_drops.add(session_id)
        if self._lock.acquire(blocking=False):
            try:
                self._drop_pending_locked()
            finally:
                self._lock.release()

    def _drop_pending_locked(self) -> None:
        with self._pending_lock:
            pending, self._pending_drops = self._pending_drops, set()
        for session_id in pending:
            self._sessions.drop(session_id)

    def chat(self, messages: list[dict], sampling: SamplingSettings, stop_event: threading.Event,
             model: ModelKey | None = None, session: str | None = None,
             kv: KVPrecision | str = KVPrecision.FULL,
             policy: OverflowPolicy | str = OverflowPolicy.DROP_OLDEST,
             spec: ModelSpec | None = None) -> Iterator[StreamUpdate]:
        """Stream an answer to a chat (list of {role, content}); stats.model names the model that wrote it.

        `spec` is the asking session's own model choice: when its turn in the GPU queue comes
        that model is made resident, said in this stream (StreamUpdate.notice). `model`
        pins a resident model by key instead (an unloaded one is ModelEvictedError). With
        neither, the app's default model answers. `session` names whose KV cache to reuse and
        keep. The chat is fitted into the context first (`policy`); stats.dropped_messages and
        stats.reused_tokens say what happened.
        """
        sent_at = time.perf_counter()  # the user's send: TTFT and the wait count from here
        key, label, spec = answer_target(self, model, spec if model is not None or spec else self.default_spec())
        request = AnswerRequest(messages, sampling, stop_event, session, KVPrecision(kv), OverflowPolicy(policy),
                                sent_at)
        yield from labelled(self._backend(key, pinned=model is not None, spec=spec).answer(request), label)

    def _backend(self, key: ModelKey | None, pinned: bool, spec: ModelSpec | None = None) -> Backend:
        """Who answers for `key`: a remote engine's model itself, else the local path (it makes `spec` resident)."""
        remote = remote_of(self._residents.get(key)) if key else None
        return remote if remote is not None else LocalBackend(self, key, pinned, spec)


__all__ = ["Engine", "LoadReport", "UnloadReport"]
