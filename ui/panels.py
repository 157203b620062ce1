"""HTML/Markdown renderings of engine state: the memory bar, the fit verdict, load reports."""

from __future__ import annotations

import html

from models.facade import (
    EngineMetrics, FitPlan, GenerationStats, GiB, LoadedModel, LoadReport, MemorySnapshot, MiB, ResidentModel, Verdict,
    WAIT_SHOWN_S, remote_context, served_by,
)

from .i18n import explain, t

# Segment colours of the stacked bar, in drawing order.
_COLOURS = {
    "seg_weights": "#4f7cff",
    "seg_kv": "#ff9f1c",
    "seg_workspace": "#9b5de5",
    "seg_runtime": "#8d99ae",
    "seg_process": "#8d99ae",
    "seg_others": "#e63946",
    "seg_free": "#d8f3dc",
}


def fmt_bytes(n: int | float | None) -> str:
    """1.23 GiB / 456 MiB."""
    if n is None:
        return "–"
    return f"{n / GiB:.2f} GiB" if abs(n) >= GiB else f"{n / MiB:.0f} MiB"


# An icon before each verdict's sentence (the sentence itself is the plan's, models/messages.py).
_VERDICT_ICONS = {Verdict.GPU: "✅ ", Verdict.OFFLOAD: "⚠️ ", Verdict.CPU: "🖥️ ", Verdict.DISK: "⚠️ ",
                  Verdict.NO_FIT: "❌ "}


def plan_text(plan: FitPlan, lang: str) -> str:
    """The fit verdict with its numbers, in the user's language."""
    if plan.verdict is Verdict.REMOTE:
        return t("fit_remote", lang, detail=explain(plan.reason, lang))
    breakdown = t(
        "fit_breakdown", lang, weights=fmt_bytes(plan.weights_bytes), gpu_weights=fmt_bytes(plan.gpu_weights_bytes),
        kv=fmt_bytes(plan.kv_bytes), tokens=plan.context_tokens, work=fmt_bytes(plan.workspace_bytes),
        ctx=fmt_bytes(plan.cuda_context_bytes),
    )
    return f"{_VERDICT_ICONS[plan.verdict]}{explain(plan.reason, lang)}\n\n<small>{breakdown}</small>"


def split_text(split: dict, streamed: bool, lang: str) -> str:
    """'layers: 20 on GPU, 12 in CPU RAM (prefetched a layer ahead)' in the user's language."""
    parts = [t("split_gpu", lang, n=split["gpu"])] if split.get("gpu") else []
    if split.get("gpus"):  # several GPUs: "16 + 16 on 2 GPUs"
        parts = [t("split_gpus", lang, layers=" + ".join(str(n) for n in split["gpus"]), n=len(split["gpus"]))]
    if split.get("cpu"):
        parts.append(t("split_cpu", lang, n=split["cpu"]) + (t("split_streamed", lang) if streamed else ""))
    if split.get("disk"):
        parts.append(t("split_disk", lang, n=split["disk"]))
    return t("split_layers", lang, parts=t("list_sep", lang).join(parts)) if parts else ""


def load_report_text(report: LoadReport, lang: str) -> str:
    """What the load did for this tab: time, split, predicted vs measured weights, and any unload it needed."""
    loaded = report.loaded
    if report.reused:  # already in memory (another tab's, or this tab's before): nothing was loaded
        lines = [t("already_resident", lang, model=loaded.ref.label, quant=loaded.settings.quant.value)]
    elif served_by(loaded) is not None:
        lines = [t("loaded_remote", lang, model=loaded.ref.location, seconds=loaded.load_seconds,
                   context=remote_context(loaded) or "–")]
    else:
        lines = [
            t("loaded", lang, model=loaded.ref.label, quant=loaded.settings.quant.value, dtype=loaded.dtype,
              seconds=loaded.load_seconds, split=split_text(loaded.split, loaded.streamer is not None, lang)),
            t("predicted_vs_measured", lang, predicted=fmt_bytes(loaded.plan.gpu_weights_bytes or loaded.plan.weights_bytes),
              measured=fmt_bytes(loaded.weights_bytes)),
        ]
    for u in report.unloaded:
        lines.append(t("switched", lang, old=u.model_label, seconds=u.seconds, freed=fmt_bytes(u.freed_bytes),
                       residual=fmt_bytes(u.residual_bytes), switch=report.switch_seconds))
    lines.append(t("only_this_tab", lang))
    return "\n\n".join(lines)


def residents_text(residents: list[ResidentModel], device: str, lang: str) -> str:
    """'On the GPU now: A (4bit), B (none) · loading C (4bit)…': the same line in every tab."""
    models = [r.label + (t("resident_remote", lang) if r.where == "remote" else "") for r in residents if not r.loading]
    loading = [r.label for r in residents if r.loading]
    text = t("residents_gpu" if device == "cuda" else "residents_cpu", lang,
             models=t("list_sep", lang).join(models) if models else t("residents_none", lang))
    for label in loading:
        text += t("residents_loading", lang, model=label)
    return text


def metrics_text(stats: GenerationStats, lang: str) -> str:
    """Per-answer metrics line."""
    extra = t("hit_length", lang) if stats.finish_reason == "length" else ""
    if stats.finish_reason == "stopped":
        extra = t("was_stopped", lang)
    ttft = f"{stats.ttft_s:.2f} s" if stats.ttft_s is not None else "–"
    tps = f"{stats.decode_tokens_per_s:.1f}" if stats.decode_tokens_per_s is not None else "–"
    if stats.reused_tokens:
        extra += t("reused", lang, reused=stats.reused_tokens, prompt=stats.prompt_tokens)
    waited = turn = ""
    if stats.waited_s >= WAIT_SHOWN_S:  # TTFT counts from the send; say how much of it was the wait
        waited = t("waited", lang, seconds=f"{stats.waited_s:.1f}")
        if stats.turn_ttft_s is not None:
            turn = t("after_turn", lang, seconds=f"{stats.turn_ttft_s:.2f}")
    # The model that wrote the answer ends the line (which starts with the wait, if any, then TTFT, as readers
    # of it expect); it is kept with the chat: saved, exported, imported.
    if stats.model:
        extra += t("answered_by", lang, model=stats.model)
    return t("metrics", lang, waited=waited, ttft=ttft, turn=turn, tps=tps, tokens=stats.new_tokens, extra=extra)


def remote_note_html(loaded: LoadedModel, metrics: EngineMetrics | None, lang: str) -> str:
    """For a remote engine's model: whose memory it is, and the engine's own KV-cache use where it reports it."""
    lines = [t("panel_remote", lang, url=served_by(loaded))]
    if metrics is not None and metrics.kv_cache_usage is not None:
        lines.append(t("panel_remote_kv", lang, usage=f"{metrics.kv_cache_usage:.1%}",
                       running=_count(metrics.running), waiting=_count(metrics.waiting)))
    else:
        lines.append(t("panel_remote_no_metrics", lang))
    return "".join(f"<div class='mem-remote'>{html.escape(line)}</div>" for line in lines)


def _count(n: int | None) -> str:
    return "–" if n is None else str(n)


def memory_panel_html(snap: MemorySnapshot, lang: str, loaded: LoadedModel | None = None,
                      budget_bytes: int | None = None, context_room: int | None = None, sessions: int = 0,
                      memory_room: int | None = None, remote_metrics: EngineMetrics | None = None) -> str:
    """A stacked bar of memory by owner with numbers, and predicted vs measured peak.

    `context_room` is the context one chat may use now; `memory_room` what the memory left would
    hold (shown when the context setting, not memory, is the limit). For a remote engine's model
    the panel says the memory is the engine's, with `remote_metrics` (its /metrics) if any."""
    remote = served_by(loaded) is not None
    note = "" if snap.device == "cuda" else f"<div class='mem-note'>{html.escape(t('panel_no_cuda', lang))}</div>"
    if snap.gpus:  # several GPUs: one bar per GPU, each with its own legend and peak
        plan = loaded.plan if loaded is not None and not remote else None
        bars = "".join(_gpu_block(gpu, lang, budget_bytes, plan, i) for i, gpu in enumerate(snap.gpus))
    else:
        bar, legend = _bar_and_legend(snap, lang, budget_bytes)
        bars = f"{bar}<table class='mem-legend'>{legend}</table>"
    peak = remote_note_html(loaded, remote_metrics, lang) if remote else ""
    if loaded is not None and snap.device == "cuda" and not remote and not snap.gpus:
        predicted = loaded.plan.predicted_peak_bytes
        peak = (f"<div class='mem-peak'>{html.escape(t('panel_peak', lang, predicted=fmt_bytes(predicted), measured=fmt_bytes(snap.peak)))}"
                "</div>")
    if loaded is not None and context_room is not None:
        room = t("panel_room", lang, tokens=f"{context_room:,}", sessions=sessions, kv=fmt_bytes(snap.kv_cache))
        if memory_room is not None and memory_room > context_room:
            room += t("panel_room_memory", lang, tokens=f"{memory_room:,}")
        peak += f"<div class='mem-room' id='context-room'>{html.escape(room)}</div>"
    if loaded is not None and loaded.fast is not None:  # which step answers: uncompiled, compiling, compiled
        peak += f"<div class='mem-room' id='decode-step'>{html.escape(t('panel_step', lang, status=loaded.fast.compile_status()))}</div>"
    device_name = snap.device_name if snap.device == "cuda" else t("device_cpu", lang)
    return (
        "<div class='mem-panel' id='memory-panel'>"
        f"<div class='mem-title'><b>{html.escape(t('panel_title', lang))}</b> · {html.escape(device_name)}</div>{note}"
        f"{bars}{peak}</div>"
    )


def _bar_and_legend(snap: MemorySnapshot, lang: str, budget_bytes: int | None) -> tuple[str, str]:
    """One device's stacked bar (with the budget marker on a GPU) and its legend rows."""
    if snap.device == "cuda":
        segments = [
            ("seg_weights", snap.weights), ("seg_kv", snap.kv_cache), ("seg_workspace", snap.other_allocator),
            ("seg_runtime", snap.runtime), ("seg_others", snap.other_processes), ("seg_free", snap.free),
        ]
    else:
        segments = [
            ("seg_weights", snap.weights), ("seg_kv", snap.kv_cache), ("seg_process", snap.runtime),
            ("seg_others", snap.other_processes), ("seg_free", snap.free),
        ]
    total = max(1, snap.total)
    bar = "".join(
        f"<div class='mem-seg' data-seg='{key}' title='{html.escape(t(key, lang))}: {fmt_bytes(value)}' "
        f"style='width:{100 * value / total:.3f}%;background:{_COLOURS[key]}'></div>"
        for key, value in segments if value > 0
    )
    budget_marker = ""
    if budget_bytes and snap.device == "cuda":
        left = min(100.0, 100 * budget_bytes / total)
        budget_marker = (f"<div class='mem-budget' style='left:{left:.2f}%' "
                         f"title='{html.escape(t('panel_budget', lang))}: {fmt_bytes(budget_bytes)}'></div>")
    legend = "".join(
        f"<tr data-seg='{key}'><td><span class='mem-dot' style='background:{_COLOURS[key]}'></span>"
        f"{html.escape(t(key, lang))}</td><td class='mem-num'>{fmt_bytes(value)}</td></tr>"
        for key, value in segments
    )
    legend += (f"<tr><td><b>{html.escape(t('panel_total', lang))}</b></td>"
               f"<td class='mem-num'><b>{fmt_bytes(snap.total)}</b></td></tr>")
    if budget_bytes and snap.device == "cuda":
        legend += (f"<tr><td>{html.escape(t('panel_budget', lang))}</td>"
                   f"<td class='mem-num'>{fmt_bytes(budget_bytes)}</td></tr>")
    return f"<div class='mem-bar'>{bar}{budget_marker}</div>", legend


def _gpu_block(gpu: MemorySnapshot, lang: str, budget_bytes: int | None, plan: FitPlan | None, index: int) -> str:
    """One GPU of several: its name and index, its bar and legend, and its predicted vs measured peak."""
    bar, legend = _bar_and_legend(gpu, lang, budget_bytes)
    peak = ""
    if plan is not None and index < len(plan.peak_bytes_per_device):
        text = t("panel_peak", lang, predicted=fmt_bytes(plan.peak_bytes_per_device[index]), measured=fmt_bytes(gpu.peak))
        peak = f"<div class='mem-peak'>{html.escape(text)}</div>"
    return (f"<div class='mem-gpu' data-gpu='{index}'><div class='mem-gpu-name'>{html.escape(gpu.device_name)}</div>"
            f"{bar}<table class='mem-legend'>{legend}</table>{peak}</div>")


PANEL_CSS = """
/* The Chatbot's own trash icon empties the chat in the browser even while an answer streams (the
   stream then refills it). The app's Clear button refuses while answering, so the icon is hidden. */
#chatbot .icon-button-wrapper.top-panel { display: none !important; }
/* A user message is sent to the browser Markdown-escaped (ui/chatbot.py), and the per-message copy button
   copies that escaped text ("2\\+2\\?"): hidden on the user's own messages; answers keep theirs. */
#chatbot .message-buttons-right { display: none !important; }
.mem-panel { font-size: 0.9em; }
.mem-bar { position: relative; display: flex; height: 22px; border-radius: 4px; overflow: hidden;
           border: 1px solid #bbb; margin: 6px 0; }
.mem-seg { height: 100%; }
.mem-budget { position: absolute; top: -2px; bottom: -2px; width: 2px; background: #111; }
.mem-legend { width: 100%; border-collapse: collapse; }
.mem-legend td { padding: 1px 4px; border: none; }
.mem-num { text-align: right; font-variant-numeric: tabular-nums; }
.mem-dot { display: inline-block; width: 10px; height: 10px; border-radius: 2px; margin-right: 6px; }
.mem-note, .mem-peak, .mem-room, .mem-remote { color: #666; margin: 4px 0; }
.mem-gpu { margin-bottom: 8px; }
.mem-gpu-name { font-weight: 600; margin-top: 4px; }
"""
