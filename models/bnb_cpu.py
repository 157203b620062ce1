"""bitsandbytes' 4-bit layers on CPUs with AVX512-BF16: keep the repacking off where it cannot work.

On such CPUs (Sapphire Rapids and later Xeons, Zen 4+) bitsandbytes 0.50 repacks a Linear4bit's weights
into a CPU-friendly layout at its first forward. That repacking assumes the output features are a
multiple of 32 and the input features a multiple of the quantization block (64), and fails with a
reshape error otherwise ("shape '[64, 2]' is invalid for input of size 160" for an intermediate size of
160). Such a layer still runs on bitsandbytes' plain path, so the fix is to skip the repacking for it
only; layers with regular shapes keep the packed kernel.
"""

from __future__ import annotations

import torch

# bitsandbytes.functional._convert_weight_packed_for_cpu's row block (its default block_n)
_PACK_ROWS = 32


def packs_on_cpu(out_features: int, in_features: int, blocksize: int) -> bool:
    """Whether bitsandbytes' CPU repacking can handle a 4-bit weight of this shape and quantization block."""
    return out_features % _PACK_ROWS == 0 and in_features % 2 == 0 and in_features % blocksize == 0


def keep_unpackable_layers_unpacked(model: torch.nn.Module) -> int:
    """Turn bitsandbytes' CPU repacking off for the 4-bit linears whose shape it cannot pack; returns how many."""
    from bitsandbytes.nn import Linear4bit

    skipped = 0
    for module in model.modules():
        if not isinstance(module, Linear4bit) or not getattr(module, "support_avx512bf16_for_cpu", False):
            continue
        state = getattr(module.weight, "quant_state", None)
        blocksize = state.blocksize if state is not None else 64
        if not packs_on_cpu(module.out_features, module.in_features, blocksize):
            module.support_avx512bf16_for_cpu = False
            skipped += 1
    return skipped
