"""What one model holds in RAM on a CPU-only machine: its own tensors and its KV cache, not process RSS.

Process RSS says little about one model: it includes Python, torch, the tokenizer, every other
resident model, and memory the allocator keeps after tensors are freed (glibc rarely gives it
back), so a 4-bit model measured after an fp32 one "peaks" above it and an unload "frees 0".
"""

from __future__ import annotations

import psutil
import torch

from .kv_cache import cache_bytes
from .loading import weights_on_device_bytes


def model_ram_bytes(model: torch.nn.Module, cache=None) -> int:
    """Bytes of the model's own tensors in RAM (parameters, buffers, quantization state) plus `cache`'s KV."""
    return weights_on_device_bytes(model, "cpu") + cache_bytes(cache)


def process_rss_bytes() -> int:
    """Resident memory of this whole process (all models, libraries and freed-but-kept pages)."""
    return psutil.Process().memory_info().rss
