"""Event handlers of the Compare tab: plain methods over the engine and compare/, testable without a browser.

Per-user data comes in as arguments (a CompareSession in gr.State holds the tab's Stop
switch); the engine is the only shared object and serializes GPU work itself.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Iterator

import gradio as gr

from compare.export import write_both
from compare.prompt_sets import PromptSet, PromptSetError, list_prompt_sets, load_prompt_set, parse_pasted
from compare.quality import QualityReport, quality_check
from compare.runner import (
    Comparison, ConfigSpec, ResultRow, Side, StopSwitch, compare, fits_together, parse_spec, run_batch, summarize,
)
from models.facade import Engine, LoadOptions, LoadSettings, SamplingSettings, UserFacingError, parse_quant, served_by

from .handlers import MAX_NEW_TOKENS_MAX, TEMPERATURE_MAX, TOP_P_MIN, BadNumber, failure_text, read_number
from .i18n import explain, t
from .panels import fmt_bytes

USER_ERRORS = (UserFacingError, BadNumber)  # anything else is a bug: failure_text gives it an id
# What the results table shows (the exports hold every ResultRow column).
TABLE_COLUMNS = ["question_no", "config", "question", "answer", "new_tokens", "ttft_s", "tokens_per_s", "peak_mib",
                 "load_s", "keywords", "score", "error"]
TABLE_HEADERS = ["#", "config", "question", "answer", "tokens", "TTFT s", "tok/s", "peak MiB", "load s", "keywords",
                 "score", "error"]
MiB = 1024 ** 2
MAX_UPLOAD_BYTES = 1 * MiB  # a prompt-set file is a few KiB of TOML


def table_headers(lang: str) -> list[str]:
    """The results table's column names in `lang`."""
    return [t(f"col_{c}", lang) for c in TABLE_COLUMNS]


class CompareSession:
    """One browser tab's private state on the Compare tab: its Stop switch. Fresh per tab."""

    def __init__(self) -> None:
        self.stop_switch = StopSwitch()

    def __deepcopy__(self, memo) -> "CompareSession":
        # gr.State deep-copies its initial value for every new tab: give each its own switch.
        return CompareSession()

    def new_run(self) -> StopSwitch:
        """A fresh Stop switch for the next run."""
        self.stop_switch = StopSwitch()
        return self.stop_switch


def prompt_set_choices() -> list[tuple[str, str]]:
    """(label, file stem) of every prompt set in prompts/, for the dropdown."""
    choices = []
    for path in list_prompt_sets():
        try:
            prompt_set = load_prompt_set(path)
            choices.append((f"{prompt_set.name} · {len(prompt_set.questions)} ({path.stem})", path.stem))
        except PromptSetError:
            choices.append((f"⚠️ {path.stem}", path.stem))  # listed anyway: running it shows the error
    return choices


def refresh_prompt_sets(current: str | None):
    """The prompt-set dropdown re-read from prompts/ (a file added while the app runs shows up)."""
    choices = prompt_set_choices()
    stems = [stem for _, stem in choices]
    return gr.update(choices=choices, value=current if current in stems else (stems[0] if stems else None))


class CompareHandlers:
    """Everything the Compare tab's events do."""

    def __init__(self, engine: Engine, options: LoadOptions | None = None):
        self.engine = engine
        self.options = options or LoadOptions()

    # ----- shared ------------------------------------------------------------------
    def base_settings(self, budget_gib: float | None, context: int | None) -> LoadSettings:
        """LoadSettings shared by every configuration (the budget only matters on a GPU)."""
        budget = budget_gib if self.engine.device == "cuda" else None
        return LoadSettings.from_user(gpu_budget_gib=budget, context_tokens=int(context or 4096), options=self.options)

    @staticmethod
    def sampling(temperature, top_p, max_new_tokens, seed, lang: str = "en") -> SamplingSettings:
        """The same sampling settings and seed for every configuration (BadNumber names a bad control)."""
        seed = 0 if seed is None or str(seed).strip() == "" else read_number(seed, "compare_seed", 0, 2 ** 32 - 1, lang,
                                                                              whole=True)
        return SamplingSettings(
            max_new_tokens=read_number(max_new_tokens, "max_new_tokens", 1, MAX_NEW_TOKENS_MAX, lang, whole=True),
            temperature=read_number(temperature, "temperature", 0.0, TEMPERATURE_MAX, lang),
            top_p=read_number(top_p, "top_p", TOP_P_MIN, 1.0, lang), seed=seed)

    @staticmethod
    def specs(model_a, quant_a, model_b, quant_b) -> list[ConfigSpec]:
        """A and B as configurations."""
        return [ConfigSpec((model_a or "").strip(), parse_quant(quant_a)),
                ConfigSpec((model_b or "").strip(), parse_quant(quant_b))]

    def fit_note(self, model_a, quant_a, model_b, quant_b, budget_gib, context, lang) -> str:
        """Will A and B stay loaded together, or take turns? (The engine's plan, before loading.)"""
        try:
            together = fits_together(self.engine, self.specs(model_a, quant_a, model_b, quant_b),
                                     self.base_settings(budget_gib, context))
        except Exception as e:  # noqa: BLE001 - said in the note; a bug gets an id
            return t("compare_error", lang, error=failure_text(e, lang, "compare fit"))
        return t("compare_fit_together" if together else "compare_fit_swap", lang)

    # ----- A vs B --------------------------------------------------------------------
    def run(self, model_a, quant_a, model_b, quant_b, prompt, system, temperature, top_p, max_new_tokens, seed,
            budget_gib, context, session: CompareSession, lang) -> Iterator[tuple[str, str, str, str, str]]:
        """Stream A's answer, then B's: (pane A, metrics A, pane B, metrics B, status) after every step."""
        if not (prompt or "").strip():
            gr.Warning(t("compare_empty_prompt", lang))
            yield gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
            return
        messages = ([{"role": "system", "content": system}] if (system or "").strip() else []) + [
            {"role": "user", "content": prompt}]
        try:
            specs = self.specs(model_a, quant_a, model_b, quant_b)
            sampling = self.sampling(temperature, top_p, max_new_tokens, seed, lang)
        except USER_ERRORS as e:
            yield "", "", "", "", t("compare_error", lang, error=explain(e, lang))
            return
        stop = session.new_run()
        for state in compare(self.engine, specs, messages, sampling, stop, self.base_settings(budget_gib, context)):
            a, b = state.sides
            yield (self._pane(a, lang), self._metrics(a, lang), self._pane(b, lang), self._metrics(b, lang),
                   self._status(state, lang))

    def stop(self, session: CompareSession) -> None:
        """Stop the comparison or batch running in this tab (the computation itself stops)."""
        session.stop_switch.stop()

    def _pane(self, side: Side, lang: str) -> str:
        if side.status == "waiting":
            return t("compare_waiting", lang)
        if side.status == "loading":
            return t("compare_loading", lang, config=side.spec.label)
        if side.queued is not None:  # its answer waits for the GPU behind other users' work
            return explain(side.queued, lang)
        if side.status == "error":
            error = explain(side.failure, lang) if side.failure is not None else side.error
            return (side.text + "\n\n" if side.text else "") + "⚠️ " + t("compare_error", lang, error=error)
        return side.text

    def _metrics(self, side: Side, lang: str) -> str:
        parts = []
        if side.stats is not None and side.status == "done":
            s = side.stats
            parts.append(t("compare_metrics", lang,
                           ttft=f"{s.ttft_s:.2f} s" if s.ttft_s is not None else "–",
                           tps=f"{s.decode_tokens_per_s:.1f}" if s.decode_tokens_per_s is not None else "–",
                           tokens=s.new_tokens, peak=fmt_bytes(s.peak_bytes)))
        elif side.stats is not None and side.status == "streaming":  # live: TTFT is known, speed is not final
            s = side.stats
            parts.append(t("compare_metrics_live", lang, ttft=f"{s.ttft_s:.2f} s" if s.ttft_s is not None else "–",
                           tokens=s.new_tokens))
        if side.load is not None:
            loaded = side.load.loaded
            if served_by(loaded) is not None:
                parts.append(t("compare_remote", lang, seconds=loaded.load_seconds))
            elif side.load.reused:
                parts.append(t("compare_resident", lang, weights=fmt_bytes(loaded.weights_bytes)))
            else:
                parts.append(t("compare_load", lang, seconds=loaded.load_seconds, weights=fmt_bytes(loaded.weights_bytes)))
        return " · ".join(parts)

    def _status(self, state: Comparison, lang: str) -> str:
        lines = []
        if state.fit_together is False:
            lines.append(t("compare_fit_swap", lang))
        for side in state.sides:
            if side.swapped_out:
                lines.append(t("compare_swapped", lang, config=side.spec.label, old=", ".join(side.swapped_out),
                               seconds=side.load.switch_seconds))
        if state.done:
            residents = ", ".join(f"{m.ref.label}:{m.settings.quant.value}" for m in self.engine.residents())
            lines.append(t("compare_residents", lang, models=residents or "–"))
        return "\n\n".join(lines)

    # ----- batch ---------------------------------------------------------------------
    def resolve_set(self, set_name: str | None, upload: str | None, pasted: str | None, system: str) -> PromptSet:
        """The set to run: pasted questions first, then an uploaded file, then the chosen set."""
        if (pasted or "").strip():
            return parse_pasted(pasted, system=system or "")
        if upload:
            size = Path(upload).stat().st_size
            if size > MAX_UPLOAD_BYTES:
                raise UserFacingError("upload_too_big", name=Path(upload).name, size=f"{size:,} bytes",
                                      limit=f"{MAX_UPLOAD_BYTES:,} bytes ({fmt_bytes(MAX_UPLOAD_BYTES)})")
            return load_prompt_set(Path(upload))
        if not set_name:
            raise UserFacingError("no_prompt_set")
        return load_prompt_set(set_name)

    def batch_specs(self, use: list[str], model_a, quant_a, model_b, quant_b, extra: str) -> list[ConfigSpec]:
        """The configurations to run: A and/or B (as ticked), then any typed MODEL:QUANT lines."""
        a, b = self.specs(model_a, quant_a, model_b, quant_b)
        specs = [spec for name, spec in (("A", a), ("B", b)) if name in (use or [])]
        specs += [parse_spec(line) for line in (extra or "").splitlines() if line.strip()]
        unique = list(dict.fromkeys(specs))
        if not unique:
            raise UserFacingError("no_configuration")
        return unique

    def run_batch(self, set_name, upload, pasted, use, model_a, quant_a, model_b, quant_b, extra, system, temperature,
                  top_p, max_new_tokens, seed, budget_gib, context, session: CompareSession, lang,
                  progress=gr.Progress()):
        """Run a prompt set through the configurations: (table, summary, CSV, JSONL) as rows arrive."""
        try:
            prompt_set = self.resolve_set(set_name, upload, pasted, system)
            specs = self.batch_specs(use, model_a, quant_a, model_b, quant_b, extra)
            sampling = self.sampling(temperature, top_p, max_new_tokens, seed, lang)
        except USER_ERRORS as e:
            gr.Warning(explain(e, lang))
            yield gr.skip(), t("compare_error", lang, error=explain(e, lang)), None, None
            return
        stop = session.new_run()
        rows: list[ResultRow] = []
        total = len(prompt_set.questions) * len(specs)
        progress((0, total), desc=t("compare_batch_start", lang, name=prompt_set.name))
        for event in run_batch(self.engine, prompt_set, specs, sampling, stop, self.base_settings(budget_gib, context)):
            progress((event.done, event.total), desc=event.message)
            if event.row is not None:
                rows.append(event.row)
                yield self.table(rows, lang), self.summary_text(rows, total, lang), None, None
        try:
            folder = Path(tempfile.mkdtemp(prefix="smallchat-batch-"))
            csv_path, jsonl_path = write_both(rows, folder / "results.csv")
        except OSError as e:  # e.g. a full temp disk: the table stays, the export is explained
            yield self.table(rows, lang), t("compare_error", lang, error=explain(e, lang)), None, None
            return
        yield self.table(rows, lang), self.summary_text(rows, total, lang, finished=True), str(csv_path), str(jsonl_path)

    @staticmethod
    def table(rows: list[ResultRow], lang: str = "en") -> dict:
        """The rows as the results table shows them, with headers in the user's language."""
        return {"headers": table_headers(lang),
                "data": [["" if getattr(r, c) is None else getattr(r, c) for c in TABLE_COLUMNS] for r in rows]}

    @staticmethod
    def summary_text(rows: list[ResultRow], total: int, lang: str, finished: bool = False) -> str:
        """Per-configuration means, as a Markdown table, with how many rows are done."""
        head = t("compare_batch_done" if finished else "compare_batch_progress", lang, done=len(rows), total=total)
        lines = [head, "", "| config | answers | score | TTFT s | tok/s | weights MiB | errors |", "|---|---|---|---|---|---|---|"]
        for s in summarize(rows):
            cells = [s["config"], s["answers"], s["score"], s["ttft_s"], s["tokens_per_s"], s["weights_mib"], s["errors"]]
            lines.append("| " + " | ".join("–" if c is None else str(c) for c in cells) + " |")
        # Configurations that did not fit beside the one before were swapped in: say so, with the time.
        swaps = [t("compare_swapped", lang, config=r.config, old=r.swapped_out, seconds=r.load_s or 0.0)
                 for r in rows if r.swapped_out]
        return "\n".join(lines + ([""] + swaps if swaps else []))

    # ----- quality cost --------------------------------------------------------------
    def quality(self, model, quant, budget_gib, context, lang, progress=gr.Progress()) -> str:
        """Perplexity and top-1 agreement of `quant` against full precision, with memory saved and speed gained."""
        try:
            report = quality_check(self.engine, (model or "").strip(), parse_quant(quant),
                                   self.base_settings(budget_gib, context),
                                   progress=lambda f, m: progress(f, desc=m))
        except Exception as e:  # noqa: BLE001 - said in the panel; a bug gets an id
            return t("compare_error", lang, error=failure_text(e, lang, "quality check"))
        return self.quality_text(report, lang)

    @staticmethod
    def quality_text(report: QualityReport, lang: str) -> str:
        """The quality report as Markdown: a table of both loads and what the quantization saved and cost."""
        if report.full is None or report.quantized is None:
            return "⚠️ " + t("quality_no_fit", lang, note=report.note)
        f, q = report.full, report.quantized

        def tps(v):
            return f"{v:.1f}" if v else "–"

        rows = [
            (t("quality_ppl", lang), f"{f.perplexity:.3f}", f"{q.perplexity:.3f}"),
            (t("quality_weights", lang), fmt_bytes(f.weights_bytes), fmt_bytes(q.weights_bytes)),
            (t("quality_decode", lang), tps(f.decode_tokens_per_s), tps(q.decode_tokens_per_s)),
            (t("quality_forward", lang), tps(f.forward_tokens_per_s), tps(q.forward_tokens_per_s)),
            (t("quality_placement", lang), f.placement, q.placement),
        ]
        lines = [t("quality_head", lang, model=report.model or "default", tokens=f.tokens), "",
                 f"| | {f.label} ({f.dtype}) | {q.label} |", "|---|---|---|"]
        lines += [f"| {name} | {a} | {b} |" for name, a, b in rows]
        speed = f"×{report.decode_speedup:.2f}" if report.decode_speedup else "–"
        lines += ["", t("quality_summary", lang, agreement=f"{report.agreement:.1%}",
                        saved=fmt_bytes(report.memory_saved_bytes), speed=speed,
                        ppl_change=f"{(q.perplexity / f.perplexity - 1):+.1%}")]
        return "\n".join(lines)
