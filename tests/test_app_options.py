"""Command-line and UI-default validation, template errors, and the fit-together arithmetic:
bad input gets a clear message before anything is loaded."""

from __future__ import annotations

import pytest

import app
from compare.runner import ConfigSpec, fits_together
from models.engine import Engine
from models.generation import ChatTemplateError, chat_input_ids
from models.loading import LoadSettings
from models.memory import GiB, Budget, plan_fit
from models.quant import Quant
from ui.layout import UiDefaults


@pytest.mark.parametrize("argv, message", [
    (["--context", "5"], "--context must be between"),
    (["--double-quant"], "--double-quant goes with --quant 4bit"),
    (["--compare", "a:none", "--prompts", "quick_en", "--kv", "fp8"], "--kv applies to --ask"),
    (["--top-p", "0"], "--top-p must be in"),
    (["--out", "x.csv"], "go with --compare"),
])
def test_cli_options_outside_their_range_are_refused_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        app.parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_accepts_int4_and_double_quant_with_nf4():
    assert app.parse_args(["--quant", "int4"]).quant is Quant.INT4
    assert app.parse_args(["--quant", "4bit", "--double-quant"]).double_quant


def test_streamed_offload_is_the_default_and_accelerate_hooks_the_explicit_fallback():
    assert LoadSettings().stream_offload is True  # measured 6.5x faster than accelerate's hooks on an H200
    assert app.load_settings(app.parse_args([])).stream_offload is True
    assert app.load_settings(app.parse_args(["--accelerate-offload"])).stream_offload is False


def test_compare_into_an_unwritable_folder_fails_before_any_work(tiny_llama, tmp_path, capsys):
    (tmp_path / "a-file").write_text("not a folder")
    code = app.main(["--compare", f"{tiny_llama}:none", "--prompts", "quick_en",
                     "--out", str(tmp_path / "a-file" / "results.csv")])
    assert code == 1 and "--out: cannot create" in capsys.readouterr().err


def test_ui_defaults_from_the_cli_are_brought_inside_the_controls():
    wild = UiDefaults(quant="int4", kv="offload", gpu_budget_gib=200.0, context_tokens=64, temperature=5.0,
                      top_p=0.0, max_new_tokens=0)
    fixed = wild.within_controls(["none", "bf16", "8bit", "4bit"], ["full", "fp8"], gpu_total_gib=8.0)
    assert fixed.quant == "none" and fixed.kv == "full" and fixed.gpu_budget_gib == 8.0
    assert fixed.context_tokens == 256 and fixed.temperature == 2.0 and fixed.top_p == 0.05 and fixed.max_new_tokens == 1
    sane = UiDefaults(quant="4bit", kv="fp8", gpu_budget_gib=6.0)
    assert sane.within_controls(["none", "4bit"], ["full", "fp8"], 8.0) == sane


def test_a_chat_template_that_rejects_the_chat_is_a_clear_user_facing_error(tiny_llama):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}{{ m['content'] }}{% endfor %}"
    )
    assert chat_input_ids(tokenizer, [{"role": "user", "content": "hi"}])
    with pytest.raises(ChatTemplateError, match="System role not supported") as raised:
        chat_input_ids(tokenizer, [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}])
    assert "对话模板拒绝" in raised.value.render("zh")


def test_fits_together_counts_the_static_cache_a_fast_model_holds(catalog, monkeypatch):
    # Two 4bit-fast loads of the 7B shape: each holds its static KV cache from load on, so at a
    # budget where their weights and one peak fit, they still do not fit together.
    shape = catalog.entries["qwen2.5-7b-instruct"].shape

    def plan(gpu_bytes):
        budget = Budget(gpu_bytes=gpu_bytes, ram_bytes=64 * GiB, disk_bytes=100 * GiB, cuda_context_bytes=500 * 2**20)
        return plan_fit(shape, Quant.INT4, 2, 32768, budget)

    probe = plan(64 * GiB)
    weights_only = probe.weights_bytes + probe.predicted_peak_bytes  # the old arithmetic
    with_cache = weights_only + probe.kv_bytes
    assert probe.kv_bytes > 0
    engine = Engine(catalog)
    monkeypatch.setattr(engine, "model_key", lambda model, settings: f"{model}|{settings.quant.value}")
    pair = [ConfigSpec("a", Quant.INT4), ConfigSpec("b", Quant.INT4)]
    for gpu_bytes, expected in [((weights_only + with_cache) // 2, False), (with_cache, True)]:
        fixed = plan(gpu_bytes)
        assert fixed.verdict == "gpu"
        monkeypatch.setattr(engine, "plan", lambda model, settings, keep=(), p=fixed: (None, p))
        assert fits_together(engine, pair, LoadSettings()) is expected


REJECTS_SYSTEM = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                  "{{ raise_exception('System role not supported') }}{% endif %}{{ m['content'] }}{% endfor %}")


def test_cli_reports_a_template_that_rejects_the_system_prompt(tmp_path, capsys):
    from tiny import write_tiny_llama

    folder = write_tiny_llama(tmp_path / "no-system", chat_template=REJECTS_SYSTEM)
    code = app.main(["--ask", "hi", "--model", str(folder), "--system", "be brief", "--max-new-tokens", "4"])
    assert code == 1 and "error: The model's chat template rejected this chat" in capsys.readouterr().err


@pytest.mark.parametrize("content, message", [
    (b"not a gguf file at all" * 100, "does not start with the GGUF magic bytes"),
    ("truncated", "could not be read as a GGUF model"),
])
def test_cli_reports_a_broken_gguf_file(content, message, tmp_path, capsys):
    from models.catalog import load_catalog
    from models.sources import embedded_gguf_path

    if content == "truncated":  # the real embedded GGUF, cut short inside its tensors
        content = embedded_gguf_path(load_catalog().get("smollm2-135m-instruct")).read_bytes()[:3_000_000]
    path = tmp_path / "broken.gguf"
    path.write_bytes(content)
    code = app.main(["--ask", "hi", "--model", str(path)])
    err = capsys.readouterr().err
    assert code == 1 and "error:" in err and message in err and "Traceback" not in err


def test_cli_reports_an_internlm2_folder_it_cannot_convert(tmp_path, capsys):
    from internlm2_fixture import write_internlm2_checkpoint

    folder = write_internlm2_checkpoint(tmp_path / "il2")
    (folder / "tokenizer.model").unlink()
    code = app.main(["--ask", "hi", "--model", str(folder)])
    assert code == 1 and "tokenizer.model" in capsys.readouterr().err
