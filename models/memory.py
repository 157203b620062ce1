"""Memory planning as pure math over a model shape: weights, KV cache, workspace, fit verdict.

Nothing here touches torch or a GPU, so every number can be checked by hand. The
constants that describe the CUDA allocator and kernels were measured on the GPU
machine (bench/gpu_memory.py; BENCHMARKS.md) and are named where they are used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

from .catalog import ModelShape
from .kernels.split_k import attention_partial_floats, partial_floats as int4_partial_floats
from .messages import Message
from .quant import Quant

KiB, MiB, GiB = 1024, 1024**2, 1024**3

NF4_BLOCK = 64  # bitsandbytes 4-bit: one absmax per 64 weights
NESTED_BLOCK = 256  # double quant: one fp32 absmax per 256 uint8 absmaxes
INT4_GROUP = 128  # our int4 (models/kernels/int4.py): one bf16 scale + one bf16 offset per 128 weights of a row
# in_features are padded to whole groups (the padding is stored too).
INT4_IN_MULTIPLE = INT4_GROUP
# CUDA context right after CUDA init, outside torch's allocator. Used only when the
# engine could not measure it on the running GPU (H100 + CUDA 13 measured 518 MiB).
DEFAULT_CUDA_CONTEXT = 512 * MiB
# Kernel images (cuBLAS, SDPA, bitsandbytes) loaded lazily during the first forward pass,
# on top of the context measured at start. Measured on an H100, torch 2.11 + CUDA 13:
# +168 MiB for fp16 and NF4, +232 MiB for LLM.int8 (bench/results/gpu_memory_run1.jsonl).
# int4 adds its own and the compiled decode step's Triton kernels (estimate; bench/decode_speed.py measures it).
KERNEL_IMAGES = {Quant.NONE: 168 * MiB, Quant.BF16: 168 * MiB, Quant.NF4: 168 * MiB, Quant.INT8: 232 * MiB,
                 Quant.INT4: 232 * MiB}
# torch's caching allocator holds more than is allocated at the peak (partly used 2 MiB
# pages, freed blocks waiting for reuse): 65-162 MiB measured across 1.8B and 7B shapes.
ALLOCATOR_SLACK = 112 * MiB
# Tokens per prefill step: long prompts run in chunks of this size, so activations stay bounded. 1,024,
# not 512: an int4 chunk dequantizes each layer's weights once, so a 7B's 4,000-token TTFT fell from 216
# to 173 ms for ~70 MiB of peak (NVIDIA H100, bench/results/decode_prefill_1024_h100_s32.md).
PREFILL_CHUNK = 1024


@dataclass(frozen=True)
class LayerParams:
    """Parameter counts of one decoder layer, split by how quantization treats them."""

    linear_shapes: tuple[tuple[int, int], ...]  # (out_features, in_features) of q,k,v,o,gate,up,down
    biases: int
    norms: int

    @property
    def linear(self) -> int:
        """Weights that bitsandbytes quantizes."""
        return sum(o * i for o, i in self.linear_shapes)

    @property
    def total(self) -> int:
        """All parameters of the layer."""
        return self.linear + self.biases + self.norms


def layer_params(shape: ModelShape) -> LayerParams:
    """Parameter counts of one Llama-style decoder layer."""
    h, hd = shape.hidden_size, shape.head_dim
    q_out, kv_out = shape.num_heads * hd, shape.num_kv_heads * hd
    linears = (
        (q_out, h),  # q_proj
        (kv_out, h),  # k_proj
        (kv_out, h),  # v_proj
        (h, q_out),  # o_proj
        (shape.intermediate_size, h),  # gate_proj
        (shape.intermediate_size, h),  # up_proj
        (h, shape.intermediate_size),  # down_proj
    )
    biases = (q_out + 2 * kv_out) if shape.attention_bias else 0
    return LayerParams(linear_shapes=linears, biases=biases, norms=2 * h)


def total_params(shape: ModelShape) -> int:
    """All parameters of the model (tied embeddings counted once)."""
    embed = shape.vocab_size * shape.hidden_size
    lm_head = 0 if shape.tie_word_embeddings else embed
    return embed + lm_head + shape.num_layers * layer_params(shape).total + shape.hidden_size


def linear_bytes(out_features: int, in_features: int, quant: Quant, dtype_size: int, double_quant: bool = False) -> int:
    """Bytes one nn.Linear weight takes in memory at a quantization."""
    n = out_features * in_features
    if quant is Quant.INT8:
        return n + out_features * 4  # int8 weights + one fp32 scale per output row (SCB)
    if quant is Quant.NF4:
        packed = math.ceil(n / 2)  # two 4-bit codes per byte
        blocks = math.ceil(n / NF4_BLOCK)
        if double_quant:
            # absmax stored as uint8, plus fp32 absmax per 256 of those and a 256-entry code book
            stats = blocks + 4 * math.ceil(blocks / NESTED_BLOCK) + 4 * 256
        else:
            stats = 4 * blocks  # fp32 absmax per block
        return packed + stats + 4 * 16  # + the 16-entry NF4 code book
    if quant is Quant.INT4:
        in_p = math.ceil(in_features / INT4_IN_MULTIPLE) * INT4_IN_MULTIPLE
        packed = out_features * in_p // 2  # two 4-bit codes per byte (int32 words of 8)
        groups = out_features * (in_p // INT4_GROUP)
        return packed + groups * 2 * 2  # + a bf16 scale and a bf16 offset per group
    return n * dtype_size


def layer_bytes(shape: ModelShape, quant: Quant, dtype_size: int, double_quant: bool = False) -> int:
    """Bytes one decoder layer takes at a quantization (norms/biases stay in dtype_size)."""
    p = layer_params(shape)
    lin = sum(linear_bytes(o, i, quant, dtype_size, double_quant) for o, i in p.linear_shapes)
    return lin + (p.biases + p.norms) * dtype_size


def embedding_bytes(shape: ModelShape, dtype_size: int) -> int:
    """Input embedding table; bitsandbytes never quantizes it."""
    return shape.vocab_size * shape.hidden_size * dtype_size


def lm_head_bytes(shape: ModelShape, dtype_size: int, quant: Quant = Quant.NONE) -> int:
    """Output projection (0 when tied to the embedding).

    bitsandbytes keeps it unquantized; the int4 fast path quantizes an untied head too,
    since it is read for every token and is the largest single matrix (vocab x hidden).
    """
    if shape.tie_word_embeddings:
        return 0
    if quant is Quant.INT4:
        return linear_bytes(shape.vocab_size, shape.hidden_size, quant, dtype_size)
    return shape.vocab_size * shape.hidden_size * dtype_size


def weight_bytes(shape: ModelShape, quant: Quant, dtype_size: int, double_quant: bool = False) -> int:
    """All weights of the model at a quantization."""
    return (
        embedding_bytes(shape, dtype_size)
        + lm_head_bytes(shape, dtype_size, quant)
        + shape.num_layers * layer_bytes(shape, quant, dtype_size, double_quant)
        + shape.hidden_size * dtype_size  # final norm
    )


def kv_bytes_per_token(shape: ModelShape, dtype_size: int = 2) -> int:
    """KV cache per token: keys and values for every layer: 2 x layers x kv_heads x head_dim x bytes."""
    return 2 * shape.num_layers * shape.num_kv_heads * shape.head_dim * dtype_size


def kv_cache_bytes(shape: ModelShape, tokens: int, dtype_size: int = 2) -> int:
    """KV cache for `tokens` tokens of context (batch 1)."""
    return tokens * kv_bytes_per_token(shape, dtype_size)


def workspace_bytes(shape: ModelShape, quant: Quant, dtype_size: int, prefill_tokens: int = PREFILL_CHUNK,
                    context_tokens: int = 0) -> int:
    """Transient memory of one forward pass over `prefill_tokens` tokens (the prefill peak).

    Per token a Llama layer holds at once: the residual stream and its normed copy, q/k/v
    and their RoPE'd copies, the attention output, and in the MLP gate, up and act(gate)*up
    ([T, intermediate] each). Attention itself runs in SDPA's flash/memory-efficient kernels,
    so nothing is quadratic in T. Logits are computed for the last position only (fp32).
    A growing KV cache is appended with torch.cat, so for a moment one layer's old and new
    keys and values both exist: two layers' worth of KV at `context_tokens`.
    """
    t = prefill_tokens
    hd = shape.head_dim
    qkv = (shape.num_heads + 2 * shape.num_kv_heads) * hd
    per_token = 4 * shape.hidden_size + 2 * qkv + 3 * shape.intermediate_size
    activations = t * per_token * dtype_size
    logits = shape.vocab_size * 4 * 2  # fp32 logits of the last token, plus softmax for sampling
    widest = max(o * i for o, i in layer_params(shape).linear_shapes)
    largest_out = max(o for o, _ in layer_params(shape).linear_shapes)
    if quant is Quant.NF4:
        # For more than one token bitsandbytes dequantizes the whole weight to fp16 first.
        scratch = widest * 2
    elif quant is Quant.INT8:
        # LLM.int8: int8 copy of the input, int32 output, fp16 output ([T, out] each).
        scratch = t * (shape.intermediate_size + largest_out * 4 + largest_out * 2)
    elif quant is Quant.INT4:
        # A prefill dequantizes one linear at a time into a bf16 temporary for cuBLAS (the widest: the fused
        # gate/up [K, 2 x intermediate], or the lm_head's when untied); the split-K GEMV's and the fused decode
        # attention's workspaces (kernels/); and the fast decoder's explicit [T, context] boolean mask.
        head = 0 if shape.tie_word_embeddings else shape.vocab_size * shape.hidden_size
        fused = max(2 * shape.intermediate_size, qkv) * shape.hidden_size
        largest_n = max(largest_out, 2 * shape.intermediate_size, qkv, shape.vocab_size)
        kernels = 4 * (int4_partial_floats(largest_n) + largest_n + attention_partial_floats(shape.num_heads, shape.num_kv_heads, hd))
        scratch = max(widest, fused, head) * 2 + kernels + t * context_tokens
    else:
        scratch = 0
    cat_transient = 2 * kv_cache_bytes(shape, context_tokens, dtype_size) // shape.num_layers
    return activations + logits + scratch + cat_transient


@dataclass(frozen=True)
class Budget:
    """What the machine offers: GPU budget (None on CPU-only), free RAM, free disk."""

    gpu_bytes: int | None  # the user's VRAM budget for this app, CUDA context included (all GPUs together)
    ram_bytes: int  # RAM the app may use for weights
    disk_bytes: int = 0  # free space in the offload folder
    cuda_context_bytes: int = DEFAULT_CUDA_CONTEXT  # per GPU: each device has its own context
    # One budget per visible GPU when there are several (their sum is gpu_bytes); () on one GPU.
    gpu_bytes_per_device: tuple[int, ...] = ()

    @property
    def gpu_count(self) -> int:
        """GPUs the plan may spread layers over (0 on a CPU-only machine)."""
        if self.gpu_bytes is None:
            return 0
        return max(1, len(self.gpu_bytes_per_device))


class Verdict(str, Enum):
    """Whether and where a model fits (a str enum: saved and logged as its value)."""

    GPU = "gpu"  # wholly on the GPU(s)
    OFFLOAD = "offload"  # some layers in CPU RAM or on disk
    CPU = "cpu"  # no GPU: in RAM
    DISK = "disk"  # no GPU, and some layers on disk
    NO_FIT = "no_fit"
    REMOTE = "remote"  # served by a remote engine: nothing placed here

    @property
    def loadable(self) -> bool:
        """Whether a load under this verdict can go ahead."""
        return self is not Verdict.NO_FIT

    @property
    def resident_only(self) -> bool:
        """Whether the model sits wholly in the compute device's memory (nothing streamed in)."""
        return self in (Verdict.GPU, Verdict.CPU)


@dataclass(frozen=True)
class FitPlan:
    """Where each part of a model goes under a budget, and the predicted peak memory."""

    verdict: Verdict
    device: str  # "cuda" | "cpu"
    quant: Quant
    context_tokens: int
    weights_bytes: int  # the whole model at this quantization
    gpu_weights_bytes: int  # the part resident on the GPU
    kv_bytes: int
    workspace_bytes: int
    cuda_context_bytes: int  # CUDA context + kernel images (0 on CPU)
    predicted_peak_bytes: int  # on the device that computes: GPU if any, else RAM
    gpu_layers: int
    cpu_layers: int
    disk_layers: int
    lm_head_on_gpu: bool
    reason: Message  # the verdict in words, with its numbers (models/messages.py)
    budget_bytes: int = 0  # the GPU budget (or RAM on a CPU-only machine) planned against
    streamed_layers: int = 0  # CPU-RAM layers prefetched by models/offload.py (its slots are in gpu_weights_bytes)
    # Several GPUs: decoder layers, predicted peak and budget of each GPU, in layer order; () on one GPU.
    gpu_layers_per_device: tuple[int, ...] = ()
    peak_bytes_per_device: tuple[int, ...] = ()
    budget_bytes_per_device: tuple[int, ...] = ()
    head_device: int = 0  # the GPU holding the final norm and lm_head (the last one with layers)
    kept_on_one_gpu: bool = False  # several GPUs, but the quantization runs on one (int4)

    @property
    def message(self) -> str:
        """The verdict in English (the CLI's line; the UI renders `reason` in the user's language)."""
        return self.reason.render("en")

    @property
    def gpu_count(self) -> int:
        """GPUs the model is spread over (1 on one GPU, 0 on a CPU-only machine)."""
        return len(self.gpu_layers_per_device) or (1 if self.device == "cuda" else 0)

    def kv_layers_per_device(self) -> tuple[int, ...]:
        """Decoder layers whose KV cache each GPU holds: its own, and on GPU 0 the offloaded ones too."""
        counts = self.gpu_layers_per_device or ((self.gpu_layers,) if self.device == "cuda" else ())
        return tuple(n + (self.cpu_layers + self.disk_layers if d == 0 else 0) for d, n in enumerate(counts))

    def layer_device(self, i: int) -> int | str:
        """Where decoder layer `i` lives: a GPU index, "cpu" or "disk" (streamed layers first: offload.py says why)."""
        if self.streamed_layers and not self.gpu_layers_per_device:
            return "cpu" if i < self.streamed_layers else 0
        counts = self.gpu_layers_per_device or ((self.gpu_layers,) if self.device == "cuda" else ())
        for gpu, n in enumerate(counts):
            if i < n:
                return gpu
            i -= n
        return "cpu" if i < self.cpu_layers else "disk"

    @property
    def offloaded_layers(self) -> int:
        """Decoder layers kept off the compute device (on a CPU-only machine: those on disk)."""
        return self.disk_layers + (self.cpu_layers if self.device == "cuda" else 0)


def gib_text(n: int) -> str:
    """Bytes as '1.23 GiB' (the plans' messages)."""
    return f"{n / GiB:.2f} GiB"


def plan_fit(shape: ModelShape, quant: Quant, dtype_size: int, context_tokens: int, budget: Budget,
             double_quant: bool = False, stream_slots: int = 1) -> FitPlan:
    """Decide where the weights go and whether the model fits, before loading anything.

    On a GPU: embeddings, KV cache for `context_tokens`, workspace and the CUDA context must
    fit the budget; decoder layers then go on the GPU while they fit, the rest to RAM, then
    disk. Offloaded layers are streamed onto the GPU as they run, so `stream_slots` layers'
    worth of room is kept for them (1 for accelerate's copy-on-call; 2 for models/offload.py,
    which fills one slot while the other computes). bitsandbytes keeps CPU-offloaded layers
    unquantized in fp32.
    """
    n_layers = shape.num_layers
    per_layer = layer_bytes(shape, quant, dtype_size, double_quant)
    embed = embedding_bytes(shape, dtype_size) + shape.hidden_size * dtype_size
    head = lm_head_bytes(shape, dtype_size, quant)
    total = weight_bytes(shape, quant, dtype_size, double_quant)
    kv = kv_cache_bytes(shape, context_tokens, dtype_size)
    work = workspace_bytes(shape, quant, dtype_size, min(context_tokens, PREFILL_CHUNK), context_tokens)

    if budget.gpu_bytes is None:
        return _plan_cpu(shape, quant, dtype_size, context_tokens, budget, total, per_layer, kv, work)
    if budget.gpu_count > 1:
        from .memory_split import plan_int4_one_gpu, plan_split  # it builds on this module's parts

        if quant is Quant.INT4:
            return plan_int4_one_gpu(shape, dtype_size, context_tokens, budget, double_quant)
        return plan_split(shape, quant, dtype_size, context_tokens, budget, double_quant, stream_slots)

    # Offloaded layers live in RAM at full size (bnb keeps them unquantized in fp32), and are
    # copied to the GPU as they run: the GPU needs room for one of them at a time.
    offload_layer = layer_bytes(shape, Quant.NONE, 4) if quant in (Quant.INT8, Quant.NF4) else per_layer
    runtime = budget.cuda_context_bytes + KERNEL_IMAGES[quant]
    fixed = runtime + kv + work + embed + ALLOCATOR_SLACK
    room = budget.gpu_bytes - fixed
    if room >= n_layers * per_layer + head:
        gpu_layers, head_on_gpu, stream = n_layers, True, 0
    elif room - stream_slots * offload_layer >= head:
        # The lm_head is read for every token, like a layer, and is bigger than one: keep it
        # on the GPU before any decoder layer, and stream the layers that don't fit.
        stream, head_on_gpu = stream_slots * offload_layer, True
        gpu_layers = min(n_layers, (room - stream - head) // per_layer)
    else:
        stream, head_on_gpu = max(stream_slots * offload_layer, head), False
        gpu_layers = max(0, min(n_layers, (room - stream) // per_layer))
    rest = n_layers - gpu_layers
    ram_room = budget.ram_bytes - (0 if head_on_gpu else head)
    cpu_layers = min(rest, max(0, ram_room // offload_layer)) if rest else 0
    disk_layers = rest - cpu_layers
    # Streamed layers (models/offload.py) keep their slots for good: those slots hold weights.
    streamed = cpu_layers if stream_slots > 1 and cpu_layers and not disk_layers else 0
    gpu_weights = embed + gpu_layers * per_layer + (head if head_on_gpu else 0) + (stream if streamed else 0)
    peak = fixed - embed + gpu_weights + (0 if streamed else stream)
    if room < stream or (disk_layers and disk_layers * offload_layer > budget.disk_bytes):
        verdict = Verdict.NO_FIT
        message = Message("plan_no_fit", dict(
            budget=gib_text(budget.gpu_bytes), tokens=context_tokens, need=gib_text(fixed + stream),
            ram=gib_text(budget.ram_bytes), disk=gib_text(budget.disk_bytes), weights=gib_text(total)))
    elif rest == 0 and head_on_gpu:
        verdict = Verdict.GPU
        message = Message("plan_gpu", dict(peak=gib_text(peak), budget=gib_text(budget.gpu_bytes)))
    else:
        verdict = Verdict.OFFLOAD
        message = Message("plan_offload", dict(rest=rest, layers=n_layers, where=where_offloaded(cpu_layers, streamed, disk_layers),
                                               peak=gib_text(peak), budget=gib_text(budget.gpu_bytes)))
    return FitPlan(
        verdict=verdict, device="cuda", quant=quant, context_tokens=context_tokens,
        weights_bytes=total, gpu_weights_bytes=gpu_weights, kv_bytes=kv, workspace_bytes=work + ALLOCATOR_SLACK,
        cuda_context_bytes=runtime, predicted_peak_bytes=peak,
        gpu_layers=gpu_layers, cpu_layers=cpu_layers, disk_layers=disk_layers,
        lm_head_on_gpu=head_on_gpu, reason=message, budget_bytes=budget.gpu_bytes, streamed_layers=streamed,
    )


def where_offloaded(cpu_layers: int, streamed: int, disk_layers: int) -> Message:
    """'12 to CPU RAM, prefetched a layer ahead, 3 to disk' as a Message (nested in a plan's reason)."""
    code = "where_cpu_streamed" if streamed else "where_cpu"
    return Message(code + ("_disk" if disk_layers else ""), dict(n=cpu_layers, disk=disk_layers))


def _plan_cpu(shape, quant, dtype_size, context_tokens, budget, total, per_layer, kv, work) -> FitPlan:
    n_layers = shape.num_layers
    fixed = total - n_layers * per_layer + kv + work
    room = budget.ram_bytes - fixed
    cpu_layers = n_layers if room >= n_layers * per_layer else max(0, room // per_layer)
    disk_layers = n_layers - cpu_layers
    peak = fixed + cpu_layers * per_layer
    if room < 0 or disk_layers * per_layer > budget.disk_bytes:
        verdict = Verdict.NO_FIT
        message = Message("plan_cpu_no_fit", dict(need=gib_text(total + kv + work), ram=gib_text(budget.ram_bytes),
                                                  disk=gib_text(budget.disk_bytes)))
    elif disk_layers:
        verdict = Verdict.DISK
        message = Message("plan_disk", dict(disk=disk_layers, layers=n_layers, peak=gib_text(peak)))
    else:
        verdict = Verdict.CPU
        message = Message("plan_cpu", dict(peak=gib_text(peak), ram=gib_text(budget.ram_bytes)))
    return FitPlan(
        verdict=verdict, device="cpu", quant=quant, context_tokens=context_tokens,
        weights_bytes=total, gpu_weights_bytes=0, kv_bytes=kv, workspace_bytes=work,
        cuda_context_bytes=0, predicted_peak_bytes=peak, gpu_layers=0, cpu_layers=cpu_layers,
        disk_layers=disk_layers, lm_head_on_gpu=False, reason=message, budget_bytes=budget.ram_bytes,
    )
