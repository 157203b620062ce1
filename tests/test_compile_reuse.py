"""bench/compile_reuse.py, three loads of one checkpoint in one process, run through on the CPU with a tiny model."""
import torch._inductor.compile_fx

from bench import compile_reuse
from tests.tiny import write_tiny_llama


def test_the_reuse_bench_compiles_once_and_every_load_answers_the_same(tmp_path, monkeypatch):
    inductor_runs = []  # Inductor's C++ build would take most of a minute here; the traced graph runs as is
    monkeypatch.setattr(torch._inductor.compile_fx, "compile_fx", lambda gm, _: inductor_runs.append(gm) or gm.forward)
    torch._dynamo.reset()
    folder = write_tiny_llama(tmp_path / "m", seed=4)
    md = tmp_path / "reuse.md"
    rows = compile_reuse.main(["--folder", str(folder), "--context", "64", "--new-tokens", "6", "--md", str(md)])
    assert [r["load"] for r in rows] == ["cold", "again", "again, dynamo reset"]
    assert all(r["compile_state"] == "compiled" and r["tokens"] == rows[0]["tokens"] for r in rows)
    # the layer and the step's inputs (two graphs), at the first load and at the load after dynamo's
    # reset; not at the second
    assert len(inductor_runs) == 2 * 2
    table = md.read_text().splitlines()
    assert len(table) == 4 + 3 and all(line.endswith("| yes |") for line in table[4:])
