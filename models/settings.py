"""What a load asks for, typed: LoadOptions (the app's switches), LoadSettings (built from the
user's numbers in one place) and ModelKey (the identity of a loaded model)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .catalog import ModelRef
from .messages import UserFacingError
from .quant import Quant, parse_quant

GIB = 1024**3


class ModelLoadError(UserFacingError):
    """Loading failed for a reason the user can act on; the message says which."""


@dataclass(frozen=True)
class LoadOptions:
    """The app-wide load switches from the command line (the same for every load it makes)."""

    trust_remote_code: bool = False  # runs Python code shipped with a model: only by explicit opt-in
    stream_offload: bool = True  # False: accelerate's copy-on-call hooks (--accelerate-offload)
    cache_dir: Path | None = None  # None: the engine's cache folder


@dataclass(frozen=True)
class LoadSettings:
    """How to load: quantization, memory budget, context to plan for."""

    quant: Quant = Quant.NONE
    double_quant: bool = False
    gpu_budget_bytes: int | None = None  # None: free VRAM minus a margin; ignored without a GPU
    context_tokens: int = 4096
    trust_remote_code: bool = False
    cache_dir: Path | None = None
    # fp16/bf16 layers offloaded to CPU RAM are page-locked and prefetched a layer ahead by
    # models/offload.py: 4.2 tok/s for a 7B under 8 GiB on an H200 against 0.6 with accelerate's
    # copy-on-call hooks (bench/decode_speed.py; ../BENCHMARKS.md). --accelerate-offload turns it off.
    stream_offload: bool = True

    @classmethod
    def from_user(cls, quant: Quant | str = Quant.NONE, gpu_budget_gib: float | None = None,
                  context_tokens: int = 4096, double_quant: bool = False,
                  options: LoadOptions | None = None) -> "LoadSettings":
        """Settings from what a user gave (a quantization name, GiB, tokens): the one place they are converted.

        Ranges are the front end's to check (it names its own controls); a budget of None or 0
        means the default (free VRAM minus a margin). An unknown quantization name raises
        UserFacingError listing the valid ones.
        """
        options = options or LoadOptions()
        budget = int(float(gpu_budget_gib) * GIB) if gpu_budget_gib else None
        return cls(quant=quant if isinstance(quant, Quant) else parse_quant(str(quant)),
                   double_quant=bool(double_quant), gpu_budget_bytes=budget, context_tokens=int(context_tokens),
                   trust_remote_code=options.trust_remote_code, cache_dir=options.cache_dir,
                   stream_offload=options.stream_offload)


@dataclass(frozen=True)
class ModelKey:
    """The identity of a resident model: what it is and how it was loaded (a remote one: where it is)."""

    location: str
    quant: Quant | None = None  # None: a remote engine (the server decides precision and context)
    double_quant: bool = False
    context_tokens: int = 0

    @classmethod
    def of(cls, ref: ModelRef, settings: LoadSettings) -> "ModelKey":
        """The key of `ref` loaded with `settings` (double quant only counts for 4-bit NF4)."""
        if ref.kind == "remote":
            return cls(ref.location)
        return cls(ref.location, settings.quant, settings.double_quant and settings.quant is Quant.NF4,
                   settings.context_tokens)

    @property
    def remote(self) -> bool:
        """Whether this is a remote engine's model."""
        return self.quant is None

    def __str__(self) -> str:
        if self.quant is None:
            return f"{self.location}|remote"
        return f"{self.location}|{self.quant.value}{'+dq' if self.double_quant else ''}|ctx{self.context_tokens}"
