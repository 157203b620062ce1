"""Which models are resident, and making a session's own model resident when its turn comes.

Every browser session (and an API caller allowed to load) picks its own model and quantization;
the engine keeps several resident while they fit the budget (VRAM on a GPU, RAM on a CPU) and
unloads the least recently used otherwise. A session's model is made resident in that session's own
answer's turn on the GPU (models/gpu_queue.py: its ticket holds the GPU), so nothing is unloaded under
an answer in flight: the holder is the only one computing, and those waiting are told it is loading. (A comparison pins its model by key after
loading it outside an answer; if another session's turn unloaded it meanwhile, the answer
fails with ModelEvictedError and compare/runner.py loads it again, once.)
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Generator, Iterator

from .catalog import ModelRef
from .generation import GenerationStats, StreamUpdate
from .gpu_queue import Ticket, Work
from .loading import LoadedModel, prepare_load
from .messages import Message
from .placement import plan_for
from .remote import remote_of
from .reports import LoadReport
from .settings import LoadSettings, ModelKey

if TYPE_CHECKING:
    from .engine import Engine

ProgressFn = Callable[[float, str], None]


@dataclass(frozen=True)
class ModelSpec:
    """A model as a user chose it: what (catalog id, folder, .gguf, hub id or openai:URL) and how to load it."""

    choice: str
    settings: LoadSettings
    # The identity it was loaded as, once known: while resident it answers without resolving the choice
    # again (its folder may have gone since; the weights are in memory).
    key: ModelKey | None = None


@dataclass(frozen=True)
class ResidentModel:
    """One line of the status every tab shares: a model in memory, or one being loaded."""

    label: str  # "smollm2-135m-instruct (4bit)"
    where: str  # "cuda" | "cpu" | "remote"
    loading: bool = False


def model_label(ref: ModelRef, key: ModelKey) -> str:
    """'smollm2-135m-instruct (4bit)': the model and the quantization it was loaded with (a remote one: its name)."""
    return ref.label if key.quant is None else f"{ref.label} ({key.quant.value})"


def resident_status(engine: "Engine") -> list[ResidentModel]:
    """What is in memory now, most recently used first, then what is being loaded (read without the lock)."""
    residents = list(engine._residents.items())  # a copy: answers and loads change it under the lock
    entries = [ResidentModel(model_label(m.ref, k), "remote" if remote_of(m) is not None else m.device)
               for k, m in reversed(residents)]
    loading = engine._loading
    if loading is not None:
        entries.append(ResidentModel(loading, engine.device, loading=True))
    return entries


def ensure_locked(engine: "Engine", ref: ModelRef, key: ModelKey, settings: LoadSettings,
                  progress: ProgressFn | None = None, keep: tuple[ModelKey, ...] = ()) -> LoadReport:
    """Make a local model resident; the caller holds the GPU lock (Engine.ensure, or an answer's turn).

    Residents other than `keep` are unloaded, least recently used first, until the new model
    fits (on the GPU without offload, or in RAM). A model that cannot load even with those
    unloaded fails before anything is unloaded.
    """
    if key in engine._residents:
        engine._residents.move_to_end(key)
        return LoadReport(loaded=engine._residents[key], reused=True)
    started = time.perf_counter()
    engine._loading = model_label(ref, key)  # the shared status says so while it loads
    try:
        prepared = prepare_load(ref, settings, engine._budget(settings, set(keep)), progress)
        unloaded = []
        for other in list(engine._residents):  # least recently used first
            fits = plan_for(prepared.shape, settings, engine._budget(settings, set(engine._residents)))
            if fits.verdict.resident_only:
                break  # fits next to everything still loaded
            if other not in keep and remote_of(engine._residents[other]) is None:  # a remote one frees nothing here
                unloaded.append(engine._unload_locked(other))
        loaded = engine._load_locked(prepared, key, progress)
    finally:
        engine._loading = None
    return LoadReport(loaded=loaded, unloaded=unloaded, switch_seconds=time.perf_counter() - started)


def notice(code: str, **params) -> StreamUpdate:
    """A status line for the asking session's stream (no answer text yet): StreamUpdate.notice."""
    return StreamUpdate(text="", stats=GenerationStats(prompt_tokens=0), notice=Message(code, params))


def resident_for_answer(engine: "Engine", key: ModelKey, spec: ModelSpec,
                        ticket: Ticket | None = None) -> Generator[StreamUpdate, None, LoadedModel]:
    """The session's model for the answer whose turn it is (the caller holds the GPU: `ticket`), loaded first if need be.

    The load is said in that session's stream only: a notice before it and one with its time
    after it (and what it unloaded to make room). Those waiting in the GPU's queue meanwhile read
    that another user's model is loading, and how far (the ticket's work is a load while it runs).
    """
    loaded = engine._residents.get(key)
    if loaded is None:
        ref = engine.resolve(spec.choice)
        label = model_label(ref, key)
        yield notice("loading_for_you", model=label)
        if ticket is None:
            report = ensure_locked(engine, ref, key, spec.settings)
        else:
            with ticket.doing(Work.load(ref.label, spec.settings.quant.value)):
                report = ensure_locked(engine, ref, key, spec.settings, ticket.reporting(None))
        gone = ", ".join(u.model_label for u in report.unloaded)
        yield notice("loaded_for_you_unloaded" if gone else "loaded_for_you", model=label,
                     seconds=f"{report.switch_seconds:.1f}", unloaded=gone)
        loaded = report.loaded
    engine._residents.move_to_end(key)
    return loaded


def labelled(updates: Iterator[StreamUpdate], label: str) -> Iterator[StreamUpdate]:
    """The updates with stats.model set to the model that writes them; closing this closes the answer."""
    try:
        for update in updates:
            update.stats.model = label
            yield update
    finally:
        close = getattr(updates, "close", None)
        if close is not None:
            close()  # stops the computation if our caller left early (a no-op once it is done)


def answer_target(engine: "Engine", model: ModelKey | None,
                  spec: ModelSpec | None) -> tuple[ModelKey | None, str, ModelSpec | None]:
    """(key, label, spec to make resident) for an answer: a pinned `model` as it is, else the session's `spec`.

    A remote engine's model is connected here, outside the lock: a server that times out holds no one up.
    """
    if model is not None or spec is None:
        loaded = engine._residents.get(model) if model is not None else None
        return model, model_label(loaded.ref, model) if loaded is not None else "", None
    loaded = engine._residents.get(spec.key) if spec.key is not None else None
    if loaded is not None:
        return spec.key, model_label(loaded.ref, spec.key), spec
    ref = engine.resolve(spec.choice)
    key = ModelKey.of(ref, spec.settings)
    spec = ModelSpec(spec.choice, engine._with_cache_dir(spec.settings), key)
    if ref.kind == "remote":
        engine.ensure(spec.choice, spec.settings)
    return key, model_label(ref, key), spec
