"""Runs a kernel check script in a fresh process, compiled on a GPU or in Triton's interpreter on the CPU.

A fresh process because TRITON_INTERPRET is read when Triton's kernels are defined: the suite's own
process keeps whatever mode it started in."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_check(script: str, cases, device: str, interpret: bool, old_interpreter_skips: bool = False) -> list[dict]:
    """The JSON rows `script` prints last, run as `python -c script CASES DEVICE`.

    `old_interpreter_skips`: Triton 3.6's interpreter cannot loop to a run-time bound with a recent
    NumPy; such a run is skipped (the GPU test runs the same check) rather than failed."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    result = subprocess.run([sys.executable, "-c", script, json.dumps(cases), device], capture_output=True,
                            text=True, env=env, timeout=600, cwd=ROOT)
    if result.returncode and interpret and old_interpreter_skips and "0-dimensional arrays" in result.stderr:
        pytest.skip("this Triton's interpreter cannot loop to a runtime bound with this NumPy (Triton 3.6); "
                    "the GPU test runs the same check")
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])
