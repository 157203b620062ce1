"""Where compiled kernels are kept between runs: Inductor's and Triton's caches under the app's cache.

A later load of the same model shape on the same torch and GPU finds its compiled decode step
and its tuned int4 kernels there instead of compiling again. The folder name carries the torch
version and the GPU, so a driver or torch upgrade starts a fresh folder rather than loading
kernels built for another stack. A corrupt cache is wiped (reset) and rebuilt by the caller.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch

from .cache_report import folder_bytes

_ENV = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")


def cache_folder(cache_dir: Path) -> Path:
    """The compile cache of this torch build and GPU under `cache_dir`."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    name = re.sub(r"[^A-Za-z0-9.]+", "-", f"torch-{torch.__version__}-{gpu}").strip("-")
    return Path(cache_dir) / "compile" / name


def configure(cache_dir: Path) -> Path:
    """Point Inductor and Triton at the app's compile cache; the folder.

    They read these variables each time they compile, so this must run before the first compile.
    (Set unconditionally: Inductor writes its own /tmp default into the environment on first use,
    so "already set" does not mean a user chose it.)
    """
    folder = cache_folder(cache_dir)
    for var, sub in zip(_ENV, ("inductor", "triton")):
        (folder / sub).mkdir(parents=True, exist_ok=True)
        os.environ[var] = str(folder / sub)
    return folder


def reset(cache_dir: Path) -> None:
    """Delete this stack's compile cache (it failed to load); the next compile rebuilds it."""
    shutil.rmtree(cache_folder(cache_dir), ignore_errors=True)
    for var, sub in zip(_ENV, ("inductor", "triton")):
        if os.environ.get(var) == str(cache_folder(cache_dir) / sub):
            (cache_folder(cache_dir) / sub).mkdir(parents=True, exist_ok=True)


def size_bytes(cache_dir: Path) -> int:
    """Bytes every compile cache under `cache_dir` takes on disk (all torch builds and GPUs)."""
    return folder_bytes(Path(cache_dir) / "compile")
