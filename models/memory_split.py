"""Memory planning over several GPUs: whole decoder layers spread GPU by GPU, each within its own
budget, before anything goes to CPU RAM (pure math, like models/memory.py, whose parts it uses)."""

from __future__ import annotations

from dataclasses import replace

from .memory import (
    ALLOCATOR_SLACK, KERNEL_IMAGES, PREFILL_CHUNK, Budget, FitPlan, Verdict, embedding_bytes, gib_text, kv_cache_bytes,
    layer_bytes, lm_head_bytes, plan_fit, weight_bytes, where_offloaded, workspace_bytes,
)
from .messages import Message
from .quant import Quant


def _fill(caps: list[int], n: int) -> list[int]:
    """`n` layers given to devices in order, each up to its capacity."""
    counts = []
    for cap in caps:
        counts.append(min(cap, n - sum(counts)))
    return counts


def _plus(parts) -> str:
    return " + ".join(str(p) for p in parts)


def plan_int4_one_gpu(shape, dtype_size, context_tokens, budget, double_quant) -> FitPlan:
    """int4 on several GPUs: planned on GPU 0 alone, since the fast decoder runs the whole model on one device."""
    one = Budget(gpu_bytes=budget.gpu_bytes_per_device[0], ram_bytes=budget.ram_bytes, disk_bytes=budget.disk_bytes,
                 cuda_context_bytes=budget.cuda_context_bytes)
    plan = plan_fit(shape, Quant.INT4, dtype_size, context_tokens, one, double_quant)
    return replace(plan, reason=Message("plan_int4_one_gpu", dict(n=budget.gpu_count, plan=plan.reason)),
                   kept_on_one_gpu=True)


def plan_split(shape, quant, dtype_size, context_tokens, budget, double_quant, stream_slots) -> FitPlan:
    """Several GPUs: whole decoder layers on GPU 0, then GPU 1, ..., each within its own budget; then RAM, disk.

    Every GPU keeps its own CUDA context, kernel images, workspace and allocator slack. A layer's
    KV cache lives beside the layer. The embeddings go on GPU 0; the final norm and lm_head on
    the last GPU that holds layers. Offloaded layers run on GPU 0 (accelerate's execution device
    and models/offload.py's target), so their KV cache and stream slots are on GPU 0 too.
    """
    n = shape.num_layers
    budgets = budget.gpu_bytes_per_device
    per_layer = layer_bytes(shape, quant, dtype_size, double_quant)
    embed = embedding_bytes(shape, dtype_size)
    head = lm_head_bytes(shape, dtype_size, quant) + shape.hidden_size * dtype_size  # + the final norm
    total = weight_bytes(shape, quant, dtype_size, double_quant)
    kv = kv_cache_bytes(shape, context_tokens, dtype_size)
    kv_layer = kv // n  # [tokens, 2, kv_heads, head_dim] per layer
    work = workspace_bytes(shape, quant, dtype_size, min(context_tokens, PREFILL_CHUNK), context_tokens)
    offload_layer = layer_bytes(shape, Quant.NONE, 4) if quant in (Quant.INT8, Quant.NF4) else per_layer
    runtime = budget.cuda_context_bytes + KERNEL_IMAGES[quant]
    fixed = runtime + work + ALLOCATOR_SLACK  # on every GPU that is used
    rooms = [b - fixed - (embed if d == 0 else 0) for d, b in enumerate(budgets)]
    cost = per_layer + kv_layer

    # All on GPUs: the fewest GPUs whose rooms hold every layer, the head on the last of them.
    for k in range(1, len(budgets) + 1):
        room = rooms[:k]
        room[-1] -= head
        if room[0] < 0 or room[-1] < 0:
            continue
        caps = [max(0, r) // cost for r in room]
        if sum(caps) >= n:
            counts = _fill(caps, n) + [0] * (len(budgets) - k)
            peaks = [fixed + c * cost + (embed if d == 0 else 0) + (head if d == k - 1 else 0) if d < k else 0
                     for d, c in enumerate(counts)]
            message = Message("plan_split", dict(
                n=k, s="s" if k > 1 else "", layers=_plus(counts[:k]), peaks=_plus(gib_text(p) for p in peaks[:k]),
                budgets=_plus(gib_text(b) for b in budgets[:k])))
            return _split_plan(Verdict.GPU, message, quant, context_tokens, total, embed + n * per_layer + head, kv,
                               work, runtime, counts, peaks, budgets, k - 1, 0, 0, True, 0)

    # Offload: every GPU full, the head on the last GPU if it fits there, the rest to RAM then disk.
    last = len(budgets) - 1
    head_on_gpu = rooms[last] - head >= 0
    stream = stream_slots * offload_layer if head_on_gpu else max(stream_slots * offload_layer, head)
    room = list(rooms)
    if head_on_gpu:
        room[last] -= head
    others = _fill([max(0, r) // cost for r in room[1:]], n)
    m = n - sum(others)  # layers left for GPU 0 and for offload, whose KV is all on GPU 0
    room0 = room[0] - stream - m * kv_layer
    g0 = max(0, min(m, room0 // per_layer))
    counts = [g0] + others
    rest = m - g0
    ram_room = budget.ram_bytes - (0 if head_on_gpu else head)
    cpu_layers = min(rest, max(0, ram_room // offload_layer))
    disk_layers = rest - cpu_layers
    streamed = cpu_layers if stream_slots > 1 and cpu_layers and not disk_layers else 0
    peaks = [fixed + embed + g0 * per_layer + m * kv_layer + stream]
    peaks += [fixed + c * cost + (head if head_on_gpu and d == last else 0) for d, c in enumerate(others, 1)]
    gpu_weights = embed + sum(counts) * per_layer + (head if head_on_gpu else 0) + (stream if streamed else 0)
    if room0 < 0 or (disk_layers and disk_layers * offload_layer > budget.disk_bytes):
        verdict = Verdict.NO_FIT
        message = Message("plan_split_no_fit", dict(
            n=len(budgets), budget=gib_text(budgets[0]), tokens=context_tokens, need=gib_text(budgets[0] - room0),
            ram=gib_text(budget.ram_bytes), disk=gib_text(budget.disk_bytes), weights=gib_text(total)))
    else:
        verdict = Verdict.OFFLOAD
        message = Message("plan_split_offload", dict(
            n=len(budgets), rest=rest, layers=n, where=where_offloaded(cpu_layers, streamed, disk_layers), counts=_plus(counts),
            peaks=_plus(gib_text(p) for p in peaks), budgets=_plus(gib_text(b) for b in budgets)))
    return _split_plan(verdict, message, quant, context_tokens, total, gpu_weights, kv, work, runtime, counts, peaks,
                       budgets, last if head_on_gpu else 0, cpu_layers, disk_layers, head_on_gpu, streamed)


def _split_plan(verdict, message, quant, context_tokens, total, gpu_weights, kv, work, runtime, counts, peaks,
                budgets, head_device, cpu_layers, disk_layers, head_on_gpu, streamed) -> FitPlan:
    return FitPlan(
        verdict=verdict, device="cuda", quant=quant, context_tokens=context_tokens, weights_bytes=total,
        gpu_weights_bytes=gpu_weights, kv_bytes=kv, workspace_bytes=work + ALLOCATOR_SLACK,
        cuda_context_bytes=runtime, predicted_peak_bytes=sum(peaks), gpu_layers=sum(counts),
        cpu_layers=cpu_layers, disk_layers=disk_layers, lm_head_on_gpu=head_on_gpu, reason=message,
        budget_bytes=sum(budgets), streamed_layers=streamed, gpu_layers_per_device=tuple(counts),
        peak_bytes_per_device=tuple(peaks), budget_bytes_per_device=tuple(budgets), head_device=head_device,
    )


def kv_room_bytes(plan: FitPlan) -> int:
    """GPU bytes a loaded model leaves for KV caches under its budget (its plan minus its own KV)."""
    if not plan.gpu_layers_per_device:
        return max(0, plan.budget_bytes - (plan.predicted_peak_bytes - plan.kv_bytes))
    # Several GPUs: each holds the KV of its own layers (GPU 0 also that of offloaded ones), so
    # the GPU with the least room per layer it holds limits the whole cache.
    n = plan.gpu_layers + plan.cpu_layers + plan.disk_layers
    rooms = []
    for holds, peak, budget in zip(plan.kv_layers_per_device(), plan.peak_bytes_per_device,
                                   plan.budget_bytes_per_device):
        if holds:
            rooms.append(max(0, budget - (peak - plan.kv_bytes * holds // n)) * n // holds)
    return min(rooms) if rooms else 0
