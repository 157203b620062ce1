"""Run prompts through model/quantization configurations: A vs B on one prompt, or a whole set.

Every configuration gets the same sampling settings and seed. Models are made resident
with engine.ensure(): when A and B fit the budget together both stay loaded; when they
do not, loading one evicts the other (the engine never loads past the budget), and the
swap is reported with its time. The engine serializes GPU work, so A answers, then B.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, replace
from typing import Callable, Iterator

from models.facade import (
    Engine, GenerationStats, LoadReport, LoadSettings, Message, ModelEvictedError, ModelLoadError, Quant,
    SamplingSettings, UserFacingError, Verdict, internal_error, is_remote, parse_quant,
)

from .prompt_sets import PromptSet
from .scoring import Score, score_answer

ProgressFn = Callable[[float, str], None]
MiB = 1024 ** 2


class StopSwitch:
    """A run's Stop button: ends the answer in progress and skips every answer after it.

    Each answer needs its own Event (the generation code sets it when the answer ends, to
    stop its worker), so the switch hands out a fresh one per answer and sets the current one on stop().
    """

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._requested = False
        self._current = threading.Event()

    @property
    def requested(self) -> bool:
        """Whether stop() was called."""
        return self._requested

    def answer_event(self) -> threading.Event:
        """A fresh Event for the next answer (already set if the run was stopped)."""
        with self._guard:
            self._current = threading.Event()
            if self._requested:
                self._current.set()
            return self._current

    def stop(self) -> None:
        """Stop the answer in progress and the rest of the run."""
        with self._guard:
            self._requested = True
            self._current.set()


@dataclass(frozen=True)
class ConfigSpec:
    """One configuration to compare: a model (catalog id, folder, .gguf, hub id) and a quantization."""

    model: str
    quant: Quant = Quant.NONE

    @property
    def label(self) -> str:
        """'model:quant', the form parse_spec reads back."""
        return f"{self.model or 'default'}:{self.quant.value}"

    def settings(self, base: LoadSettings) -> LoadSettings:
        """`base` (budget, context) with this configuration's quantization."""
        return replace(base, quant=self.quant)


def parse_spec(text: str) -> ConfigSpec:
    """Parse 'MODEL[:QUANT]' (e.g. 'smollm2-135m-instruct:4bit'); QUANT defaults to none.

    A remote engine 'openai:http://HOST:PORT/v1[#NAME]' has colons of its own: only a trailing
    ':QUANT' that names a quantization is split off it (the server decides its precision anyway).
    """
    text = (text or "").strip()
    if not text:
        raise UserFacingError("empty_config")
    model, sep, quant = text.rpartition(":")
    if is_remote(text):
        try:
            return ConfigSpec(model.strip(), parse_quant(quant)) if is_remote(model) else ConfigSpec(text)
        except UserFacingError:  # not a quantization: part of the URL
            return ConfigSpec(text)
    if not sep or len(model) == 1:  # no quant given (a lone letter before ':' is a Windows drive)
        return ConfigSpec(text, Quant.NONE)
    try:
        return ConfigSpec(model.strip(), parse_quant(quant))
    except UserFacingError as e:
        raise UserFacingError("bad_config", text=text, detail=e.message) from None


@dataclass
class Side:
    """One configuration's part of a comparison: its load and its answer so far."""

    spec: ConfigSpec
    status: str = "waiting"  # waiting | loading | streaming | done | error
    text: str = ""
    stats: GenerationStats | None = None
    load: LoadReport | None = None
    error: str = ""  # in English (exports); `failure` says it in any language
    failure: Message | None = None
    queued: Message | None = None  # while its answer waits for the GPU: where it stands and why

    @property
    def swapped_out(self) -> list[str]:
        """Models unloaded to make room for this one."""
        return [u.model_label for u in self.load.unloaded] if self.load else []


@dataclass
class Comparison:
    """The state of an A/B comparison, yielded whole after every change."""

    sides: list[Side]
    fit_together: bool | None = None  # the plan's verdict on keeping all of them resident
    done: bool = False

    @property
    def swapped(self) -> bool:
        """Whether loading any side unloaded another model."""
        return any(side.swapped_out for side in self.sides)

    @property
    def swap_seconds(self) -> float:
        """Time spent unloading and loading on the swaps."""
        return sum(side.load.switch_seconds for side in self.sides if side.load and side.swapped_out)


def make_resident(engine: Engine, spec: ConfigSpec, base: LoadSettings, progress: ProgressFn | None = None) -> LoadReport:
    """Load (or reuse) a configuration, evicting others only when the budget needs it; refuse what won't fit."""
    settings = spec.settings(base)
    _, alone = engine.plan(spec.model, settings)  # residents count as given back: could it fit at all?
    if not alone.verdict.loadable:
        raise ModelLoadError("no_fit_compare", model=spec.label, plan=alone.reason)
    # ensure() keeps what fits next to the new model and unloads the least recently used otherwise.
    report = engine.ensure(spec.model, settings, progress=progress)
    return report


def _failure(error: BaseException, where: str) -> Message:
    """What a run reports for an error: the user's own (a UserFacingError), else an internal error logged as a bug."""
    if isinstance(error, UserFacingError):
        return error.message
    return internal_error(error, where)


def fits_together(engine: Engine, specs: list[ConfigSpec], base: LoadSettings) -> bool:
    """Whether all configurations fit the budget at once, by the engine's plans (before loading anything)."""
    # One plan per distinct model: A and B may be the same configuration, loaded once.
    plans = list({engine.model_key(s.model, s.settings(base)): engine.plan(s.model, s.settings(base))[1]
                  for s in specs}.values())
    plans = [p for p in plans if p.verdict is not Verdict.REMOTE]  # a remote engine's model takes no memory here
    if not plans:
        return True
    if any(not p.verdict.resident_only for p in plans):
        return False
    # Each plan's budget counts every resident as given back: the whole budget. What each model
    # holds while idle stays (its weights; for 4bit-fast also its static KV cache, allocated at
    # load), and the largest peak on top of that must fit next to them.
    held = [p.weights_bytes + (p.kv_bytes if p.quant is Quant.INT4 else 0) for p in plans]
    extra = max(p.predicted_peak_bytes - h for p, h in zip(plans, held))
    return sum(held) + extra <= min(p.budget_bytes for p in plans)


def compare(engine: Engine, specs: list[ConfigSpec], messages: list[dict], sampling: SamplingSettings,
            stop: StopSwitch | None = None, base: LoadSettings | None = None) -> Iterator[Comparison]:
    """Answer one chat with each configuration in turn, yielding the whole comparison as it streams."""
    base = base or LoadSettings()
    stop = stop or StopSwitch()
    state = Comparison(sides=[Side(spec) for spec in specs])
    try:
        state.fit_together = fits_together(engine, specs, base) if len(specs) > 1 else True
    except UserFacingError:
        state.fit_together = None  # an unknown model: its side reports the error below
    yield state
    for side in state.sides:
        if stop.requested:
            side.status, side.error = "error", "stopped"
            continue
        side.status = "loading"
        yield state
        try:
            for attempt in range(2):
                side.load = make_resident(engine, side.spec, base)
                side.status = "streaming"
                yield state
                key = engine.model_key(side.spec.model, side.spec.settings(base))
                try:
                    for update in engine.chat(messages, sampling, stop.answer_event(), model=key):
                        side.text, side.stats = update.text, update.stats
                        side.queued = update.waiting.message() if update.waiting is not None else None
                        yield state
                    break
                except ModelEvictedError:
                    # Another user's load took its memory between our load and our answer: load it
                    # again, once; a second eviction is reported (the GPU is too contended).
                    if attempt:
                        raise
            side.status = "done"
        except Exception as e:  # noqa: BLE001 - reported on this side; the other side still runs
            side.failure = _failure(e, "compare")
            side.status, side.error = "error", str(side.failure)
        yield state
    state.done = True
    yield state


@dataclass
class ResultRow:
    """One answer of a batch run: what was asked, which configuration, what came back and how fast."""

    set: str
    question_no: int  # 1-based, as in the file
    question: str
    config: str
    answer: str = ""
    prompt_tokens: int = 0
    new_tokens: int = 0
    ttft_s: float | None = None
    tokens_per_s: float | None = None
    total_s: float | None = None
    peak_mib: float | None = None  # this configuration's own peak (on a CPU: its tensors + KV cache)
    process_rss_mib: float | None = None  # CPU only: the whole process (every model and library), for reference
    weights_mib: float | None = None
    load_s: float | None = None  # the configuration's load (on its first question; 0 when it was resident)
    swapped_out: str = ""  # models unloaded to load this configuration
    finish: str = ""
    keywords: str = ""  # "2/3" found
    reference_match: bool | None = None
    score: float | None = None
    error: str = ""

    @classmethod
    def columns(cls) -> list[str]:
        """Column names, in export order."""
        return list(cls.__dataclass_fields__)

    def as_dict(self) -> dict:
        """The row as a plain dict (JSON-ready)."""
        return {name: getattr(self, name) for name in self.columns()}


@dataclass
class BatchEvent:
    """Progress of a batch run: a finished row (or None while loading), and how far it is."""

    done: int
    total: int
    row: ResultRow | None = None
    message: str = ""


def _row(prompt_set: PromptSet, index: int, spec: ConfigSpec, stats: GenerationStats | None, text: str,
         score: Score | None) -> ResultRow:
    question = prompt_set.questions[index]
    row = ResultRow(set=prompt_set.name, question_no=index + 1, question=question.text, config=spec.label, answer=text)
    if stats is not None:
        row.prompt_tokens, row.new_tokens, row.finish = stats.prompt_tokens, stats.new_tokens, stats.finish_reason
        row.ttft_s = _round(stats.ttft_s, 3)
        row.tokens_per_s = _round(stats.decode_tokens_per_s, 2)
        row.total_s = _round(stats.total_s, 3)
        row.peak_mib = _round(stats.peak_bytes / MiB, 1)
        row.process_rss_mib = _round(stats.process_rss_bytes / MiB, 1) if stats.process_rss_bytes else None
    if score is not None:
        row.keywords = f"{score.keywords_hit}/{score.keywords_total}" if score.keywords_total else ""
        row.reference_match = score.reference_match
        row.score = _round(score.value, 3)
    return row


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def run_batch(engine: Engine, prompt_set: PromptSet, specs: list[ConfigSpec], sampling: SamplingSettings,
              stop: StopSwitch | None = None, base: LoadSettings | None = None) -> Iterator[BatchEvent]:
    """Run every question through every configuration, yielding each row as it is done.

    Configuration by configuration (not question by question), so a budget that holds one
    model at a time swaps once per configuration, not once per question.
    """
    base = base or LoadSettings()
    stop = stop or StopSwitch()
    total = len(prompt_set.questions) * len(specs)
    done = 0
    for spec in specs:
        if stop.requested:
            return
        yield BatchEvent(done, total, message=f"Loading {spec.label}…")
        started = time.perf_counter()
        try:
            report = make_resident(engine, spec, base)
        except Exception as e:  # noqa: BLE001 - every row of this configuration reports it; the rest still run
            failure = str(_failure(e, "batch load"))
            for index in range(len(prompt_set.questions)):
                done += 1
                row = _row(prompt_set, index, spec, None, "", None)
                row.error = failure
                yield BatchEvent(done, total, row, message=f"{spec.label}: {failure}")
            continue
        load_s = 0.0 if report.reused else time.perf_counter() - started
        key = engine.model_key(spec.model, spec.settings(base))
        for index, question in enumerate(prompt_set.questions):
            if stop.requested:
                return
            stats, text, error = None, "", ""
            try:
                for attempt in range(2):
                    try:
                        for update in engine.chat(prompt_set.messages(question), sampling, stop.answer_event(),
                                                  model=key):
                            stats, text = update.stats, update.text
                        break
                    except ModelEvictedError:  # another user's load took its memory: load it again, once
                        if attempt:
                            raise
                        report = make_resident(engine, spec, base)
            except Exception as e:  # noqa: BLE001 - the row reports it; the next questions still run
                error = str(_failure(e, "batch answer"))
            done += 1
            row = _row(prompt_set, index, spec, stats, text, score_answer(text, question) if not error else None)
            row.error = error
            row.weights_mib = _round(report.loaded.weights_bytes / MiB, 1)
            if index == 0:
                row.load_s = _round(load_s, 2)
                row.swapped_out = ", ".join(u.model_label for u in report.unloaded)
            yield BatchEvent(done, total, row, message=f"{spec.label}: {done}/{total}")


def summarize(rows: list[ResultRow]) -> list[dict]:
    """Per configuration: answers, mean score, mean TTFT and tok/s, and the errors."""
    out = []
    for config in dict.fromkeys(r.config for r in rows):
        mine = [r for r in rows if r.config == config]
        out.append({
            "config": config,
            "answers": sum(1 for r in mine if not r.error),
            "score": _mean([r.score for r in mine]),
            "ttft_s": _mean([r.ttft_s for r in mine]),
            "tokens_per_s": _mean([r.tokens_per_s for r in mine]),
            "weights_mib": next((r.weights_mib for r in mine if r.weights_mib is not None), None),
            "errors": sum(1 for r in mine if r.error),
        })
    return out


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(sum(present) / len(present), 3) if present else None


__all__ = [
    "StopSwitch", "ConfigSpec", "parse_spec", "Side", "Comparison", "compare", "make_resident",
    "fits_together",
    "ResultRow", "BatchEvent", "run_batch", "summarize",
]
