"""What quantization costs in quality: perplexity and top-1 agreement against full precision.

Both loads read the same fixed text (prompts/quality_text.txt) in one forward pass each.
Perplexity is exp(mean negative log-likelihood of each next token); top-1 agreement is
the fraction of positions where both loads rank the same next token first. Next to them:
the weights' memory each load measured, and decode speed on a short greedy answer.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from models.facade import (
    Engine, LoadedModel, LoadSettings, ModelKey, ModelLoadError, Quant, SamplingSettings, is_remote,
)

from .prompt_sets import QUALITY_TEXT
from .runner import ConfigSpec, make_resident

ProgressFn = Callable[[float, str], None]
MAX_TOKENS = 512  # the shipped text is ~450 tokens; longer texts are cut so the logits stay small
LOGIT_CHUNK = 128  # positions per log-softmax step: [128, vocab] floats at a time, not [T, vocab]
DECODE_PROMPT = [{"role": "user", "content": "Describe a lighthouse at night in a few sentences."}]


@dataclass(frozen=True)
class TextScore:
    """How one load predicts the fixed text, and what it costs."""

    label: str
    dtype: str
    tokens: int  # next-token predictions scored (text tokens - 1)
    mean_nll: float
    top1: tuple[int, ...]  # the load's most likely next token at each position
    forward_s: float
    weights_bytes: int
    load_s: float
    decode_tokens_per_s: float | None = None
    placement: str = "gpu"  # the load's plan verdict: gpu | cpu | offload | disk

    @property
    def perplexity(self) -> float:
        """exp(mean NLL): lower is better; 1.0 would mean certain of every token."""
        return math.exp(self.mean_nll)

    @property
    def forward_tokens_per_s(self) -> float:
        """Tokens per second of the scoring forward pass (prefill speed)."""
        return (self.tokens + 1) / self.forward_s if self.forward_s > 0 else float("nan")


@dataclass(frozen=True)
class QualityReport:
    """A quantized load against full precision on the same text; `full` is None when it could not be measured."""

    model: str
    quant: Quant
    quantized: TextScore | None
    full: TextScore | None
    note: str = ""  # why something is missing (e.g. full precision does not fit here)

    @property
    def agreement(self) -> float | None:
        """Fraction of positions where both loads' top-1 next token is the same."""
        if self.full is None or self.quantized is None:
            return None
        return top1_agreement(self.full.top1, self.quantized.top1)

    @property
    def memory_saved_bytes(self) -> int | None:
        """Weights bytes the quantization saves (measured, on the compute device)."""
        if self.full is None or self.quantized is None:
            return None
        return self.full.weights_bytes - self.quantized.weights_bytes

    @property
    def decode_speedup(self) -> float | None:
        """Quantized decode tok/s ÷ full-precision decode tok/s (above 1: faster)."""
        if self.full is None or self.quantized is None:
            return None
        a, b = self.full.decode_tokens_per_s, self.quantized.decode_tokens_per_s
        return b / a if a and b else None


def top1_agreement(a: tuple[int, ...], b: tuple[int, ...]) -> float:
    """Fraction of equal entries of two same-length sequences of token ids."""
    if len(a) != len(b) or not a:
        raise ValueError(f"Cannot compare top-1 tokens of {len(a)} and {len(b)} positions")
    return sum(x == y for x, y in zip(a, b)) / len(a)


def read_quality_text(path: Path = QUALITY_TEXT) -> str:
    """The fixed text the check scores."""
    return path.read_text(encoding="utf-8")


def text_ids(tokenizer, text: str, max_tokens: int = MAX_TOKENS) -> list[int]:
    """Token ids of `text` (no chat template: plain prose), cut to `max_tokens`."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
    if len(ids) < 2:
        raise ValueError("The quality text needs at least two tokens")
    return ids


@torch.inference_mode()
def next_token_scores(model: torch.nn.Module, ids: list[int], device: torch.device) -> tuple[float, tuple[int, ...]]:
    """(mean NLL of each next token, argmax next token at each position) in one forward pass."""
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)
    logits = model(input_ids=input_ids, use_cache=False).logits[0, :-1]  # [T-1, vocab]
    targets = input_ids[0, 1:].to(logits.device)  # [T-1]
    nll_sum = 0.0
    top1: list[int] = []
    for start in range(0, logits.shape[0], LOGIT_CHUNK):
        chunk = logits[start:start + LOGIT_CHUNK].float()  # float32 for an exact log-softmax
        logp = torch.log_softmax(chunk, dim=-1)
        nll_sum -= logp.gather(1, targets[start:start + LOGIT_CHUNK, None]).sum().item()
        top1 += chunk.argmax(dim=-1).tolist()
    return nll_sum / len(top1), tuple(top1)


def score_loaded(engine: Engine, key: ModelKey, loaded: LoadedModel, ids: list[int], label: str, load_s: float,
                 decode_tokens: int) -> TextScore:
    """Score the fixed text with a resident model (under the engine's GPU lock), then time a short answer."""
    def forward():
        started = time.perf_counter()
        nll, top1 = next_token_scores(loaded.model, ids, loaded.input_device)
        return nll, top1, time.perf_counter() - started

    nll, top1, seconds = engine.run_exclusive(forward)
    decode = None
    if decode_tokens > 0:
        stats = None
        for update in engine.chat(DECODE_PROMPT, SamplingSettings(decode_tokens, 0.0), threading.Event(), model=key):
            stats = update.stats
        decode = stats.decode_tokens_per_s if stats else None
    # An offloaded load holds only part of its weights on the compute device; its whole size is the plan's.
    offloaded = not loaded.plan.verdict.resident_only
    weights = max(loaded.weights_bytes, loaded.plan.weights_bytes) if offloaded else loaded.weights_bytes
    return TextScore(label=label, dtype=loaded.dtype, tokens=len(top1), mean_nll=nll, top1=top1, forward_s=seconds,
                     weights_bytes=weights, load_s=load_s, decode_tokens_per_s=decode, placement=loaded.plan.verdict.value)


def quality_check(engine: Engine, model: str, quant: Quant, base: LoadSettings | None = None, text: str | None = None,
                  decode_tokens: int = 32, progress: ProgressFn | None = None) -> QualityReport:
    """Compare `quant` with full precision (quant "none") of the same model on the fixed text."""
    base = base or LoadSettings()
    if is_remote(model):
        raise ModelLoadError("remote_logits", model=model)
    text = read_quality_text() if text is None else text
    quantized_spec, full_spec = ConfigSpec(model, quant), ConfigSpec(model, Quant.NONE)
    _, full_plan = engine.plan(model, full_spec.settings(base))
    if not full_plan.verdict.loadable:
        # Without the reference there is nothing honest to report: say so instead of guessing.
        note = (f"Full precision does not fit on this machine ({full_plan.message}), so the quality cost of "
                f"{quant.value} cannot be measured here. Run the check where full precision fits.")
        return QualityReport(model, quant, None, None, note)
    scores: dict[str, TextScore] = {}
    ids: list[int] | None = None
    steps = [("full", full_spec), ("quantized", quantized_spec)]
    for i, (name, spec) in enumerate(steps):
        if progress:
            progress(i / len(steps), f"Loading {spec.label}…")
        started = time.perf_counter()
        report = make_resident(engine, spec, base)
        load_s = 0.0 if report.reused else time.perf_counter() - started
        ids = ids if ids is not None else text_ids(report.loaded.tokenizer, text)
        if progress:
            progress((i + 0.5) / len(steps), f"Scoring the text with {spec.label}…")
        key = engine.model_key(spec.model, spec.settings(base))
        scores[name] = score_loaded(engine, key, report.loaded, ids, spec.label, load_s, decode_tokens)
    if progress:
        progress(1.0, "Done")
    return QualityReport(model, quant, quantized=scores["quantized"], full=scores["full"])


def format_report(report: QualityReport) -> str:
    """A short plain-text summary for the terminal."""
    if report.full is None or report.quantized is None:
        return report.note
    f, q = report.full, report.quantized
    lines = [
        f"{report.model}: {q.label} vs {f.label} on {f.tokens} next-token predictions",
        f"  perplexity      {f.perplexity:8.3f} (full)   {q.perplexity:8.3f} ({report.quant.value})",
        f"  top-1 agreement {report.agreement:.1%}",
        f"  weights         {f.weights_bytes / 2**20:8.1f} MiB → {q.weights_bytes / 2**20:8.1f} MiB "
        f"(saved {report.memory_saved_bytes / 2**20:.1f} MiB)",
    ]
    if report.decode_speedup is not None:
        lines.append(f"  decode          {f.decode_tokens_per_s:8.1f} tok/s → {q.decode_tokens_per_s:8.1f} tok/s "
                     f"(×{report.decode_speedup:.2f})")
    return "\n".join(lines)


__all__ = ["TextScore", "QualityReport", "quality_check", "top1_agreement", "next_token_scores", "format_report"]
