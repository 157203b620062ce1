"""Quantization choices as data: what each option stores, and where it can run."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from .messages import Message, UserFacingError


class Quant(str, Enum):
    """How the weights are held in memory. Chosen explicitly, never inferred from a name."""

    NONE = "none"  # full precision: fp16 on a GPU, fp32 on a CPU
    BF16 = "bf16"
    INT8 = "8bit"  # bitsandbytes LLM.int8
    NF4 = "4bit"  # bitsandbytes NF4, fp16 compute
    INT4 = "int4"  # int4 weight-only, group 128, our Triton kernels (models/kernels), bf16 compute, CUDA sm80+; fast path


# The values above are what CLI flags, saved exports and UI boxes hold, so they stay. These
# names say what each one is ("4bit" is bitsandbytes NF4; the UI calls int4 "4bit-fast").
ALIASES = {"nf4": Quant.NF4, "4bit-nf4": Quant.NF4, "4bit-fast": Quant.INT4, "int8": Quant.INT8,
           "fp16": Quant.NONE}
INT4_MIN_SM = 80  # the int4 kernels compute in bf16, which needs Ampere or newer


@dataclass(frozen=True)
class QuantOption:
    """A quantization choice on this device: whether it can run, and why not if it can't."""

    quant: Quant
    available: bool
    why: Message | None = None  # why it cannot run here (models/messages.py "quant_*")

    @property
    def reason(self) -> str:
        """Why it cannot run here, in English ("" when it can)."""
        return self.why.render("en") if self.why else ""


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
        return [QuantOption(q, True) for q in (Quant.NONE, Quant.BF16, Quant.INT8, Quant.NF4)] + [
            QuantOption(Quant.INT4, False, Message("quant_int4_no_cuda"))]
    major, minor = compute_capability or (0, 0)
    sm = major * 10 + minor

    def needs(quant: Quant, min_sm: int, code: str) -> QuantOption:
        ok = sm >= min_sm
        return QuantOption(quant, ok, None if ok else Message(code, {"sm": sm}))

    return [QuantOption(Quant.NONE, True), needs(Quant.BF16, 80, "quant_bf16_old_gpu"),
            needs(Quant.INT8, 75, "quant_int8_old_gpu"), needs(Quant.NF4, 60, "quant_nf4_old_gpu"), _int4_option(sm)]


def _int4_option(sm: int) -> QuantOption:
    if sm < INT4_MIN_SM:
        return QuantOption(Quant.INT4, False, Message("quant_int4_old_gpu", {"sm": sm}))
    try:
        import triton  # noqa: F401  (CUDA builds of torch bring it)
    except ImportError:
        return QuantOption(Quant.INT4, False, Message("quant_int4_no_triton"))
    return QuantOption(Quant.INT4, True)


def parse_quant(text: str) -> Quant:
    """Parse a CLI/UI quantization name or alias (UserFacingError listing the valid ones)."""
    name = text.strip().lower()
    try:
        return ALIASES.get(name) or Quant(name)
    except ValueError:
        raise UserFacingError("unknown_quant", quant=text, valid=", ".join(q.value for q in Quant)) from None
