"""bench/switch_speed.py, the dropdown-switch bench, run through on the CPU with two tiny models."""
from bench import switch_speed
from tests.tiny import write_tiny_llama


def test_the_switch_bench_runs_a_sequence_in_one_engine(tmp_path):
    a = write_tiny_llama(tmp_path / "a", seed=1)
    b = write_tiny_llama(tmp_path / "b", seed=2, num_hidden_layers=3)
    md = tmp_path / "switch.md"
    rows = switch_speed.main(["--sequence", "a", "b", "a", "--quant", "none", "--folder", f"a={a}", "--folder", f"b={b}",
                              "--prompt", "12", "--new-tokens", "4", "--context", "128", "--md", str(md),
                              "--out", str(tmp_path / "switch.jsonl")])
    assert [r["step"] for r in rows] == ["a", "b", "a"]
    assert all(r["switch_s"] > 0 and 1 <= r["tokens"] <= 4 and r["device"] == "cpu" for r in rows)
    assert "full_speed_s" not in rows[0]  # no fast path on the CPU: nothing compiles in the background
    table = md.read_text().splitlines()
    assert len(table) == 4 + 3 and table[-1].startswith("| 3 | a |")
    assert len((tmp_path / "switch.jsonl").read_text().splitlines()) == 3
