"""The cache report (models/cache_report.py, `app.py --cache-report`): each part of the cache folder with
its size and what deleting it costs, files the app did not put there counted apart, and the stores that
measure themselves (compiled kernels, int4 weights) agreeing with it."""

import app
from models import compile_cache, int4_store
from models.cache_report import cache_report, format_cache_report


def _write(path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)


def test_each_part_is_measured_and_strangers_are_counted_apart(tmp_path):
    _write(tmp_path / "unpacked" / "m" / "model.safetensors", 3000)
    _write(tmp_path / "int4" / "k" / "weights.safetensors", 2_500_000)
    _write(tmp_path / "compile" / "torch-x-gpu" / "triton" / "a.cubin", 700)
    _write(tmp_path / "browser-state.key", 32)
    _write(tmp_path / "notes.txt", 5)  # not the app's
    parts = {p.folder.name if p.folder != tmp_path else "other": p for p in cache_report(tmp_path)}
    assert parts["unpacked"].bytes == 3000 and parts["int4"].bytes == 2_500_000 and parts["compile"].bytes == 700
    assert parts["browser-state.key"].bytes == 32 and parts["other"].bytes == 5 and parts["offload"].bytes == 0
    assert int4_store.size_bytes(tmp_path) == 2_500_000 and compile_cache.size_bytes(tmp_path) == 700
    text = format_cache_report(tmp_path)
    assert "int4                 2.5 MB" in text and "total                2.5 MB" in text
    assert "deleting it: the chats saved in browsers can no longer be restored" in text


def test_an_empty_or_missing_cache_folder_reports_zero(tmp_path):
    assert all(p.bytes == 0 for p in cache_report(tmp_path / "none"))
    assert format_cache_report(tmp_path / "none").splitlines()[-1].split() == ["total", "0", "B"]


def test_the_command_line_prints_the_report_and_exits(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SMALLCHAT_CACHE", str(tmp_path))
    _write(tmp_path / "int4" / "k" / "weights.safetensors", 1200)
    assert app.main(["--cache-report"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"cache folder {tmp_path}:") and "int4                 1.2 KB" in out
