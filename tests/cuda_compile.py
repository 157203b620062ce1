"""Compiling the CUDA C++ kernels on the CPU (NVRTC 13, which scripts/setup.sh --dev installs) and reading their
resource usage with Triton's cuobjdump: what the kernels' compile tests share."""

from __future__ import annotations

import os
import re
import subprocess
import tempfile

from models.kernels import nvrtc


def nvrtc_13_installed() -> bool:
    """Whether NVRTC of CUDA 13 loads here (the CPU build of torch brings none)."""
    try:
        nvrtc._nvrtc(13)
        return True
    except OSError:
        return False


def registers_and_stack(source: str, name: str, capability: tuple[int, int]) -> tuple[int, int]:
    """(registers a thread, stack bytes) of kernel `name` of `source` compiled for `capability` by NVRTC 13."""
    from models.kernels import int4_triton

    tool = os.path.join(os.path.dirname(int4_triton.triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    cubin = nvrtc.compile_cubin(source, name, capability, ("-std=c++17",), 13)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    registers, stack = map(int, re.search(r"REG:(\d+) STACK:(\d+)", usage).groups())
    return registers, stack
