"""What the machine has right now: GPU, VRAM use by owner (this app, other processes), RAM."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

from .memory import DEFAULT_CUDA_CONTEXT


@dataclass(frozen=True)
class MemorySnapshot:
    """Memory by owner at one instant, for the VRAM panel. All figures in bytes."""

    device: str  # "cuda" | "cpu"
    device_name: str
    total: int
    free: int
    weights: int  # this app's model weights on the device
    kv_cache: int  # this app's KV cache on the device
    other_allocator: int  # rest of torch's reserved pool: activations, cached blocks
    runtime: int  # CUDA context and kernels of this process (outside torch's allocator); on CPU the rest of this process
    other_processes: int
    peak: int  # peak of this app on the device since the last reset (torch allocator + runtime)
    ram_total: int
    ram_available: int
    gpus: tuple["MemorySnapshot", ...] = ()  # one per GPU when there are several (this one is their sum)

    @property
    def per_gpu(self) -> tuple["MemorySnapshot", ...]:
        """One snapshot per GPU: `gpus`, or this one alone."""
        return self.gpus or (self,)

    @property
    def app_total(self) -> int:
        """Everything this app holds on the device."""
        return self.weights + self.kv_cache + self.other_allocator + self.runtime


def cuda_available() -> bool:
    """True when torch sees a CUDA device."""
    return torch.cuda.is_available()


def cuda_device_count() -> int:
    """How many CUDA devices torch sees (0 without CUDA); every multi-GPU reading goes through here."""
    return torch.cuda.device_count() if cuda_available() else 0


def gpu_free_bytes(index: int) -> int:
    """Free VRAM on GPU `index` now."""
    return torch.cuda.mem_get_info(index)[0]


def gpu_reserved_bytes(index: int) -> int:
    """Bytes torch's allocator holds on GPU `index` (0 before CUDA is initialized)."""
    return torch.cuda.memory_reserved(index) if torch.cuda.is_initialized() else 0


def ram_available() -> int:
    """RAM the OS could give us now."""
    return psutil.virtual_memory().available


def disk_free(folder: Path) -> int:
    """Free bytes on the filesystem of `folder` (created if missing); 0 if it cannot be created.

    A cache folder that cannot be written (under a file, read-only, disk full) offers no room for
    disk offload; that alone must not fail the planning of a model that never writes there (a
    load that does write says why when it tries: models/sources.cache_write_error)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        return shutil.disk_usage(folder).free
    except OSError:
        return 0


def _nvml_process_bytes(index: int = 0) -> tuple[int, int] | None:
    """(this process, all processes) GPU bytes from NVML, or None if NVML can't see processes."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            procs = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
        finally:
            pynvml.nvmlShutdown()
    except pynvml.NVMLError:
        return None
    if not procs:
        return None  # containers often hide the process list: fall back to our own accounting
    mine = sum(p.usedGpuMemory or 0 for p in procs if p.pid == os.getpid())
    return mine, sum(p.usedGpuMemory or 0 for p in procs)


def nvml_used_bytes() -> int | None:
    """Device-wide used GPU bytes from NVML, readable before this process creates a CUDA context."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).used)
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no NVML library, no driver, no GPU: the caller falls back
        return None


def gpu_reading(index: int) -> tuple[str, int, int, int, int]:
    """(name, free, total, reserved by torch, peak reserved by torch) of GPU `index` now."""
    free, total = torch.cuda.mem_get_info(index)
    return (torch.cuda.get_device_name(index), free, total, torch.cuda.memory_reserved(index),
            torch.cuda.max_memory_reserved(index))


def snapshot(weights: int = 0, kv_cache: int = 0, baseline_used: int | None = None,
             per_device: list[tuple[int, int]] | None = None) -> MemorySnapshot:
    """Memory by owner now; weights and kv_cache are what the engine knows it holds.

    `baseline_used` is the device's used bytes measured before this process touched the
    GPU: without NVML process info, everything above it is counted as ours. With several
    GPUs, `per_device` gives (weights, kv_cache) on each; the snapshot sums them and keeps
    one snapshot per GPU in `gpus`.
    """
    vm = psutil.virtual_memory()
    if not cuda_available():
        rss = psutil.Process().memory_info().rss
        return MemorySnapshot(
            device="cpu", device_name="CPU (no CUDA GPU found)", total=vm.total, free=vm.available,
            weights=weights, kv_cache=kv_cache, other_allocator=0,
            runtime=max(0, rss - weights - kv_cache), other_processes=max(0, vm.total - vm.available - rss),
            peak=rss, ram_total=vm.total, ram_available=vm.available,
        )
    count = cuda_device_count()
    if count <= 1:
        return _gpu_snapshot(0, weights, kv_cache, baseline_used, vm, labelled=False)
    split = (list(per_device or [(weights, kv_cache)]) + [(0, 0)] * count)[:count]
    gpus = tuple(_gpu_snapshot(d, w, k, baseline_used if d == 0 else None, vm, labelled=True)
                 for d, (w, k) in enumerate(split))
    fields = ("total", "free", "weights", "kv_cache", "other_allocator", "runtime", "other_processes", "peak")
    return MemorySnapshot(device="cuda", device_name=f"{count} GPUs",
                          **{f: sum(getattr(g, f) for g in gpus) for f in fields},
                          ram_total=vm.total, ram_available=vm.available, gpus=gpus)


def _gpu_snapshot(index: int, weights: int, kv_cache: int, baseline_used: int | None, vm,
                  labelled: bool) -> MemorySnapshot:
    name, free, total, reserved, peak_reserved = gpu_reading(index)
    used = total - free
    nvml = _nvml_process_bytes(index)
    if nvml and nvml[0]:
        runtime = max(0, nvml[0] - reserved)
        others = max(0, used - nvml[0])
    elif baseline_used is not None:
        others = min(used, baseline_used)
        runtime = max(0, used - others - reserved)
    else:
        # A GPU this process has not touched holds no context of ours.
        runtime = DEFAULT_CUDA_CONTEXT if torch.cuda.is_initialized() and (reserved or index == 0) else 0
        others = max(0, used - reserved - runtime)
    return MemorySnapshot(
        device="cuda", device_name=f"{name} (GPU {index})" if labelled else name, total=total, free=free,
        weights=weights, kv_cache=kv_cache, other_allocator=max(0, reserved - weights - kv_cache),
        runtime=runtime, other_processes=others, peak=peak_reserved + runtime,
        ram_total=vm.total, ram_available=vm.available,
    )
