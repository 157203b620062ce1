"""Compare, batch runs, prompt sets, exports and the quantization quality check.

Fast tests use tiny random Llamas; the ones marked slow use the real embedded SmolLM2.
"""

import csv
import io
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import app
from compare.export import format_table, write_both
from compare.prompt_sets import (
    PROMPTS_DIR, QUALITY_TEXT, Question, PromptSetError, list_prompt_sets, load_prompt_set, parse_pasted,
    parse_prompt_set,
)
from compare.quality import next_token_scores, quality_check, text_ids, top1_agreement
from compare.runner import ConfigSpec, ResultRow, StopSwitch, compare, fits_together, parse_spec, run_batch, summarize
from compare.scoring import keyword_found, score_answer
from models.engine import Engine
from models.local_answer import ModelEvictedError
from models.messages import UserFacingError
from models.settings import ModelKey
from models.generation import SamplingSettings
from models.loading import LoadSettings
from models.quant import Quant
from tiny import write_tiny_llama
from ui.compare_handlers import CompareHandlers, CompareSession

ROOT = Path(__file__).resolve().parents[1]
GREEDY = SamplingSettings(max_new_tokens=6, temperature=0.0, seed=0)
SMALL = LoadSettings(context_tokens=256)


@pytest.fixture(scope="module")
def wide_tiny(tmp_path_factory) -> Path:
    """A tiny Llama whose weights outweigh its KV cache and workspace, so weight budgets mean something."""
    return write_tiny_llama(tmp_path_factory.mktemp("wide-tiny"), hidden_size=256, intermediate_size=1024)


def two_question_set(**extra) -> str:
    return "\n".join([
        'name = "Two"', 'language = "en"', 'system = "Be brief."',
        "[[questions]]", 'text = "Hello world"', 'keywords = ["hello"]',
        "[[questions]]", 'text = "The capital of France is"', 'reference = "Paris"',
    ] + [f"{k} = {v}" for k, v in extra.items()]) + "\n"


# ----- configuration specs ------------------------------------------------------------
def test_parse_spec_reads_model_and_quant():
    assert parse_spec("smollm2-135m-instruct:4bit") == ConfigSpec("smollm2-135m-instruct", Quant.NF4)
    assert parse_spec(" smollm2-135m-instruct ") == ConfigSpec("smollm2-135m-instruct", Quant.NONE)
    assert parse_spec("Qwen/Qwen2.5-1.5B-Instruct:8bit") == ConfigSpec("Qwen/Qwen2.5-1.5B-Instruct", Quant.INT8)
    assert parse_spec("smollm2-135m-instruct:4bit").label == "smollm2-135m-instruct:4bit"
    with pytest.raises(UserFacingError, match="Unknown quantization 'int3'.*none, bf16, 8bit, 4bit"):
        parse_spec("smollm2-135m-instruct:int3")
    with pytest.raises(UserFacingError, match="Empty configuration"):
        parse_spec("  ")


# ----- prompt sets --------------------------------------------------------------------
def test_shipped_prompt_sets_load_and_cover_the_required_kinds():
    sets = {p.stem: load_prompt_set(p) for p in list_prompt_sets()}
    assert {"quick_en", "quick_zh", "reasoning", "coding", "long_context"} <= set(sets)
    assert sets["quick_en"].language == "en" and sets["quick_zh"].language == "zh"
    assert all(s.questions and s.scored for s in sets.values())
    long = sets["long_context"]
    assert len(long.passage.split()) > 1400  # ~2,000 tokens: a real prefill, inside a 4k context
    # Every question is asked with the passage in front of it.
    user = long.messages(long.questions[0])[-1]["content"]
    assert user.startswith("The town of Velmora") and user.endswith(long.questions[0].text)
    assert len(QUALITY_TEXT.read_text().split()) > 250


def test_prompt_set_is_found_by_path_stem_or_name():
    by_path = load_prompt_set(PROMPTS_DIR / "quick_en.toml")
    assert load_prompt_set("prompts/quick_en").name == by_path.name == load_prompt_set("quick_en").name
    with pytest.raises(PromptSetError, match="No prompt set at nope.*quick_en"):
        load_prompt_set("nope")


def test_malformed_toml_names_the_file_line_and_column(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('name = "Mine"\nlanguage = "en"\n\n[[questions]]\ntext = "Hi\nkeywords = ["a"]\n')
    with pytest.raises(PromptSetError) as err:
        load_prompt_set(path)
    message = str(err.value)
    assert str(path) in message and "line 5, column" in message and "invalid TOML" in message
    path.write_text('name = "Mine"\nlanguage = "en"\n[[questions]]\ntext = "Hi"\nkeywords = ["a",\n')
    with pytest.raises(PromptSetError, match=r"line 5, column \d+: invalid TOML: .*file ended while a value was still open"):
        load_prompt_set(path)


def test_schema_errors_name_the_question_and_its_line():
    text = two_question_set().replace('text = "The capital of France is"', 'txt = "oops"')
    with pytest.raises(PromptSetError, match=r"my\.toml, line 7: question 2: unknown key 'txt'"):
        parse_prompt_set(text, "my.toml")
    text = two_question_set().replace('text = "The capital of France is"', 'text = "  "')
    with pytest.raises(PromptSetError, match=r"line 7: question 2: has no text"):
        parse_prompt_set(text, "my.toml")
    text = two_question_set().replace('keywords = ["hello"]', "keywords = [1, 2]")
    with pytest.raises(PromptSetError, match=r"line 4: question 1: keywords must be a list of non-empty strings"):
        parse_prompt_set(text, "my.toml")
    with pytest.raises(PromptSetError, match=r"line 2: 'language' must be a non-empty string"):
        parse_prompt_set(two_question_set().replace('language = "en"', "language = 3"), "my.toml")
    with pytest.raises(PromptSetError, match="has no questions"):
        parse_prompt_set('name = "x"\nlanguage = "en"\n', "my.toml")


def test_pasted_questions_one_per_line():
    pasted = parse_pasted("What is 2+2?\n\n   \n你好吗？\n", system="Be brief.")
    assert [q.text for q in pasted.questions] == ["What is 2+2?", "你好吗？"]
    assert pasted.messages(pasted.questions[0])[0] == {"role": "system", "content": "Be brief."}
    assert not pasted.scored
    with pytest.raises(PromptSetError, match="paste at least one"):
        parse_pasted(" \n \n")


# ----- scoring ------------------------------------------------------------------------
def test_keywords_and_reference_scoring():
    assert keyword_found("There are 7 days.", "seven|7")
    assert not keyword_found("It has 17 floors.", "seven|7")  # "7" is not found inside "17"
    assert keyword_found("水的化学式是Ｈ２Ｏ。", "H2O")  # full-width forms fold to plain ones
    assert keyword_found("中国的首都是北京市。", "北京")
    assert keyword_found("return s[::-1]", "[::-1]|reversed")
    score = score_answer("The capital is paris, of course.", Question("q", ("Paris", "France"), "the Paris"))
    assert (score.keywords_hit, score.keywords_total, score.reference_match) == (1, 2, True)
    assert score.keyword_score == 0.5 and score.value == 0.75
    assert score_answer("anything", Question("q")).value is None


# ----- export -------------------------------------------------------------------------
def test_csv_and_jsonl_round_trip_every_row(tmp_path):
    rows = [
        ResultRow(set="S", question_no=1, question='Say "hi", then stop', config="m:none", answer="hi,\nthere",
                  ttft_s=0.1, score=1.0, reference_match=True),
        ResultRow(set="S", question_no=2, question="你好？", config="m:4bit", answer="你好！", error=""),
    ]
    csv_path, jsonl_path = write_both(rows, tmp_path / "out" / "results.csv")
    assert jsonl_path == tmp_path / "out" / "results.jsonl"
    parsed = list(csv.DictReader(io.StringIO(csv_path.read_text(encoding="utf-8-sig"))))
    assert [r["answer"] for r in parsed] == ["hi,\nthere", "你好！"] and parsed[0]["question"] == 'Say "hi", then stop'
    assert parsed[1]["ttft_s"] == "" and list(parsed[0]) == ResultRow.columns()
    records = [json.loads(line) for line in jsonl_path.read_text(encoding="utf-8").splitlines()]
    assert records == [r.as_dict() for r in rows]
    assert "m:4bit" in format_table(rows)


# ----- A/B on a prompt, and the swap path ---------------------------------------------
def test_compare_streams_a_then_b_with_identical_sampling(catalog, tiny_llama):
    engine = Engine(catalog)
    specs = [ConfigSpec(str(tiny_llama), Quant.NONE), ConfigSpec(str(tiny_llama), Quant.NONE)]
    states = [(s.sides[0].status, s.sides[1].status, s.sides[0].text, s.sides[1].text)
              for s in compare(engine, specs, [{"role": "user", "content": "Hello world"}],
                               SamplingSettings(8, temperature=1.0, seed=7), base=SMALL)]
    assert states[0][:2] == ("waiting", "waiting") and states[-1][:2] == ("done", "done")
    # B waits while A streams.
    assert any(a == "streaming" and b == "waiting" for a, b, *_ in states)
    # Same model, same sampling, same seed: the same sampled answer (the seed is applied per side).
    assert states[-1][2] and states[-1][2] == states[-1][3]


def test_compare_swaps_when_only_one_model_fits(catalog, wide_tiny):
    a, b = ConfigSpec(str(wide_tiny), Quant.NONE), ConfigSpec(str(wide_tiny), Quant.BF16)
    probe = Engine(catalog)
    plan_a = probe.plan(a.model, a.settings(SMALL))[1]
    plan_b = probe.plan(b.model, b.settings(SMALL))[1]
    # Room for A alone (and for B alone), but not for B next to A's weights.
    budget = (plan_a.predicted_peak_bytes + plan_a.weights_bytes + plan_b.predicted_peak_bytes) // 2
    assert plan_a.predicted_peak_bytes <= budget < plan_a.weights_bytes + plan_b.predicted_peak_bytes
    engine = Engine(catalog, ram_budget_bytes=budget)
    assert fits_together(engine, [a, b], SMALL) is False
    assert fits_together(engine, [a, a], SMALL) is True  # the same configuration twice is loaded once
    assert fits_together(Engine(catalog), [a, b], SMALL) is True

    messages = [{"role": "user", "content": "Hello world"}]
    for round_ in range(2):
        final = list(compare(engine, [a, b], messages, GREEDY, base=SMALL))[-1]
        assert [s.status for s in final.sides] == ["done", "done"] and all(s.text for s in final.sides)
        assert final.swapped and final.fit_together is False and final.swap_seconds > 0
        assert final.sides[1].swapped_out == [f"{wide_tiny} (none)"]  # loading B unloaded A
        if round_:
            assert final.sides[0].swapped_out == [f"{wide_tiny} (bf16)"]  # and the next round, A unloaded B
        # Never both at once: only B is resident, within the budget.
        assert [m.settings.quant for m in engine.residents()] == [Quant.BF16]
        assert sum(m.weights_bytes for m in engine.residents()) <= budget

    # The UI says so.
    handlers = CompareHandlers(engine)
    last = list(handlers.run(a.model, "none", b.model, "bf16", "Hello world", "", 0, 0.9, 4, 0, None, 256,
                             CompareSession(), "en"))[-1]
    status = last[4]
    assert "do not fit the budget together" in status and "Swap: loading" in status and "took" in status

    # A batch over both swaps too, and its summary says which load unloaded which, and how long it took.
    batch = list(handlers.run_batch(None, None, "Hello world\nHow are you?", ["A", "B"], a.model, "none", b.model,
                                    "bf16", "", "", 0, 0.9, 4, 0, None, 256, CompareSession(), "en",
                                    progress=lambda *args, **kwargs: None))
    summary = batch[-1][1]
    assert f"Swap: loading {b.label} unloaded {wide_tiny} (none)" in summary and "took" in summary


def test_compare_keeps_both_loaded_when_they_fit(catalog, tiny_llama):
    engine = Engine(catalog)
    a, b = ConfigSpec(str(tiny_llama), Quant.NONE), ConfigSpec(str(tiny_llama), Quant.BF16)
    final = list(compare(engine, [a, b], [{"role": "user", "content": "Hi"}], GREEDY, base=SMALL))[-1]
    assert not final.swapped and final.fit_together is True
    assert sorted(m.settings.quant.value for m in engine.residents()) == ["bf16", "none"]
    again = list(compare(engine, [a, b], [{"role": "user", "content": "Hi"}], GREEDY, base=SMALL))[-1]
    assert all(side.load.reused for side in again.sides)


def test_stop_ends_a_mid_answer_and_skips_b(catalog, tiny_llama):
    engine = Engine(catalog)
    stop = StopSwitch()
    specs = [ConfigSpec(str(tiny_llama)), ConfigSpec(str(tiny_llama), Quant.BF16)]
    for state in compare(engine, specs, [{"role": "user", "content": "Hello world"}],
                         SamplingSettings(200, temperature=1.0, seed=0), stop, SMALL):
        if state.sides[0].text:
            stop.stop()  # the Stop button, while A is streaming
    a, b = state.sides
    assert a.status == "done" and a.stats.finish_reason == "stopped" and a.stats.new_tokens < 200
    assert b.status == "error" and b.error == "stopped" and b.load is None  # B was not even loaded


def test_compare_reports_a_bad_side_and_still_runs_the_other(catalog, tiny_llama):
    engine = Engine(catalog)
    final = list(compare(engine, [ConfigSpec("/no/such/model"), ConfigSpec(str(tiny_llama))],
                         [{"role": "user", "content": "Hi"}], GREEDY, base=SMALL))[-1]
    assert final.sides[0].status == "error" and "No such folder" in final.sides[0].error
    assert final.sides[1].status == "done" and final.sides[1].text


# ----- batch runs ---------------------------------------------------------------------
def test_batch_yields_rows_as_they_arrive_config_by_config(catalog, tiny_llama):
    engine = Engine(catalog)
    prompt_set = parse_prompt_set(two_question_set(), "two.toml")
    specs = [ConfigSpec(str(tiny_llama), Quant.NONE), ConfigSpec(str(tiny_llama), Quant.BF16)]
    events = list(run_batch(engine, prompt_set, specs, GREEDY, base=SMALL))
    rows = [e.row for e in events if e.row]
    assert [e.done for e in events if e.row] == [1, 2, 3, 4] and all(e.total == 4 for e in events)
    assert [(r.config.split(":")[-1], r.question_no) for r in rows] == [("none", 1), ("none", 2), ("bf16", 1), ("bf16", 2)]
    assert all(r.answer and r.new_tokens > 0 and r.ttft_s > 0 and not r.error for r in rows)
    assert rows[0].load_s > 0 and rows[1].load_s is None  # the load is reported once, on the first row
    assert rows[0].keywords in ("0/1", "1/1") and rows[1].reference_match in (True, False)
    assert rows[0].score is not None and rows[1].score is not None
    summary = summarize(rows)
    assert [s["config"] for s in summary] == [s.label for s in specs] and all(s["answers"] == 2 for s in summary)


def test_batch_stop_ends_the_run(catalog, tiny_llama):
    engine = Engine(catalog)
    prompt_set = parse_pasted("a\nb\nc")
    stop = StopSwitch()
    rows = []
    for event in run_batch(engine, prompt_set, [ConfigSpec(str(tiny_llama))], GREEDY, stop, SMALL):
        if event.row:
            rows.append(event.row)
            stop.stop()
    assert len(rows) == 1


def test_batch_handler_reports_a_bad_set_and_exports_every_row(catalog, tiny_llama, tmp_path):
    handlers = CompareHandlers(Engine(catalog))
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\nlanguage = "en"\n[[questions]]\nreference = "r"\n')
    args = dict(set_name="quick_en", upload=None, pasted="", use=["A", "B"], model_a=str(tiny_llama), quant_a="none",
                model_b=str(tiny_llama), quant_b="bf16", extra="", system="", temperature=0, top_p=0.9,
                max_new_tokens=4, seed=0, budget_gib=None, context=256, session=CompareSession(), lang="en",
                progress=lambda *a, **k: None)
    table, summary, csv_file, jsonl_file = list(handlers.run_batch(**{**args, "upload": str(bad)}))[-1]
    assert "bad.toml, line 3: question 1: has no text" in summary and csv_file is None
    outputs = list(handlers.run_batch(**{**args, "pasted": "Hello world\nHi"}))
    assert [len(o[0]["data"]) for o in outputs] == [1, 2, 3, 4, 4]  # the table grows row by row
    table, summary, csv_file, jsonl_file = outputs[-1]
    assert "Done: 4/4" in summary
    assert len(list(csv.DictReader(open(csv_file, encoding="utf-8-sig")))) == 4
    assert len(Path(jsonl_file).read_text().splitlines()) == 4


# ----- quality cost of quantization -----------------------------------------------------
def test_perplexity_matches_transformers_loss(catalog, tiny_llama):
    engine = Engine(catalog)
    loaded = engine.ensure(str(tiny_llama), SMALL).loaded
    ids = text_ids(loaded.tokenizer, QUALITY_TEXT.read_text())
    nll, top1 = next_token_scores(loaded.model, ids, loaded.input_device)
    with torch.no_grad():
        loss = loaded.model(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
    assert nll == pytest.approx(loss, rel=1e-4) and len(top1) == len(ids) - 1


def test_quality_check_identical_configs_agree_fully(catalog, tiny_llama):
    report = quality_check(Engine(catalog), str(tiny_llama), Quant.NONE, SMALL, decode_tokens=4)
    assert report.full.perplexity == report.quantized.perplexity and report.agreement == 1.0
    assert report.memory_saved_bytes == 0
    # Two separate loads of the same configuration score the text identically too.
    other = quality_check(Engine(catalog), str(tiny_llama), Quant.NONE, SMALL, decode_tokens=0)
    assert other.full.top1 == report.full.top1 and other.full.mean_nll == report.full.mean_nll


def test_quality_check_4bit_differs_and_saves_memory(catalog, tiny_llama):
    report = quality_check(Engine(catalog), str(tiny_llama), Quant.NF4, SMALL, decode_tokens=4)
    assert report.full.tokens == report.quantized.tokens > 100
    assert 0 < report.agreement < 1 and report.quantized.perplexity != report.full.perplexity
    assert report.memory_saved_bytes > 0.5 * report.full.weights_bytes
    assert report.full.decode_tokens_per_s > 0 and report.quantized.decode_tokens_per_s > 0
    text = CompareHandlers.quality_text(report, "en")
    assert "Top-1 agreement" in text and "memory saved" in text and "Perplexity" in text and "| cpu | cpu |" in text
    assert "困惑度" in CompareHandlers.quality_text(report, "zh")
    # The button's handler, on a fresh engine: the same checkpoint gives the same numbers, as Markdown.
    handlers = CompareHandlers(Engine(catalog))
    shown = handlers.quality(str(tiny_llama), "4bit", None, 256, "en", progress=lambda *a, **k: None)
    assert f"{report.agreement:.1%}" in shown and f"{report.full.perplexity:.3f}" in shown
    assert "Unknown model" in handlers.quality("no-such-model", "4bit", None, 256, "en", progress=lambda *a, **k: None)


def test_quality_check_says_so_when_full_precision_does_not_fit(catalog, tiny_llama):
    engine = Engine(catalog, ram_budget_bytes=1024)
    report = quality_check(engine, str(tiny_llama), Quant.NF4, SMALL)
    assert report.full is None and report.agreement is None and "does not fit on this machine" in report.note
    assert engine.residents() == []  # nothing was loaded to find out
    assert "Not measured" in CompareHandlers.quality_text(report, "en")


def test_top1_agreement_counts_matches():
    assert top1_agreement((1, 2, 3, 4), (1, 2, 0, 4)) == 0.75
    with pytest.raises(ValueError):
        top1_agreement((1, 2), (1,))


@pytest.mark.slow
def test_quality_cost_of_4bit_on_the_embedded_model(embedded_engine):
    report = quality_check(embedded_engine, "", Quant.NF4, decode_tokens=8)
    full, q = report.full, report.quantized
    # Measured on this text: fp32 ~21.4, nf4 ~25.1, agreement ~73%.
    assert 10 < full.perplexity < 40
    assert full.perplexity < q.perplexity < 1.6 * full.perplexity
    assert 0.5 < report.agreement < 0.98
    assert report.memory_saved_bytes > 300 * 2**20


# ----- CLI --------------------------------------------------------------------------
def test_cli_compare_bad_input_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        app.main(["--compare", "smollm2-135m-instruct:int3", "--prompts", "quick_en"])
    assert e.value.code == 2 and "Unknown quantization 'int3'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        app.main(["--compare", "smollm2-135m-instruct"])
    assert e.value.code == 2 and "--compare needs --prompts" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        app.main(["--prompts", "quick_en"])
    assert e.value.code == 2 and "go with --compare" in capsys.readouterr().err
    assert app.main(["--compare", "no-such-model:none", "--prompts", "quick_en"]) == 1
    assert "Unknown model 'no-such-model'" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\nlanguage = "en"\n[[questions]]\ntext = \n')
    assert app.main(["--compare", "smollm2-135m-instruct", "--prompts", str(bad)]) == 1
    assert "bad.toml, line 4, column" in capsys.readouterr().err
    assert app.main(["--compare", "smollm2-135m-instruct", "--prompts", "nope"]) == 1
    assert "No prompt set at nope" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_compare_writes_csv_and_jsonl(tmp_path):
    prompts = tmp_path / "two.toml"
    prompts.write_text('name = "Two"\nlanguage = "en"\n[[questions]]\ntext = "What is the capital of France?"\n'
                       'keywords = ["Paris"]\n[[questions]]\ntext = "How many days are there in a week?"\n')
    out = tmp_path / "res" / "results.csv"
    proc = subprocess.run(
        [sys.executable, "app.py", "--compare", "smollm2-135m-instruct:none", "smollm2-135m-instruct:bf16",
         "--prompts", str(prompts), "--out", str(out), "--max-new-tokens", "12", "--temperature", "0"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "smollm2-135m-instruct:bf16" in proc.stdout and "Paris" in proc.stdout
    assert "[4/4]" in proc.stderr and f"wrote {out}" in proc.stderr
    rows = list(csv.DictReader(out.open(encoding="utf-8-sig")))
    records = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    for got in (rows, records):
        assert len(got) == 4 and {r["config"] for r in got} == {"smollm2-135m-instruct:none", "smollm2-135m-instruct:bf16"}
    assert all(r["answer"] and not r["error"] for r in records)
    france = [r for r in records if r["question_no"] == 1]
    assert all(r["keywords"] == "1/1" and r["score"] == 1.0 for r in france)
    assert all(0 < r["new_tokens"] <= 12 for r in records)


def test_a_side_evicted_by_another_user_is_loaded_again(catalog, tiny_llama):
    # Between a side's load and its answer another user's load may take the memory: the side
    # loads again (once) instead of failing with "no model is loaded".
    engine = Engine(catalog)
    spec = ConfigSpec(str(tiny_llama), Quant.NONE)
    real_chat = engine.chat
    evictions = []

    def chat_after_an_eviction(*args, **kwargs):
        if not evictions:
            evictions.append(engine.unload())  # what another tab's switch would do
        return real_chat(*args, **kwargs)

    engine.chat = chat_after_an_eviction
    final = list(compare(engine, [spec], [{"role": "user", "content": "Hello world"}], GREEDY, base=SMALL))[-1]
    assert evictions and final.sides[0].status == "done" and final.sides[0].text
    with pytest.raises(ModelEvictedError, match="was unloaded to make room"):
        list(real_chat([{"role": "user", "content": "hi"}], GREEDY, threading.Event(), model=ModelKey("gone", Quant.NONE, False, 256)))


def test_a_prompt_set_added_while_the_app_runs_shows_up_on_refresh(tmp_path, monkeypatch):
    from compare import prompt_sets
    from ui import compare_handlers

    (tmp_path / "mine.toml").write_text('name = "My set"\nlanguage = "en"\n[[questions]]\ntext = "Hi?"\n')
    shipped = prompt_sets.list_prompt_sets()
    monkeypatch.setattr(compare_handlers, "list_prompt_sets", lambda: shipped + [tmp_path / "mine.toml"])
    update = compare_handlers.refresh_prompt_sets("quick_en")
    assert ("My set · 1 (mine)", "mine") in update["choices"] and update["value"] == "quick_en"
    assert compare_handlers.refresh_prompt_sets("gone")["value"] == update["choices"][0][1]


def test_compare_panes_show_live_metrics_while_a_side_streams(catalog, tiny_llama):
    handlers = CompareHandlers(Engine(catalog))
    steps = list(handlers.run(str(tiny_llama), "none", str(tiny_llama), "bf16", "Hello world", "", 0, 0.9, 8, 0,
                              None, 256, CompareSession(), "en"))
    live_a = [metrics_a for _, metrics_a, *_ in steps if "tokens so far" in metrics_a]
    assert live_a and all("TTFT" in m for m in live_a)
    final_a, final_b = steps[-1][1], steps[-1][3]
    assert "tok/s" in final_a and "tok/s" in final_b and "so far" not in final_a + final_b
