"""The engine: one object that owns the loaded models, the chat sessions' KV caches and the GPU.

It is shared by the UI (every browser tab) and the CLI. All GPU work (load, unload,
generate, quality checks) runs under one lock, so two users can never run forward
passes in parallel threads that would OOM each other. Per-user chat history lives with
the caller (gr.State in the UI); the engine only keeps each session's KV cache, keyed by
an opaque session id, so a session's next turn prefills only what changed.

Several models may be resident at once (the Compare tab keeps A and B loaded when both
fit); least recently used ones are evicted when a new one would not fit the budget.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import torch

from . import hardware
from .errors import coded
from .catalog import Catalog, ModelRef, ModelShape, UnknownModelError
from .generation import SamplingSettings, StreamUpdate, chat_input_ids, stream_generate
from .kv_cache import (
    ContextOverflowError, KVPrecision, OverflowPolicy, SessionCache, SessionCacheStore, cache_bytes,
    fit_messages, new_cache,
)
from .loading import (
    LoadedModel, LoadSettings, ModelLoadError, PreparedLoad, free_cuda_memory, load_prepared, make_budget, plan_for,
    prepare_load,
)
from .memory import FitPlan, kv_bytes_per_token, kv_room_bytes
from .model_roots import ModelRoots
from .quant import QuantOption, quant_options
from .remote import connect_loaded, is_remote, remote_of, remote_plan, remote_ref
from .sources import ModelSourceError, default_cache_dir

ProgressFn = Callable[[float, str], None]
T = TypeVar("T")

# Tokens kept free for the answer when the context is full and max_new_tokens is larger.
MIN_ANSWER_TOKENS = 64


@dataclass(frozen=True)
class UnloadReport:
    """What unloading gave back, and what (if anything) stayed behind."""

    model_label: str
    seconds: float
    freed_bytes: int
    residual_bytes: int  # device memory still held above the level before any model was loaded


@dataclass(frozen=True)
class LoadReport:
    """The outcome of a load or switch."""

    loaded: LoadedModel
    unloaded: list[UnloadReport] = field(default_factory=list)
    switch_seconds: float = 0.0  # unload + load
    reused: bool = False  # already resident: nothing was loaded


def _kv_token_bytes(loaded: LoadedModel, kv: KVPrecision) -> int:
    """KV bytes per token of context for a loaded model at a cache precision."""
    if kv is KVPrecision.FP8:
        return kv_bytes_per_token(loaded.shape, 1)
    return kv_bytes_per_token(loaded.shape, torch.empty(0, dtype=loaded.model.dtype).element_size())


def _shared_kv_precision(precision: KVPrecision | str) -> KVPrecision:
    return precision if isinstance(precision, KVPrecision) else KVPrecision(precision)


class ModelEvictedError(ModelLoadError):
    """The model an answer was asked of is no longer resident (evicted to make room for another)."""


def _less_held(per_device: tuple[int, ...], held: int) -> tuple[int, ...]:
    """Per-GPU budgets with what kept models hold taken out, from GPU 0 on (where their layers start)."""
    out = []
    for budget in per_device:
        take = min(budget, held)
        out.append(budget - take)
        held -= take
    return tuple(out)


def _kv_split(kv: int, plan, count: int) -> list[int]:
    """KV bytes on each of `count` GPUs: each holds its layers' share (all on GPU 0 without a split plan)."""
    holds = list(plan.kv_layers_per_device()) if plan is not None and plan.gpu_layers_per_device else [1]
    holds += [0] * (count - len(holds))
    return [kv * h // max(1, sum(holds)) for h in holds[:count]]


class Engine:
    """Owns the models, the session caches and the GPU lock; the UI and the CLI both drive it."""

    def __init__(self, catalog: Catalog, cache_dir: Path | None = None, kv_budget_bytes: int | None = None,
                 ram_budget_bytes: int | None = None, model_roots: ModelRoots | None = None):
        self.catalog = catalog
        self.model_roots = model_roots  # set when the app is exposed: local paths must lie under these
        self.cache_dir = cache_dir or default_cache_dir()
        # A plain Lock, not an RLock: a streaming answer takes it in the caller's thread and
        # its worker thread gives it back when the computation ends.
        self._lock = threading.Lock()
        self._residents: OrderedDict[str, LoadedModel] = OrderedDict()  # least recently used first
        self._chat_key: str | None = None  # the model the Chat tab talks to
        self._chat_spec: tuple[str, LoadSettings] | None = None  # how to load it again if it was evicted
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
        """The Chat tab's model, if loaded."""
        return self._residents.get(self._chat_key) if self._chat_key else None

    def residents(self) -> list[LoadedModel]:
        """Every model in memory, least recently used first."""
        return list(self._residents.values())

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
            kv_per_gpu = _kv_split(kv, self.loaded.plan if self.loaded else None, count)
            per_device = list(zip(per_gpu, kv_per_gpu))
        return hardware.snapshot(weights, kv, baseline_used=self._baseline_used, per_device=per_device)

    def session_count(self) -> int:
        """How many chat sessions hold a KV cache."""
        return len(self._sessions)

    def session_ids(self) -> list[str]:
        """Ids of the chat sessions holding a KV cache, least recently used first."""
        return self._sessions.sessions()

    # ----- planning ------------------------------------------------------------------
    def resolve(self, choice: str) -> ModelRef:
        """Resolve a catalog id, path, hub id or remote engine 'openai:URL' (raises UnknownModelError)."""
        if is_remote(choice):
            return remote_ref(choice)
        if self.model_roots is not None:
            self.model_roots.check(choice, self.catalog)
        return self.catalog.resolve(choice)

    def model_key(self, choice: str, settings: LoadSettings) -> str:
        """The identity of a loaded model: what it is and how it was quantized."""
        ref = self.resolve(choice)
        if ref.kind == "remote":  # the server decides precision and context
            return f"{ref.location}|remote"
        dq = "+dq" if settings.double_quant and settings.quant.value == "4bit" else ""
        return f"{ref.location}|{settings.quant.value}{dq}|ctx{settings.context_tokens}"

    def shape_of(self, ref: ModelRef) -> ModelShape:
        """The architecture shape of a model without loading it (catalog data or config.json)."""
        if ref.entry is not None:
            return ref.entry.shape
        from transformers import AutoConfig

        if ref.kind == "folder":
            from .internlm2 import internlm2_shape, is_internlm2_folder

            if is_internlm2_folder(Path(ref.location)):  # transformers has no config class for it
                import json

                return internlm2_shape(json.loads((Path(ref.location) / "config.json").read_text()))
        try:
            if ref.kind == "gguf":
                path = Path(ref.location)
                config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
            else:
                config = AutoConfig.from_pretrained(ref.location)
        except (OSError, ValueError) as e:
            first = (str(e).strip().splitlines() or [""])[0]
            raise ModelSourceError(f"Cannot read the config of {ref.location}: {first}") from None
        return ModelShape.from_config(config)

    def _held_bytes(self, key: str, loaded: LoadedModel) -> int:
        """What a resident model holds while idle: weights, its fast decoder's static cache, its sessions' KV."""
        static = loaded.fast.cache_bytes if loaded.fast is not None else 0
        return loaded.weights_bytes + static + self._sessions.model_bytes(key)

    def _budget(self, settings: LoadSettings, keep: set[str]):
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
                       gpu_bytes_per_device=_less_held(budget.gpu_bytes_per_device, held))

    def plan(self, choice: str, settings: LoadSettings, keep: tuple[str, ...] = ()) -> tuple[ModelRef, FitPlan]:
        """Will it fit? The plan for a model and settings, before anything is loaded.

        Memory of resident models is counted as given back, except for those in `keep`.
        """
        ref = self.resolve(choice)
        if ref.kind == "remote":
            return ref, remote_plan(ref, settings)
        return ref, plan_for(self.shape_of(ref), settings, self._budget(settings, set(keep)))

    # ----- loading -------------------------------------------------------------------
    def unload(self) -> list[UnloadReport]:
        """Drop every model and give its memory back; report anything left behind."""
        with self._lock:
            self._chat_key = self._chat_spec = None
            return self._unload_all_locked()

    def _unload_locked(self, key: str) -> UnloadReport:
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
        with self._lock:
            started = time.perf_counter()
            # Planned as if every resident were unloaded, which is what happens next.
            prepared = prepare_load(ref, settings, self._budget(settings, set()), progress)
            unloaded = self._unload_all_locked()
            self._chat_key = self._chat_spec = None
            loaded = self._load_locked(prepared, key, progress)
            self._chat_key, self._chat_spec = key, (choice, settings)
            return LoadReport(loaded=loaded, unloaded=unloaded, switch_seconds=time.perf_counter() - started)

    def ensure(self, choice: str, settings: LoadSettings, progress: ProgressFn | None = None,
               keep: tuple[str, ...] = ()) -> LoadReport:
        """Make a model resident, keeping others loaded while everything fits.

        Residents other than `keep` are unloaded, least recently used first, until the new
        model fits (on the GPU without offload, or in RAM); the report lists them. A model
        that cannot load even with those unloaded fails before anything is unloaded.
        """
        ref = self.resolve(choice)
        key = self.model_key(choice, settings)
        settings = self._with_cache_dir(settings)
        if ref.kind == "remote":
            with self._lock:
                if key in self._residents:
                    self._residents.move_to_end(key)
                    return LoadReport(loaded=self._residents[key], reused=True)
            return self._connect_remote(ref, key, settings)
        with self._lock:
            if key in self._residents:
                self._residents.move_to_end(key)
                return LoadReport(loaded=self._residents[key], reused=True)
            started = time.perf_counter()
            prepared = prepare_load(ref, settings, self._budget(settings, set(keep)), progress)
            unloaded = []
            for other in list(self._residents):  # least recently used first
                if plan_for(prepared.shape, settings, self._budget(settings, set(self._residents))).verdict in ("gpu", "cpu"):
                    break  # fits next to everything still loaded
                if other not in keep and remote_of(self._residents[other]) is None:  # a remote one frees nothing here
                    unloaded.append(self._unload_locked(other))
            loaded = self._load_locked(prepared, key, progress)
            return LoadReport(loaded=loaded, unloaded=unloaded, switch_seconds=time.perf_counter() - started)

    def _connect_remote(self, ref: ModelRef, key: str, settings: LoadSettings,
                        switch: tuple[str, LoadSettings] | None = None) -> LoadReport:
        """Make a remote engine's model resident; with `switch`, as the Chat tab's model, unloading the others.

        The server is checked first, outside the lock: an unreachable or wrong one leaves
        everything loaded as it was (and never holds up other users' answers while it times out).
        """
        started = time.perf_counter()
        loaded = connect_loaded(ref, settings)
        with self._lock:
            unloaded = self._unload_all_locked() if switch else []
            self._residents[key] = loaded
            if switch:
                self._chat_key, self._chat_spec = key, switch
            return LoadReport(loaded=loaded, unloaded=unloaded, switch_seconds=time.perf_counter() - started)

    def _with_cache_dir(self, settings: LoadSettings) -> LoadSettings:
        return settings if settings.cache_dir is not None else replace(settings, cache_dir=self.cache_dir)

    def _load_locked(self, prepared: PreparedLoad, key: str, progress: ProgressFn | None) -> LoadedModel:
        if not self._residents:
            free_cuda_memory()
            self._idle_level = self._allocated()
        # Replanned under what is free now, after any unloads.
        prepared = prepared.replanned(self._budget(prepared.settings, set(self._residents)))
        if self.device == "cuda":
            self._apply_budget(prepared.settings)
        loaded = load_prepared(prepared, progress)
        self._residents[key] = loaded
        return loaded

    def _apply_budget(self, settings: LoadSettings) -> None:
        # Cap torch's allocator at the budget (minus the CUDA context it does not manage),
        # so the app can never use more VRAM than the user allowed, even on a bigger card.
        # The GPU budget is per GPU: every visible device gets the same cap.
        for device in range(max(1, hardware.cuda_device_count())):
            total = torch.cuda.get_device_properties(device).total_memory
            if settings.gpu_budget_bytes:
                # A tiny floor only: set_per_process_memory_fraction rejects 0, and a budget
                # below the context must still make loads fail rather than be ignored.
                fraction = max(1e-6, min(1.0, (settings.gpu_budget_bytes - self.cuda_runtime_bytes()) / total))
            else:
                fraction = 1.0
            torch.cuda.set_per_process_memory_fraction(fraction, device)

    def _allocated(self) -> int:
        if self.device == "cuda" and torch.cuda.is_initialized():
            return torch.cuda.memory_allocated(0)
        return 0

    def run_exclusive(self, fn: Callable[[], T]) -> T:
        """Run `fn` holding the GPU lock (for work other than chat, e.g. a perplexity check)."""
        with self._lock:
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
        kv = _shared_kv_precision(kv)
        if kv is KVPrecision.OFFLOAD or (loaded.device != "cuda" and self._kv_budget_override is None):
            return None
        return min(loaded.shape.max_context, self.kv_budget_bytes(loaded) // _kv_token_bytes(loaded, kv))

    # ----- chatting ------------------------------------------------------------------
    def drop_session(self, session_id: str) -> None:
        """Forget a session's KV cache (its tab was closed); never waits for a running answer.

        Called from the web server's threads: if the GPU lock is busy, the drop is queued and
        done by whoever holds the lock when it next releases it.
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

    def chat(
        self,
        messages: list[dict],
        sampling: SamplingSettings,
        stop_event: threading.Event,
        model: str | None = None,
        session: str | None = None,
        kv: KVPrecision | str = KVPrecision.FULL,
        policy: OverflowPolicy | str = OverflowPolicy.DROP_OLDEST,
    ) -> Iterator[StreamUpdate]:
        """Stream an answer to a chat (list of {role, content}).

        `model` is a model key (default: the Chat tab's model); `session` names whose KV
        cache to reuse and keep. The chat is fitted into the context first (`policy`);
        stats.dropped_messages and stats.reused_tokens say what happened.
        """
        kv = _shared_kv_precision(kv)
        policy = policy if isinstance(policy, OverflowPolicy) else OverflowPolicy(policy)
        spec = self._chat_spec
        if model is None and spec is not None and self._chat_key not in self._residents:
            self.ensure(*spec)  # the Chat tab's model was evicted (e.g. by a comparison): bring it back
        remote = remote_of(self._residents.get(model or self._chat_key or ""))
        if remote is not None:
            # The server fits, templates and caches the chat itself, and its compute is not this
            # machine's: no GPU lock, no local KV cache.
            yield from remote.stream(messages, sampling, stop_event)
            return
        self._lock.acquire()
        self._drop_pending_locked()
        released = threading.Event()
        release_guard = threading.Lock()

        def release() -> None:
            with release_guard:  # called from the worker and from here: release exactly once
                if not released.is_set():
                    released.set()
                    self._live_cache = None
                    self._drop_pending_locked()  # tabs closed while this answer ran
                    self._lock.release()

        out_of_memory = False
        entry: SessionCache | None = None
        key = model or self._chat_key
        try:
            loaded = self._residents.get(key) if key else None
            if loaded is None and model is not None:
                raise coded(ModelEvictedError(
                    f"{model.split('|')[0]} was unloaded to make room for another model before this answer "
                    "could start (another load or comparison ran meanwhile); run it again."
                ), "evicted", model=model.split("|")[0])
            if loaded is None:
                raise coded(ModelLoadError("No model is loaded yet: pick one and press Load."), "no_model")
            self._residents.move_to_end(key)
            if kv is KVPrecision.OFFLOAD and loaded.device != "cuda":
                kv = KVPrecision.FULL  # offloading the cache only means something on a GPU
            ids, dropped, prompt_limit = self._fit(loaded, messages, sampling, kv, policy)
            if loaded.fast is not None:
                yield from self._chat_fast(loaded, ids, dropped, prompt_limit, sampling, stop_event, release)
                return
            if session is not None:
                entry = self._sessions.get(session, key, kv)
            reused = entry.reuse_for(ids) if entry is not None else 0
            if reused == 0:
                entry = SessionCache(model_key=key, precision=kv, cache=new_cache(loaded.model.config, kv))
            room = self.context_limit(loaded, kv) - len(ids)
            sampling = replace(sampling, max_new_tokens=max(1, min(sampling.max_new_tokens, room)))
            if session is not None:
                self._sessions.put(session, entry)
                # Room for this answer's whole context: older sessions' caches go first.
                need = _kv_token_bytes(loaded, kv) * (len(ids) + sampling.max_new_tokens) - entry.nbytes
                self._sessions.evict_until(max(0, self.kv_budget_bytes(loaded) - need), keep=session)
            else:
                self._live_cache = entry.cache
            # Until the answer is done the cache is only known to hold the reused prefix.
            entry.token_ids = ids[:reused]
            updates = stream_generate(
                loaded.model, loaded.tokenizer, ids, sampling, stop_event, entry.cache, on_worker_done=release,
            )
            for update in updates:
                update.stats.reused_tokens = reused
                update.stats.dropped_messages = len(dropped)
                update.stats.prompt_limit = prompt_limit
                if update.done:
                    entry.token_ids = ids + update.token_ids
                yield update
        except torch.OutOfMemoryError as e:
            # Drop the traceback: its frames hold the activations and cache we must free.
            e.__traceback__ = None
            out_of_memory = True
        except GeneratorExit:  # the caller went away; the cache is consistent with token_ids
            raise
        except BaseException:
            if session is not None:  # a cache in an unknown state is never reused
                self._sessions.drop(session)
            raise
        finally:
            release()  # no-op if the worker already released; else it never started
        if out_of_memory:
            with self._lock:
                if session is not None:
                    self._sessions.drop(session)
                entry = None
                free_cuda_memory()
            raise coded(ModelLoadError(
                "Out of GPU memory during the answer. Its cache was dropped and the chat is kept; "
                "lower max new tokens, shorten the chat, or pick a smaller quantization."
            ), "oom_answer")

    def _chat_fast(self, loaded: LoadedModel, ids: list[int], dropped: list[dict], prompt_limit: int,
                   sampling: SamplingSettings, stop_event: threading.Event,
                   release: Callable[[], None]) -> Iterator[StreamUpdate]:
        """Answer through the model's FastDecoder (Quant.INT4).

        It owns one static cache per model, sized to the context at load, and reuses the longest
        common prefix with whatever it answered last: a session's next turn reuses its history
        unless another session answered in between (then it is prefilled again, never mixed).
        """
        room = min(loaded.fast.max_context, self.context_limit(loaded)) - len(ids)
        sampling = replace(sampling, max_new_tokens=max(1, min(sampling.max_new_tokens, room)))
        for update in loaded.fast.stream(loaded.tokenizer, ids, sampling, stop_event, on_worker_done=release):
            update.stats.dropped_messages = len(dropped)
            update.stats.prompt_limit = prompt_limit
            yield update

    def _fit(self, loaded: LoadedModel, messages: list[dict], sampling: SamplingSettings, kv: KVPrecision,
             policy: OverflowPolicy) -> tuple[list[int], list[dict], int]:
        """Token ids of the chat after the overflow policy, the messages it dropped, and the prompt's limit.

        The limit is the one an overflow error names, so a later "context full" notice can say the same number."""
        limit = self.context_limit(loaded, kv)
        answer_room = min(sampling.max_new_tokens, max(MIN_ANSWER_TOKENS, limit // 4))
        max_prompt = limit - answer_room
        if max_prompt <= 0:
            raise coded(ContextOverflowError(
                f"Memory leaves room for only {limit} tokens of context: free VRAM, lower the context "
                "length, or pick a smaller quantization."
            ), "no_context_room", limit=limit)

        ids = chat_input_ids(loaded.tokenizer, messages)
        if len(ids) <= max_prompt:  # the usual case: template the chat once
            return ids, [], max_prompt

        def count(msgs: list[dict]) -> int:
            return len(chat_input_ids(loaded.tokenizer, msgs))

        kept, dropped = fit_messages(messages, count, max_prompt, policy)
        return chat_input_ids(loaded.tokenizer, kept), dropped, max_prompt


__all__ = [
    "Engine", "LoadReport", "ModelEvictedError", "UnloadReport", "UnknownModelError", "ModelLoadError", "ModelSourceError",
    "ContextOverflowError", "KVPrecision", "OverflowPolicy",
]
