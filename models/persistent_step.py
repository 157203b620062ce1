"""The int4 one-token step as persistent kernels (kernels/persistent_layer.py), a launch a layer or one a step: opt-in.

Why: the step it replaces (layer_step.LayerLoop with folded norms) is five kernels a layer, and their fixed
costs hold the 1.8B at 21 % of its roofline (BENCHMARKS.md, session 29). Here the programs of one launch stay
resident through a layer's q/k/v, attention, o, gate/up and down (or through every layer, in mode "step").
It stays opt-in (SMALLCHAT_PERSISTENT=1, layer or step) until a GPU run of bench/decode_speed.py (paths
fast-int4-persistent and fast-int4-persistent-step) shows it faster than the default step.

The step: the token's embedding and rotation in PyTorch, the persistent launches, then the final norm and
lm_head as the folded step runs them (folded_norms.final_logits). The residual stream stays in fp32 between
the layers (the default step rounds it to bf16 at every add), so logits agree within bf16 rounding, not bit
for bit. One memset a step zeroes what the kernel accumulates into with atomics (q/k/v, gate/up) and the
barrier counters.
"""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger(__name__)
ENV = "SMALLCHAT_PERSISTENT"
MODES = ("layer", "step")  # SMALLCHAT_PERSISTENT=1 or layer: a launch a layer; step: one launch for the step
HEAD_DIM = 128  # the attention phase's head size (every catalog model's)
BLOCK_N, WARPS = 256, 4  # the GEMV phases' rows per tile; 4 warps: at 2 the attention's key and value tiles spill
# Weights the idle programs ask the L2 for while the DRAM idles (persistent_layer.prefetch_idle): o's and
# gate/up's in the attention phase, then down's in o's. All of a 1.8B layer's (29 MB), a part of a 7B's
# (gate/up's first groups), within the 50 MB L2 of an H100 or H200.
PREFETCH_MB = 32



def requested() -> str | None:
    """The persistent step the environment asks for (SMALLCHAT_PERSISTENT: 1 or layer, step), or None."""
    value = os.environ.get(ENV, "0").strip().lower()
    return "layer" if value == "1" else value if value in MODES else None


def why_not(model) -> str | None:
    """Why `model`'s step cannot run as persistent layers, or None if it can."""
    from .folded_norms import SILU, folds_norms
    from .kernels.int4 import _triton_ready

    if not folds_norms(model):
        return "needs the int4 fast path with fused projections and foldable norms"
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if head_dim != HEAD_DIM or config.hidden_act not in SILU:
        return f"needs heads of {HEAD_DIM} and SiLU (has {head_dim} and {config.hidden_act})"
    weight = model.model.layers[0].mlp.down_proj.qweight
    if not (_triton_ready(weight) or (os.environ.get("TRITON_INTERPRET") == "1" and weight.device.type == "cpu")):
        return "needs Triton on a CUDA GPU"
    for layer in model.model.layers:
        for linear in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj):
            if linear.in_features % 128 or linear.out_features % BLOCK_N:
                return f"needs widths in multiples of {BLOCK_N} and inputs of 128 ({linear.out_features} x {linear.in_features})"
    return None


def _cooperative_launch() -> bool:
    """Whether this Triton launches a grid as cooperative on request (its CUDA options know the flag)."""
    from triton.backends.nvidia.compiler import CUDAOptions

    return "launch_cooperative_grid" in getattr(CUDAOptions, "__dataclass_fields__", {})


class PersistentLayers:
    """A model's one-token step over a StaticCache as persistent kernel launches; `logits` is the step.

    mode "layer": one launch a layer, each given its layer's tensors. "step": one launch for every layer, which
    finds each layer's tensors through a table of their addresses (the layers' weights and caches are separate
    tensors), so the step pays one kernel boundary instead of one a layer."""

    def __init__(self, model, cache, mode: str = "layer"):
        from .kernels.decode_attention import new_workspace
        from .kernels.split_k import attention_rows

        reason = why_not(model)
        if reason:
            raise ValueError(f"persistent layers: {reason}")
        if mode not in MODES:
            raise ValueError(f"persistent layers: mode {mode!r} is not one of {MODES}")
        self.model = model
        self.mode = mode
        base = model.model
        config = model.config
        self.layers = list(base.layers)
        self.caches = list(cache.layers)
        device = self.layers[0].mlp.down_proj.qweight.device
        self.interpret = os.environ.get("TRITON_INTERPRET") == "1"
        self.hidden = config.hidden_size
        self.inter = self.layers[0].mlp.down_proj.in_features
        self.q_heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.rows = attention_rows(self.q_heads, self.kv_heads)
        self.has_bias = self.layers[0].self_attn.qkv_proj.bias is not None
        self.eps = self.layers[0].input_layernorm.variance_epsilon
        count, qkv_n = len(self.layers), (self.q_heads + 2 * self.kv_heads) * HEAD_DIM
        # Zeroed every step in one memset: the barrier counters (int32), then q/k/v and gate/up (fp32 bits).
        self.zeroed = torch.zeros(count + count * (qkv_n + 2 * self.inter), dtype=torch.int32, device=device)
        self.bars = self.zeroed[:count]
        floats = self.zeroed[count:].view(torch.float32)
        self.qkv = floats[:count * qkv_n].view(count, qkv_n)
        self.gate_up = floats[count * qkv_n:].view(count, 2 * self.inter)
        self.h = torch.zeros(count + 1, self.hidden, device=device)  # the residual stream into and out of each layer
        self.h_mid = torch.zeros(count, self.hidden, device=device)
        self.attn = torch.zeros(count, self.q_heads * HEAD_DIM, device=device)
        self.act = torch.zeros(count, self.inter, device=device)
        self.workspace, self.locks = new_workspace(self.q_heads, self.kv_heads, HEAD_DIM, device)
        self.tile_locks = torch.zeros(2 * self.inter // BLOCK_N, dtype=torch.int32, device=device)
        # Causality comes from the position (the kernel reads no key after it): every window's mask is all True.
        self.mask = torch.ones(self.caches[0].keys.shape[2], dtype=torch.bool, device=device)
        norm_dtype = self.layers[0].input_layernorm.weight.dtype
        self.ones = torch.ones(max(self.hidden, self.q_heads * HEAD_DIM, self.inter), dtype=norm_dtype, device=device)
        self.table = torch.tensor([[t.data_ptr() for t in self._layer_tensors(i)] for i in range(count)],
                                  dtype=torch.int64, device=device)
        self.cooperative = False  # launched as a cooperative grid (_programs decides on a GPU)
        self.programs = 1 if self.interpret else self._programs(device)

    def _layer_tensors(self, index: int) -> list[torch.Tensor]:
        """Layer `index`'s tensors in the order of the kernel's table columns (persistent_layer.TABLE_COLUMNS)."""
        layer, cache = self.layers[index], self.caches[index]
        attention, mlp = layer.self_attn, layer.mlp
        linears = (attention.qkv_proj, attention.o_proj, mlp.gate_up_proj, mlp.down_proj)
        bias = attention.qkv_proj.bias if self.has_bias else self.qkv[index]  # never read without a bias
        return [*[t for linear in linears for t in (linear.qweight, linear.scales, linear.offsets)], cache.keys,
                cache.values, bias, layer.input_layernorm.weight, layer.post_attention_layernorm.weight]

    def _launch_args(self, index: int, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor, window: int):
        """layer_kernel's arguments and options: for layer `index` (its tensors, first_layer 0) in mode "layer";
        for every layer from the table in mode "step" (layer 0's tensors then only type the pointers)."""
        from .kernels.decode_attention import splits_for
        from .kernels.int4_triton import ONE_BITS
        from .kernels.persistent_layer import BLOCK_L, split_for, units_in

        step = self.mode == "step"
        at = 0 if step else index
        tensors = self._layer_tensors(at)
        weights, (keys, values, bias, gamma_in, gamma_post) = tensors[:12], tensors[12:]
        mlp = self.layers[0].mlp
        shapes = [(w.shape[1], w.shape[0] * 8) for w in weights[::3]]  # (N, K) of q/k/v, o, gate/up, down
        splits, chunk_keys = splits_for(window)
        args = (self.h[at], self.h_mid[at], self.qkv[at], self.attn[at], self.gate_up[at], self.act[at],
                self.bars[at:], self.workspace, self.locks, self.tile_locks, keys, values, self.mask, cos, sin, pos,
                bias, gamma_in, gamma_post, self.ones, self.table, 0, len(self.layers) if step else 1, *weights,
                self.hidden, mlp.down_proj.in_features, *[split_for(n, k, self.programs, BLOCK_N) for n, k in shapes],
                window, chunk_keys, splits, keys.shape[2], self.layers[0].self_attn.scaling, ONE_BITS, self.eps,
                units_in(PREFETCH_MB, BLOCK_N))
        options = dict(Q_HEADS=self.q_heads, KV_HEADS=self.kv_heads, ROWS=self.rows, HEAD_DIM=HEAD_DIM,
                       BLOCK_L=BLOCK_L, DOT_FP32=self.interpret, BLOCK_N=BLOCK_N, ASM=not self.interpret,
                       HAS_BIAS=self.has_bias, TABLE=step, num_warps=WARPS, num_stages=1)
        if self.cooperative:
            options["launch_cooperative_grid"] = True
        return args, options

    def _programs(self, device) -> int:
        """The most programs the GPU holds at once (compiles the kernel once, for the largest window); and whether
        a cooperative launch of them can be captured in a CUDA graph (sets self.cooperative)."""
        from .kernels.persistent_layer import layer_kernel, programs_that_fit

        self.programs = 1  # the splits' argument only: the compiled kernel is the same for any count
        cos = torch.ones(HEAD_DIM, dtype=self.ones.dtype, device=device)
        pos = torch.zeros(1, dtype=torch.long, device=device)
        args, options = self._launch_args(0, cos, cos, pos, self.mask.numel() - 64)
        if _cooperative_launch():
            options["launch_cooperative_grid"] = True
        fits, usage = programs_that_fit(layer_kernel.warmup(*args, grid=(1,), **options), WARPS, device)
        # A cooperative grid is one the driver refuses, rather than starts, if it does not fit at once (where a
        # grid barrier would wait for ever). Tried in a capture, which records the launch and runs nothing.
        if _cooperative_launch():
            try:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                    layer_kernel[(fits,)](*args, **options)
                self.cooperative = True
            except Exception as e:  # noqa: BLE001 - then the grid's size alone keeps it resident
                log.warning("persistent layers: a cooperative launch cannot be captured here (%s)", e)
        log.info("persistent layers: %d programs (%s), cooperative launch: %s", fits, usage, self.cooperative)
        return fits

    def logits(self, token: torch.Tensor, pos: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits [1, V] (fp32) of one token at `pos` ([1]), attending over the window `positions`; each layer
        writes the token's keys and values at `pos`. The same contract as LayerLoop.logits."""
        from .folded_norms import final_logits
        from .kernels.persistent_layer import layer_kernel

        base = self.model.model
        hidden = base.embed_tokens(token)
        cos, sin = base.rotary_emb(hidden, pos.view(1, 1))
        cos, sin = cos.reshape(-1), sin.reshape(-1)
        self.zeroed.zero_()
        self.h[0].copy_(hidden.view(-1))
        for index in range(1 if self.mode == "step" else len(self.layers)):
            args, options = self._launch_args(index, cos, sin, pos, positions.shape[0])
            layer_kernel[(self.programs,)](*args, **options)
        h = self.h[-1]
        normed = (h * base.norm.weight.float()).to(hidden.dtype).view(1, -1)
        return final_logits(self.model, normed, h.square().sum().reshape(1))
