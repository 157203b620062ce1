"""The tensor-core GEMV probe (bench/int4_mma_probe.py) against the PyTorch reference, in Triton's interpreter.

It is a measured negative result (slower than the app's GEMV on the H200, BENCHMARKS.md session 21),
kept so that it can be re-timed on another GPU or Triton; this keeps it correct meanwhile.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

_CHECK = r"""
import json, torch
from models.kernels import int4
from bench.int4_mma_probe import mma_gemv
torch.manual_seed(0)
out = []
for n, k, block_n, split in [(64, 256, 32, 1), (128, 512, 64, 2), (64, 384, 64, 3), (32, 1024, 32, 16)]:
    q, s, o = int4.quantize(torch.randn(n, k))
    x = torch.randn(1, k).bfloat16()
    ref = x.float() @ int4.dequantize_reference(q, s, o, k, torch.float32).T
    ws = (torch.zeros(split * n), torch.zeros(n, dtype=torch.int32))
    y = mma_gemv(x, q, s, o, k, ws, dict(BLOCK_N=block_n, SPLIT=split), interpret=True)
    out.append([n, k, split, float((y.float() - ref).norm() / ref.norm()), int(ws[1].abs().sum())])
print(json.dumps(out))
"""


def test_tensor_core_gemv_probe_equals_the_reference():
    """Nibble pairs as packed bf16 (128 + q), x gathered to match, 128 taken out with the offset: the
    same y as dequantize-then-matmul, split-K counters left at zero, over uneven splits too."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", _CHECK], capture_output=True, text=True, env=env, timeout=600,
                            cwd=ROOT)
    if result.returncode != 0 and "0-dimensional arrays" in result.stderr:
        pytest.skip("this Triton's interpreter cannot loop to a runtime bound with this NumPy (see test_int4_kernels)")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(result.stdout.strip().splitlines()[-1])
    for n, k, split, err, counters in rows:
        assert err < 1e-2 and counters == 0, (n, k, split, err, counters)
