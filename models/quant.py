"""Quantization choices as data: what each option stores, and where it can run."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class Quant(str, Enum):
    """How the weights are held in memory. Chosen explicitly, never inferred from a name."""

    NONE = "none"  # full precision: fp16 on a GPU, fp32 on a CPU
    BF16 = "bf16"
    INT8 = "8bit"  # bitsandbytes LLM.int8
    NF4 = "4bit"  # bitsandbytes NF4, fp16 compute
    INT4 = "int4"  # int4 weight-only, group 128, our Triton kernels (models/kernels), bf16 compute, CUDA sm80+; fast path

    @property
    def label(self) -> str:
        """What the UI calls this choice."""
        return _LABELS[self]


_LABELS = {
    Quant.NONE: "none (fp16 on GPU, fp32 on CPU)",
    Quant.BF16: "bf16",
    Quant.INT8: "8bit (bitsandbytes LLM.int8)",
    Quant.NF4: "4bit (bitsandbytes NF4)",
    Quant.INT4: "4bit-fast (int4, Triton kernels)",
}
INT4_MIN_SM = 80  # the int4 kernels compute in bf16, which needs Ampere or newer


@dataclass(frozen=True)
class QuantOption:
    """A quantization choice on this device: whether it can run, and why not if it can't."""

    quant: Quant
    available: bool
    reason: str = ""
    code: str = ""  # names the reason for translations (ui/i18n: "quant_<code>"); values in params
    params: dict = field(default_factory=dict)


def storage_dtype(quant: Quant, device: str) -> str:
    """Dtype of everything bitsandbytes does not quantize (embeddings, norms, lm_head)."""
    if quant in (Quant.BF16, Quant.INT4):  # the int4 kernels take bf16 activations
        return "bfloat16"
    if device == "cuda":
        return "float16"
    # On a CPU, full precision means fp32 (fp16 matmuls are slow or missing there); the
    # bnb paths compute in bf16 on CPU, the fastest 16-bit type it has.
    return "float32" if quant is Quant.NONE else "bfloat16"


def streams_offload(quant: Quant) -> bool:
    """Whether CPU-offloaded layers of this quantization go through models/offload.py.

    Plain fp16/bf16 tensors can be packed, page-locked and copied ahead of use. bitsandbytes
    layers carry quantization state objects and keep accelerate's copy-on-call offload (its
    fp32 CPU path); the int4 fast path never offloads.
    """
    return quant in (Quant.NONE, Quant.BF16)


def dtype_bytes(dtype: str) -> int:
    """Bytes per element of a dtype name."""
    return {"float32": 4, "float16": 2, "bfloat16": 2}[dtype]


def quant_options(device: str, compute_capability: tuple[int, int] | None = None) -> list[QuantOption]:
    """Every quantization with whether it runs here; unavailable ones carry the reason."""
    if device != "cuda":
        return [
            QuantOption(Quant.NONE, True),
            QuantOption(Quant.BF16, True),
            QuantOption(Quant.INT8, True),
            QuantOption(Quant.NF4, True),
            QuantOption(Quant.INT4, False, "4bit-fast (int4) needs a CUDA GPU (Ampere or newer, sm80+)", "int4_no_cuda"),
        ]
    major, minor = compute_capability or (0, 0)
    sm = major * 10 + minor
    return [
        QuantOption(Quant.NONE, True),
        QuantOption(Quant.BF16, sm >= 80, "" if sm >= 80 else f"bf16 needs an Ampere or newer GPU (sm80+); this GPU is sm{sm}",
                    "bf16_old_gpu", {"sm": sm}),
        QuantOption(Quant.INT8, sm >= 75, "" if sm >= 75 else f"LLM.int8 needs a Turing or newer GPU (sm75+); this GPU is sm{sm}",
                    "int8_old_gpu", {"sm": sm}),
        QuantOption(Quant.NF4, sm >= 60, "" if sm >= 60 else f"NF4 needs a Pascal or newer GPU (sm60+); this GPU is sm{sm}",
                    "nf4_old_gpu", {"sm": sm}),
        _int4_option(sm),
    ]


def _int4_option(sm: int) -> QuantOption:
    if sm < INT4_MIN_SM:
        return QuantOption(Quant.INT4, False, f"4bit-fast (int4) needs an Ampere or newer GPU (sm80+); this GPU is sm{sm}",
                           "int4_old_gpu", {"sm": sm})
    try:
        import triton  # noqa: F401  (CUDA builds of torch bring it)
    except ImportError:
        return QuantOption(Quant.INT4, False, "4bit-fast needs Triton, which CUDA builds of torch bring (pip install triton)",
                           "int4_no_triton")
    return QuantOption(Quant.INT4, True)


def default_quant(device: str, compute_capability: tuple[int, int] | None = None) -> QuantOption:
    """The quantization the app picks by default here, with the reason in words.

    The fastest that works: our int4 kernels with the static-cache CUDA-graph decoder on sm80+
    GPUs; bitsandbytes NF4 on older GPUs; full precision on a CPU (bitsandbytes' CPU
    kernels are no faster, and fp32 is exact).
    """
    if device != "cuda":
        return QuantOption(Quant.NONE, True, "no CUDA GPU: full precision runs best on a CPU")
    options = {o.quant: o for o in quant_options(device, compute_capability)}
    if options[Quant.INT4].available:
        return QuantOption(Quant.INT4, True, "fastest here: int4 + static KV cache + CUDA-graph decode "
                                             "(~4x less memory traffic per token than fp16)")
    if options[Quant.NF4].available:
        return QuantOption(Quant.NF4, True, f"bitsandbytes NF4: {options[Quant.INT4].reason}")
    return QuantOption(Quant.NONE, True, f"full precision: {options[Quant.NF4].reason}")


def parse_quant(text: str) -> Quant:
    """Parse a CLI/UI quantization name, with a message listing the valid ones."""
    try:
        return Quant(text.strip().lower())
    except ValueError:
        raise ValueError(f"Unknown quantization {text!r}; choose one of: {', '.join(q.value for q in Quant)}") from None
