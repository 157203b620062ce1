"""Runs a kernel check script in a fresh process, compiled on a GPU or in Triton's interpreter on the CPU.

A fresh process because TRITON_INTERPRET is read when Triton's kernels are defined: the suite's own
process keeps whatever mode it started in."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

# A kernel check run twice: in Triton's interpreter on the CPU (CI), and compiled on a CUDA GPU (marked gpu).
IN_THE_INTERPRETER_AND_ON_THE_GPU = pytest.mark.parametrize("device, interpret", [
    pytest.param("cpu", True, id="interpreter",
                 marks=pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton")),
    pytest.param("cuda", False, id="gpu",
                 marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]),
])


def run_check(script: str, cases, device: str, interpret: bool, old_interpreter_skips: bool = False) -> list[dict]:
    """The JSON rows `script` prints last, run as `python -c script CASES DEVICE`, one row per case in order.

    In the interpreter the cases are shared out over one process per CPU core: it runs on one core,
    and these checks were the suite's slowest after the soak. `old_interpreter_skips`: Triton 3.6's
    interpreter cannot loop to a run-time bound with a recent NumPy; such a run is skipped (the GPU
    test runs the same check) rather than failed."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    shards = max(1, min(len(cases), os.cpu_count() or 1)) if interpret else 1
    runs = [subprocess.Popen([sys.executable, "-c", script, json.dumps(cases[i::shards]), device],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
            for i in range(shards)]
    outputs = [run.communicate(timeout=600) for run in runs]
    per_case: list = [None] * len(cases)  # each case's rows (a script may print several per case)
    for i, (run, (stdout, stderr)) in enumerate(zip(runs, outputs)):
        if run.returncode and interpret and old_interpreter_skips and "0-dimensional arrays" in stderr:
            pytest.skip("this Triton's interpreter cannot loop to a runtime bound with this NumPy (Triton 3.6); "
                        "the GPU test runs the same check")
        assert run.returncode == 0, stderr[-3000:]
        shard_rows, shard_cases = json.loads(stdout.strip().splitlines()[-1]), len(cases[i::shards])
        assert len(shard_rows) % shard_cases == 0, (len(shard_rows), shard_cases)
        each = len(shard_rows) // shard_cases
        per_case[i::shards] = [shard_rows[j * each:(j + 1) * each] for j in range(shard_cases)]
    return [row for rows in per_case for row in rows]


def on_every_core(work, cases) -> list:
    """work(case) for every case, in order, in a thread per CPU core: for compiling kernels, which Triton's
    compiler and ptxas do mostly without the GIL (two threads compiled four attention kernels in 3.1 s
    where one took 5.7, on a 2-core machine like CI's)."""
    from concurrent.futures import ThreadPoolExecutor

    from models.kernels.triton_threads import serialize_source_parsing

    serialize_source_parsing()  # CPython 3.11's ast.parse is not thread-safe (triton_threads.py)
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return list(pool.map(work, cases))
