"""The Compare tab: A vs B on one prompt, batch runs of prompt sets, and the quantization quality check.

Layout and event wiring only; what the events do lives in ui/compare_handlers.py.
Call build_compare_tab() inside a `with gr.Tab(...)` block of the app.
"""

from __future__ import annotations

import gradio as gr

from models.facade import Engine, LoadOptions

from .compare_handlers import (TABLE_HEADERS, CompareHandlers, CompareSession, prompt_set_choices, refresh_prompt_sets,
                               table_headers)
from .i18n import t


def build_compare_tab(engine: Engine, i18n, lang: gr.Component, budget: gr.Component | None = None,
                      context: gr.Component | None = None, options: LoadOptions | None = None) -> CompareHandlers:
    """Create the Compare tab's components and wire its events (budget/context come from the Chat tab's controls)."""
    handlers = CompareHandlers(engine, options)
    catalog = engine.catalog
    model_choices = [(f"{e.id} · {e.name}", e.id) for e in catalog.entries.values()]
    quant_choices = [o.quant.value for o in engine.quant_options() if o.available]
    quantized = "4bit" if "4bit" in quant_choices else quant_choices[-1]
    # Without the Chat tab's controls, fixed stand-ins (no GPU budget override, 4096 tokens).
    budget = budget if budget is not None else gr.State(None)
    context = context if context is not None else gr.State(4096)

    session = gr.State(CompareSession())
    intro = gr.Markdown(i18n("compare_intro"))
    with gr.Row():
        with gr.Column():
            model_a = gr.Dropdown(model_choices, value=catalog.default_id, allow_custom_value=True,
                                  label=i18n("compare_model_a"), elem_id="compare-model-a")
            quant_a = gr.Dropdown(quant_choices, value="none", label=i18n("compare_quant_a"), elem_id="compare-quant-a")
        with gr.Column():
            model_b = gr.Dropdown(model_choices, value=catalog.default_id, allow_custom_value=True,
                                  label=i18n("compare_model_b"), elem_id="compare-model-b")
            quant_b = gr.Dropdown(quant_choices, value=quantized, label=i18n("compare_quant_b"), elem_id="compare-quant-b")
    fit = gr.Markdown(handlers.fit_note(catalog.default_id, "none", catalog.default_id, quantized, None, 4096, "en"),
                      elem_id="compare-fit")
    with gr.Row():
        prompt = gr.Textbox(label=i18n("compare_prompt"), placeholder=i18n("compare_prompt_placeholder"), lines=2,
                            scale=5, elem_id="compare-prompt")
        run = gr.Button(i18n("compare_run"), variant="primary", scale=1, elem_id="compare-run")
        stop = gr.Button(i18n("stop"), variant="stop", scale=1, elem_id="compare-stop")
    with gr.Accordion(i18n("settings"), open=False, elem_id="compare-settings") as settings:
        system = gr.Textbox(label=i18n("system_prompt"), lines=2, elem_id="compare-system")
        with gr.Row():
            temperature = gr.Slider(0, 2, value=0.0, step=0.05, label=i18n("temperature"), elem_id="compare-temperature")
            # From 0, below the valid range, so a typed 0 is refused with a message rather than clamped (see ui/layout.py).
            top_p = gr.Slider(0, 1, value=0.9, step=0.05, label=i18n("top_p"))
            max_new = gr.Slider(0, 4096, value=128, step=1, label=i18n("max_new_tokens"), elem_id="compare-max-new")
            seed = gr.Number(0, precision=0, label=i18n("compare_seed"), elem_id="compare-seed")
    with gr.Row(equal_height=True):
        with gr.Column():
            gr.Markdown("### A")
            pane_a = gr.Markdown(container=True, min_height=120, elem_id="compare-pane-a", label=i18n("compare_answer_a"))
            metrics_a = gr.Markdown(elem_id="compare-metrics-a")
        with gr.Column():
            gr.Markdown("### B")
            pane_b = gr.Markdown(container=True, min_height=120, elem_id="compare-pane-b", label=i18n("compare_answer_b"))
            metrics_b = gr.Markdown(elem_id="compare-metrics-b")
    status = gr.Markdown(elem_id="compare-status")

    with gr.Accordion(i18n("compare_batch"), open=False, elem_id="compare-batch") as batch:
        with gr.Row():
            choices = prompt_set_choices()
            prompt_set = gr.Dropdown(choices, value=choices[0][1] if choices else None, label=i18n("compare_set"),
                                     elem_id="compare-set", scale=4)
            refresh_sets = gr.Button("↻", size="sm", scale=0, min_width=48, elem_id="compare-set-refresh")
            upload = gr.File(file_types=[".toml"], label=i18n("compare_upload"), elem_id="compare-upload")
        pasted = gr.Textbox(label=i18n("compare_paste"), lines=3, elem_id="compare-paste")
        with gr.Row():
            use = gr.CheckboxGroup(["A", "B"], value=["A", "B"], label=i18n("compare_use"), elem_id="compare-use")
            extra = gr.Textbox(label=i18n("compare_extra"), lines=2, elem_id="compare-extra")
        with gr.Row():
            batch_run = gr.Button(i18n("compare_batch_run"), variant="primary", elem_id="compare-batch-run")
            batch_stop = gr.Button(i18n("stop"), variant="stop", elem_id="compare-batch-stop")
        summary = gr.Markdown(elem_id="compare-summary", min_height=40)
        results = gr.Dataframe(headers=TABLE_HEADERS, value=None, interactive=False, wrap=True, label=i18n("compare_results"),
                               column_widths=["4%", "14%", "18%", "30%", "6%", "6%", "6%", "6%", "6%", "6%", "6%", "8%"],
                               elem_id="compare-results")
        with gr.Row():
            csv_file = gr.File(label=i18n("compare_csv"), interactive=False, elem_id="compare-csv")
            jsonl_file = gr.File(label=i18n("compare_jsonl"), interactive=False, elem_id="compare-jsonl")

    with gr.Accordion(i18n("quality_title"), open=False, elem_id="compare-quality-box") as quality_box:
        quality_intro = gr.Markdown(i18n("quality_intro"))
        with gr.Row():
            quality_model = gr.Dropdown(model_choices, value=catalog.default_id, allow_custom_value=True,
                                        label=i18n("quality_model"), elem_id="compare-quality-model")
            quality_quant = gr.Dropdown(quant_choices, value=quantized, label=i18n("quality_quant"),
                                        elem_id="compare-quality-quant")
            quality_run = gr.Button(i18n("quality_run"), elem_id="compare-quality-run")
        quality = gr.Markdown(elem_id="compare-quality")

    # ----- events ------------------------------------------------------------------
    pair = [model_a, quant_a, model_b, quant_b]
    fit_inputs = pair + [budget, context, lang]
    for control in pair:
        control.change(handlers.fit_note, fit_inputs, fit, api_visibility="private")
    # The engine serializes GPU work, so these need no Gradio concurrency limit.
    run_inputs = pair + [prompt, system, temperature, top_p, max_new, seed, budget, context, session, lang]
    run_outputs = [pane_a, metrics_a, pane_b, metrics_b, status]
    run.click(handlers.fit_note, fit_inputs, fit, api_visibility="private").then(
        handlers.run, run_inputs, run_outputs, concurrency_limit=None, api_visibility="private")
    prompt.submit(handlers.run, run_inputs, run_outputs, concurrency_limit=None, api_visibility="private")
    stop.click(handlers.stop, session, None, queue=False, api_visibility="private")

    batch_inputs = [prompt_set, upload, pasted, use] + pair + [extra, system, temperature, top_p, max_new, seed,
                                                              budget, context, session, lang]
    # The progress bar sits on the summary only, so the table stays visible while its rows arrive.
    batch_run.click(handlers.run_batch, batch_inputs, [results, summary, csv_file, jsonl_file], show_progress_on=summary,
                    concurrency_limit=None, api_visibility="private")
    batch_stop.click(handlers.stop, session, None, queue=False, api_visibility="private")
    refresh_sets.click(refresh_prompt_sets, prompt_set, prompt_set, queue=False, api_visibility="private")

    quality_run.click(handlers.quality, [quality_model, quality_quant, budget, context, lang], quality,
                      concurrency_limit=None, api_visibility="private")

    # ----- language ----------------------------------------------------------------
    labelled = {prompt: "compare_prompt", system: "system_prompt", temperature: "temperature", top_p: "top_p",
                max_new: "max_new_tokens", seed: "compare_seed", model_a: "compare_model_a", quant_a: "compare_quant_a",
                model_b: "compare_model_b", quant_b: "compare_quant_b", prompt_set: "compare_set",
                upload: "compare_upload", pasted: "compare_paste", use: "compare_use", extra: "compare_extra",
                results: "compare_results", quality_model: "quality_model", quality_quant: "quality_quant"}

    # Components whose own text (a button's value, an accordion's label) is translated too.
    texts = [(intro, "value", "compare_intro"), (run, "value", "compare_run"), (stop, "value", "stop"),
             (settings, "label", "settings"), (batch, "label", "compare_batch"), (batch_run, "value", "compare_batch_run"),
             (batch_stop, "value", "stop"), (quality_box, "label", "quality_title"),
             (quality_intro, "value", "quality_intro"), (quality_run, "value", "quality_run")]

    def relabel(code: str):
        """The Compare tab's labels and texts in language `code`."""
        updates = [gr.update(label=t(key, code)) for key in labelled.values()]
        updates[0] = gr.update(label=t("compare_prompt", code), placeholder=t("compare_prompt_placeholder", code))
        return updates + [gr.update(**{attr: t(key, code)}) for _, attr, key in texts]

    def retitle_table(code: str, table):
        """The results table with its column names in language `code` (its rows kept)."""
        # A headers-only update does not reach the browser's table: send the value with its new headers.
        rows = [] if table is None or len(table) == 0 else table.values.tolist()
        return {"headers": table_headers(code), "data": rows}

    lang.change(relabel, lang, list(labelled) + [c for c, _, _ in texts], queue=False, api_visibility="private").then(
        handlers.fit_note, fit_inputs, fit, api_visibility="private").then(
        retitle_table, [lang, results], results, queue=False, api_visibility="private")
    return handlers
