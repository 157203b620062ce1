"""The engine facade: everything the front ends (ui/, api/, compare/, app.py) may use of models/.

Front ends import from here and nowhere deeper (tests/test_architecture.py enforces it), so
what is below can be split, renamed or replaced without touching them. It holds:
- the Engine, which owns the resident models, their KV caches and the GPU;
- typed requests and identities: LoadSettings (built by LoadSettings.from_user), LoadOptions,
  ModelKey, ModelSpec (a session's own model choice), Quant, SamplingSettings, KVPrecision, OverflowPolicy;
- what comes back: StreamUpdate/GenerationStats (answers, with the model that wrote them, any notice for
  the asking session, and Waiting while one waits for the GPU), LoadReport (loads), FitPlan with its
  Verdict (fit checks), MemorySnapshot (the memory panel), ResidentModel (what is in memory, for every tab);
- format_cache_report: what the cache folder holds, part by part, and what deleting each costs;
- one error base, UserFacingError (a message code and its values, rendered in any language from
  models/messages.py), and internal_error() for everything else (a bug: logged under an id).
"""

from __future__ import annotations

from .answer_stream import WAIT_SHOWN_S
from .catalog import Catalog, UnknownModelError, load_catalog
from .engine import Engine, LoadReport, UnloadReport
from .generation import (
    APP_TEMPERATURE, APP_TOP_P, ChatTemplateError, GenerationStats, SamplingDefaults, SamplingSettings,
    StreamUpdate, invalid_text_at, sampling_defaults,
)
from .gpu_queue import Waiting
from .hardware import MemorySnapshot
from .kv_cache import ContextOverflowError, KVPrecision, OverflowPolicy, kv_precision_options
from .loading import LoadedModel, NoChatTemplateError
from .local_answer import ModelEvictedError
from .memory import GiB, MiB, FitPlan, Verdict
from .cache_report import format_cache_report
from .messages import MESSAGES, Message, UserFacingError, file_logger, internal_error, render
from .model_roots import ModelRoots, OutsideModelRootsError, default_model_roots
from .process import limit_malloc_arenas, quiet_weight_loading_bar
from .quant import Quant, QuantOption, parse_quant
from .remote import EngineMetrics, is_remote, parse_remote, remote_of
from .residency import ModelSpec, ResidentModel
from .settings import LoadOptions, LoadSettings, ModelKey, ModelLoadError
from .sources import ModelSourceError, default_cache_dir


def served_by(loaded: LoadedModel | None) -> str | None:
    """The base URL of the remote engine serving a loaded model; None for a local model (or none)."""
    return parse_remote(loaded.ref.location).base_url if remote_of(loaded) is not None else None


def engine_metrics(loaded: LoadedModel | None) -> EngineMetrics | None:
    """A remote engine's own KV-cache use and queue (its /metrics), or None (local, or not reported)."""
    remote = remote_of(loaded)
    return remote.metrics() if remote is not None else None


def remote_context(loaded: LoadedModel | None) -> int | None:
    """A remote engine's context length for its model, when it says; None otherwise."""
    remote = remote_of(loaded)
    return remote.max_context if remote is not None else None


__all__ = [
    "APP_TEMPERATURE", "APP_TOP_P", "Catalog", "ChatTemplateError", "ContextOverflowError", "Engine",
    "EngineMetrics", "FitPlan", "GenerationStats", "GiB", "KVPrecision", "LoadOptions", "LoadReport",
    "LoadSettings", "LoadedModel", "MESSAGES", "MemorySnapshot", "Message", "MiB", "ModelEvictedError", "ModelKey",
    "ModelLoadError", "ModelRoots", "ModelSpec", "ResidentModel", "ModelSourceError", "NoChatTemplateError", "OutsideModelRootsError",
    "OverflowPolicy", "Quant", "QuantOption", "SamplingDefaults", "SamplingSettings", "StreamUpdate",
    "UnknownModelError", "UnloadReport", "UserFacingError", "Verdict", "WAIT_SHOWN_S", "Waiting", "default_cache_dir", "default_model_roots",
    "engine_metrics", "file_logger", "format_cache_report", "internal_error", "invalid_text_at", "is_remote", "kv_precision_options", "limit_malloc_arenas", "load_catalog", "parse_quant", "quiet_weight_loading_bar",
    "remote_context", "render", "sampling_defaults", "served_by",
]
