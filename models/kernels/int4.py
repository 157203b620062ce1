"""Int4 weight-only linear layers: our packed format, its plain-PyTorch reference, and the layer.

Format (group size G = 128 along the input dimension K; asymmetric; per output row n), K-major:
  qweight  int32 [Kp/8, N]   Kp = K rounded up to G. Rows g*16 .. g*16+15 hold group g; nibble j
                             (bits 4j..4j+3) of qweight[g*16 + i, n] is q at k = g*G + j*16 + i.
  scales   bf16  [Kp/G, N]   w[n, k] = q * scale + offset, q in 0..15
  offsets  bf16  [Kp/G, N]
Why this layout: a GEMV thread unpacks nibble j of a word with one AND + OR and an exact float
subtraction (no per-element int-to-float conversion, see int4_triton.py); the 8 nibbles of a
word pair with 8 contiguous 16-element slices of x, so nothing needs interleaving; and words are
contiguous along N, so one thread's 16-byte load covers 4 output rows at the same k and every x
value it loads serves 4 rows (row-major words made x handling cost as much as the weights).

How a forward runs (`int4_linear`, one custom op so torch.compile and CUDA graphs see one node):
  one token on CUDA      -> our Triton GEMV (int4_triton.gemv): reads the int4 weight once
  more tokens on CUDA    -> our Triton dequantize into a bf16 temporary + cuBLAS (a prompt is
                            matmul-bound: dequantizing once per forward costs ~2.5 bytes/weight,
                            and cuBLAS then runs at matmul speed)
  CPU, or no Triton      -> the reference dequantize + F.linear (exact same function, slower)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .split_k import partial_floats

GROUP = 128
WORDS_PER_GROUP = GROUP // 8  # 16 int32 words hold one group of 128 nibbles
QUANTIZE_ROWS = 4096  # rows quantized at once: bounds the fp32/int64 temporaries (an lm_head is 92k rows)
_SHIFTS = torch.arange(8, dtype=torch.int64) * 4  # nibble j sits at bits 4j..4j+3


def padded_in_features(k: int) -> int:
    """K rounded up to a whole group (the packed weight's width in weights)."""
    return math.ceil(k / GROUP) * GROUP


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pack a [N, K] weight into (qweight int32 [Kp/8, N], scales bf16 [Kp/G, N], offsets bf16 [Kp/G, N]).

    Min/max per group of 128 (the same asymmetric scheme as torchao's tinygemm int4): scale =
    (max - min) / 15, offset = min, q = round((w - offset) / scale). Columns past K are zero.
    """
    n, k = weight.shape
    kp = padded_in_features(k)
    groups = kp // GROUP
    qweight = torch.empty(kp // 8, n, dtype=torch.int32, device=weight.device)
    scales = torch.empty(groups, n, dtype=torch.bfloat16, device=weight.device)
    offsets = torch.empty_like(scales)
    shifts = _SHIFTS.to(weight.device).view(1, 1, 8, 1)
    for a in range(0, n, QUANTIZE_ROWS):
        w = F.pad(weight[a:a + QUANTIZE_ROWS].float(), (0, kp - k)).view(-1, groups, GROUP)
        lo, hi = w.amin(-1), w.amax(-1)
        # Rounded to bf16 first, so q is chosen against the scale and offset that are stored.
        scale = ((hi - lo) / 15).clamp(min=1e-8).to(torch.bfloat16)
        offset = lo.to(torch.bfloat16)
        q = ((w - offset.float()[..., None]) / scale.float()[..., None]).round_().clamp_(0, 15).to(torch.int64)
        words = (q.view(-1, groups, 8, WORDS_PER_GROUP) << shifts).sum(2)  # [rows, G, 16], < 2**32
        words = torch.where(words >= 2**31, words - 2**32, words)  # the same 32 bits as int32
        qweight[:, a:a + QUANTIZE_ROWS] = words.to(torch.int32).view(-1, kp // 8).T
        scales[:, a:a + QUANTIZE_ROWS] = scale.T
        offsets[:, a:a + QUANTIZE_ROWS] = offset.T
    return qweight, scales, offsets


def dequantize_reference(qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, in_features: int,
                         dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The weight [N, K] the packed tensors stand for (plain PyTorch; the definition the kernels must match)."""
    groups, n = scales.shape
    words = qweight.T.reshape(n, groups, 1, WORDS_PER_GROUP).to(torch.int64) & 0xFFFFFFFF
    q = (words >> _SHIFTS.to(qweight.device).view(1, 1, 8, 1)) & 0xF  # [N, G, 8 (j), 16 (i)]
    w = q.float() * scales.T.float()[..., None, None] + offsets.T.float()[..., None, None]
    return w.reshape(n, groups * GROUP)[:, :in_features].to(dtype)


def _triton_ready(x: torch.Tensor) -> bool:
    if not x.is_cuda:
        return False
    from . import int4_triton

    return int4_triton.available()


# mutates_args is empty on purpose although the GEMV writes into the workspace: it leaves the
# counters at zero and the partial sums are dead scratch, so no caller can observe a change, and
# declaring the mutation would make torch.compile copy the workspace around every call.
@torch.library.custom_op("smallchat::int4_linear", mutates_args=())
def int4_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor,
                in_features: int, partials: torch.Tensor, counters: torch.Tensor, tile: int = -1) -> torch.Tensor:
    """y = x @ W.T for the packed int4 weight W [N, K]; x [..., K] -> y [..., N] in x's dtype.

    `partials` and `counters` are the split-K workspace of int4_triton.new_workspace. `tile` is the
    GEMV tile chosen for this shape (gemv_tiles.choose_tiles; an index for int4_triton.tile_config),
    or -1 for Triton's autotuner.
    """
    rows = x.reshape(-1, in_features)
    if _triton_ready(x):
        from . import int4_triton

        if rows.shape[0] == 1:
            config = int4_triton.tile_config(tile) if tile >= 0 else None
            y = int4_triton.gemv(rows, qweight, scales, offsets, in_features, (partials, counters), config)
        else:  # W.T [K, N] in a temporary, then cuBLAS
            y = rows @ int4_triton.dequantize_t(qweight, scales, offsets, in_features, x.dtype)
    else:
        y = F.linear(rows, dequantize_reference(qweight, scales, offsets, in_features, x.dtype))
    return y.view(*x.shape[:-1], qweight.shape[1])


@int4_linear.register_fake
def _(x, qweight, scales, offsets, in_features, partials, counters, tile=-1):
    return x.new_empty(*x.shape[:-1], qweight.shape[1])


class Int4Linear(torch.nn.Module):
    """A Linear whose weight is stored in our int4 format (bias, if any, stays in the compute dtype)."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, in_features: int,
                 bias: torch.Tensor | None = None):
        super().__init__()
        self.in_features = in_features
        self.out_features = qweight.shape[1]
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("offsets", offsets)
        self.register_buffer("bias", bias)
        # Split-K scratch, shared by every layer of a model (share_workspace); not a weight.
        self.workspace: tuple[torch.Tensor, torch.Tensor] | None = None
        self.tile = -1  # the GEMV tile timed fastest for this shape (gemv_tiles.choose_tiles); -1: Triton's autotuner
        # The epilogue (int4_epilogue.py) the decode step runs this layer with, when it folds the norms
        # (folded_norms.py marks it): the tile is timed with it.
        self.epilogue = 0

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear) -> "Int4Linear":
        """Quantize a Linear (on whatever device its weight is; quantize on the GPU for speed)."""
        qweight, scales, offsets = quantize(linear.weight.detach())
        bias = linear.bias.detach().to(torch.bfloat16) if linear.bias is not None else None
        return cls(qweight, scales, offsets, linear.in_features, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.forward_unbiased(x)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def forward_unbiased(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W.T without the bias (for a kernel that adds it where it uses the output)."""
        partials, counters = self.split_workspace()
        return torch.ops.smallchat.int4_linear(x, self.qweight, self.scales, self.offsets, self.in_features,
                                               partials, counters, self.tile)

    def split_workspace(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The split-K workspace the GEMV runs with: the model's shared one, or one of its own made now."""
        if self.workspace is None:
            self.workspace = new_workspace(self.out_features, self.qweight.device)
        return self.workspace

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group={GROUP}, int4"


def new_workspace(max_out_features: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Split-K scratch for GEMVs with up to `max_out_features` outputs: fp32 partials and zeroed counters.

    The partials are flat: a GEMV splitting K `split` ways over N outputs uses split * N of them,
    which split_k.split_fits keeps within this size (the GEMV's tile configs are pruned by it)."""
    return (torch.empty(partial_floats(max_out_features), dtype=torch.float32, device=device),
            torch.zeros(max_out_features, dtype=torch.int32, device=device))


def share_workspace(model: torch.nn.Module) -> int:
    """Give every Int4Linear of `model` one shared workspace (kernels run one after another); its bytes."""
    layers = [m for m in model.modules() if isinstance(m, Int4Linear)]
    if not layers:
        return 0
    workspace = new_workspace(max(m.out_features for m in layers), layers[0].qweight.device)
    for m in layers:
        m.workspace = workspace
    return sum(t.numel() * t.element_size() for t in workspace)


def packed_bytes(out_features: int, in_features: int) -> int:
    """Bytes of one packed weight: nibbles plus a bf16 scale and offset per group."""
    kp = padded_in_features(in_features)
    return out_features * (kp // 2 + (kp // GROUP) * 4)


def _quantize_targets(model: torch.nn.Module) -> list[tuple[str, torch.nn.Linear]]:
    """The Linears quantize_model replaces: all but a tied lm_head (the embedding table)."""
    embedding = model.get_input_embeddings().weight
    return [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m.weight is not embedding]


def start_precompile(model: torch.nn.Module) -> list:
    """Start compiling (in threads) the int4 kernels `model`'s linears will run (before they are quantized,
    or as restored from models/int4_store.py).

    Call after the projections are fused (their shapes are final); pass the result to
    int4_precompile.wait_precompiled before the first forward. [] where nothing compiles (no CUDA)."""
    if not torch.cuda.is_available():
        return []
    from . import int4_precompile

    dtype = model.get_input_embeddings().weight.dtype  # the activations'
    return int4_precompile.precompile(precompile_shapes(model), dtype, attention_layout(model))


def attention_layout(model: torch.nn.Module) -> tuple[int, int, int, bool] | None:
    """(query heads, KV heads, head dim, q/k/v bias) of a model whose decode step runs the fused q/k/v attention
    (its projections fused: models/fused_projections.py); None otherwise."""
    fused = next((m.qkv_proj for m in model.modules() if hasattr(m, "qkv_proj")), None)
    config = getattr(model, "config", None)
    if fused is None or config is None or not getattr(config, "num_attention_heads", 0):
        return None
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, getattr(config, "num_key_value_heads", None) or heads, head_dim, fused.bias is not None


def precompile_shapes(model: torch.nn.Module) -> list[tuple[int, ...]]:
    """(N, K) of each linear that is or will be int4, with the norm-folding epilogue decode runs it with, if any."""
    linears = [(name, m) for name, m in _quantize_targets(model)]
    linears += [(name, m) for name, m in model.named_modules() if isinstance(m, Int4Linear)]  # stored ones
    fused = any(name.endswith("qkv_proj") for name, _ in linears)  # only fused projections fold norms
    return [(m.out_features, m.in_features, *_folded_epilogue(name, fused)) for name, m in linears]


def _folded_epilogue(name: str, fused: bool) -> tuple[int, ...]:
    """The epilogue the decode step runs the linear `name` with when it folds the norms (models/folded_norms.py),
    in a model with fused projections (`fused`); () if none."""
    from .int4_epilogue import RESIDUAL_NORM, SCALED, SCALED_SILU_MUL

    epilogues = {"qkv_proj": SCALED, "lm_head": SCALED, "gate_up_proj": SCALED_SILU_MUL, "o_proj": RESIDUAL_NORM,
                 "down_proj": RESIDUAL_NORM}
    leaf = name.rpartition(".")[2]
    return (epilogues[leaf],) if fused and leaf in epilogues else ()


def quantize_model(model: torch.nn.Module, device: torch.device, progress=None) -> int:
    """Replace every Linear of `model` (an untied lm_head too) with an Int4Linear on `device`; move the rest there.

    Each weight is copied to `device` in its own dtype only while it is quantized, so the
    full-precision model never exists there whole. A tied lm_head stays a plain Linear: it is the
    embedding table, which must stay a lookup. Returns the number of layers quantized.
    """
    targets = _quantize_targets(model)
    for i, (name, linear) in enumerate(targets):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        on_device = torch.nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                    device="meta")
        on_device.weight = torch.nn.Parameter(linear.weight.detach().to(device), requires_grad=False)
        if linear.bias is not None:
            on_device.bias = torch.nn.Parameter(linear.bias.detach().to(device), requires_grad=False)
        setattr(parent, child, Int4Linear.from_linear(on_device))
        del on_device, linear
        if progress is not None and (i % 16 == 0 or i == len(targets) - 1):
            progress((i + 1) / len(targets), f"Quantizing to int4: {i + 1}/{len(targets)} linear layers")
    model.to(device)
    share_workspace(model)
    return len(targets)
