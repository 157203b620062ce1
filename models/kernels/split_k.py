"""The split-K workspaces' sizes, as pure math (models/memory.py plans them; kernels/int4.py and
kernels/decode_attention.py allocate them).

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


# Decode attention (kernels/decode_attention.py) splits a KV head's window into chunks the same way.
ATTENTION_MAX_SPLITS = 64  # chunks per KV head at most (longer windows get longer chunks)
ATTENTION_MIN_ROWS = 16  # a tensor-core dot needs 16 rows: a head group's queries are padded up to this


def attention_rows(query_heads: int, kv_heads: int) -> int:
    """Rows of a head group in the attention kernel: its query heads padded to a power of two, at least 16."""
    return max(ATTENTION_MIN_ROWS, 1 << (query_heads // kv_heads - 1).bit_length())


def attention_partial_floats(query_heads: int, kv_heads: int, head_dim: int) -> int:
    """fp32 partials of the decode attention: per KV head and chunk, each row's output, running max and sum."""
    return kv_heads * ATTENTION_MAX_SPLITS * attention_rows(query_heads, kv_heads) * (head_dim + 2)
