"""What the engine reports after a load or an unload (exported by models/facade.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .loading import LoadedModel


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
