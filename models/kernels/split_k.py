"""The split-K GEMV's workspace size, as pure math (models/memory.py plans it; kernels/int4.py allocates it).

A batch-1 GEMV over a narrow or short matrix has too few output tiles to keep the GPU's memory
system busy, so K is split over several programs whose fp32 partial sums meet in a workspace.
The workspace holds 16 partial sums per output of the widest linear, or up to 64 per output
while that stays within 2**20 floats (4 MiB): narrow matrices, which need the most programs in
flight, split K the most, and a 92k-row lm_head does not make the workspace 64 times its width.
"""

SPLIT = 16  # any linear may split K this many ways
MAX_SPLIT = 64  # ... and up to this many while split * outputs <= WIDE_FLOATS
WIDE_FLOATS = 1 << 20


def partial_floats(largest_out: int) -> int:
    """fp32 partial sums the workspace holds for linears of up to `largest_out` outputs."""
    return max(SPLIT * largest_out, min(MAX_SPLIT * largest_out, WIDE_FLOATS))


def split_fits(split: int, out_features: int) -> bool:
    """A GEMV over `out_features` outputs may split K `split` ways within partial_floats' workspace."""
    return split <= SPLIT or (split <= MAX_SPLIT and split * out_features <= WIDE_FLOATS)
