"""Where a model's parts go: the memory budget the machine offers, the fit plan for a load's
settings, and the explicit accelerate device map that realizes the plan (models/memory.py has the math)."""

from __future__ import annotations

from pathlib import Path

import torch

from . import hardware
from .catalog import ModelShape
from .memory import GiB, Budget, FitPlan, plan_fit
from .offload import SLOTS as STREAM_SLOTS
from .quant import dtype_bytes, storage_dtype, streams_offload
from .settings import LoadSettings, ModelLoadError

DEFAULT_MARGIN = GiB // 2  # free VRAM left to other programs when the user sets no GPU budget


def make_budget(settings: LoadSettings, cuda_runtime_bytes: int, cache_dir: Path) -> Budget:
    """The memory this load may use: the GPU budget (or None on CPU), free RAM and disk."""
    ram = int(hardware.ram_available() * 0.9)  # leave the OS and the UI some room
    disk = hardware.disk_free(cache_dir)
    if not hardware.cuda_available():
        return Budget(gpu_bytes=None, ram_bytes=ram, disk_bytes=disk)
    count = hardware.cuda_device_count()
    # The user's GPU budget applies to each GPU; by default each GPU's own free VRAM.
    per_device = tuple(int(settings.gpu_budget_bytes or default_gpu_budget_bytes(d, cuda_runtime_bytes))
                       for d in range(max(1, count)))
    return Budget(gpu_bytes=sum(per_device), ram_bytes=ram, disk_bytes=disk, cuda_context_bytes=cuda_runtime_bytes,
                  gpu_bytes_per_device=per_device if count > 1 else ())


def default_gpu_budget_bytes(device: int, cuda_runtime_bytes: int) -> int:
    """The GPU budget when the user sets none: the GPU's free VRAM minus a margin, plus what this app holds there.

    What the app already holds (torch's pool and its CUDA context) is counted in, so a reload
    may reuse the memory of the model it replaces.
    """
    free = max(0, hardware.gpu_free_bytes(device) - DEFAULT_MARGIN)
    return free + hardware.gpu_reserved_bytes(device) + cuda_runtime_bytes


def max_memory(plan: FitPlan, ram_bytes: int) -> dict[int | str, int] | None:
    """accelerate's per-device caps for a plan over several GPUs (None on one GPU or the CPU)."""
    if not plan.gpu_layers_per_device:
        return None
    caps: dict[int | str, int] = dict(enumerate(plan.budget_bytes_per_device))
    caps["cpu"] = ram_bytes
    return caps


def plan_for(shape: ModelShape, settings: LoadSettings, budget: Budget) -> FitPlan:
    """The fit plan for a shape under a budget (pure; no loading)."""
    device = "cuda" if budget.gpu_bytes is not None else "cpu"
    size = dtype_bytes(storage_dtype(settings.quant, device))
    # Over several GPUs the offloaded layers keep accelerate's hooks: they move each layer's inputs
    # from the GPU before it onto GPU 0, which models/offload.py's streamer does not do.
    streams = settings.stream_offload and streams_offload(settings.quant) and budget.gpu_count <= 1
    slots = STREAM_SLOTS if streams else 1
    return plan_fit(shape, settings.quant, size, settings.context_tokens, budget, settings.double_quant, slots)


def layers_name(meta_model: torch.nn.Module, num_layers: int) -> str:
    for name, module in meta_model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == num_layers:
            return name
    raise ModelLoadError("no_decoder_layers")


def build_device_map(meta_model: torch.nn.Module, plan: FitPlan, num_layers: int) -> dict[str, int | str]:
    """An explicit accelerate device map that realizes `plan` (GPU 0, GPU 1, ..., then "cpu", then "disk")."""
    compute = 0 if plan.device == "cuda" else "cpu"
    layers = layers_name(meta_model, num_layers)
    device_map: dict[str, int | str] = {}
    for i in range(num_layers):
        device_map[f"{layers}.{i}"] = plan.layer_device(i)  # a GPU index, "cpu" or "disk"
    head = meta_model.get_output_embeddings()
    tied = head is not None and head.weight is meta_model.get_input_embeddings().weight
    # Every module that is not a decoder layer goes to the compute device, except an
    # untied lm_head the plan could not fit there. Over several GPUs the lm_head and the
    # modules with weights after the layers (the final norm) go on the plan's last GPU.
    last = plan.head_device if plan.gpu_layers_per_device else compute
    parts = layers.split(".")
    for depth in range(len(parts)):
        prefix = ".".join(parts[:depth])
        parent = meta_model.get_submodule(prefix) if prefix else meta_model
        after_layers = False
        for name, child in parent.named_children():
            full = f"{prefix}.{name}" if prefix else name
            if full == ".".join(parts[: depth + 1]):
                after_layers = True
                continue
            if child is head:  # a tied head shares the embedding's weight, so it stays beside it
                device_map[full] = compute if tied else (last if plan.lm_head_on_gpu else "cpu")
            elif after_layers and any(True for _ in child.parameters()):
                device_map[full] = last
            else:
                device_map[full] = compute
    return device_map


def weights_on_device_bytes(model: torch.nn.Module, device: str) -> int:
    """Bytes of parameters, buffers and bitsandbytes quantization state held on `device` ("cuda" or "cuda:1").

    A tensor is counted once by where its data is, so tied weights and streamed layers (whose
    parameters are views into shared staging slots, models/offload.py) are not counted twice.
    """
    seen: set[tuple] = set()
    total = 0

    def add(t: torch.Tensor | None) -> None:
        nonlocal total
        # "cuda" counts every GPU; "cuda:1" only that one.
        if t is None or (t.device.type != device and str(t.device) != device):
            return
        wrapper = type(t) not in (torch.Tensor, torch.nn.Parameter) and hasattr(t, "__tensor_flatten__")
        # A wrapper tensor subclass has no data of its own: its inner tensors are keyed below.
        key = (id(t),) if wrapper else (t.data_ptr(), t.numel(), t.dtype)
        if key in seen:
            return
        seen.add(key)
        if wrapper:
            for name in t.__tensor_flatten__()[0]:
                add(getattr(t, name))
            return
        total += t.numel() * t.element_size()

    for tensor in list(model.parameters()) + list(model.buffers()):
        add(tensor)
        state = getattr(tensor, "quant_state", None)  # bnb 4-bit: absmax and code books
        if state is not None:
            add(state.absmax)
            add(state.code)
            if getattr(state, "state2", None) is not None:
                add(state.state2.absmax)
                add(state.state2.code)
        add(getattr(tensor, "SCB", None))  # bnb 8-bit: per-row scales
    return total


def cap_allocator(settings: LoadSettings, cuda_runtime_bytes: int) -> None:
    """Cap torch's allocator on every GPU at the budget (minus the CUDA context, which it does not manage).

    So the app can never use more VRAM than the user allowed, even on a bigger card. The GPU
    budget is per GPU: every visible device gets the same cap.
    """
    for device in range(max(1, hardware.cuda_device_count())):
        total = torch.cuda.get_device_properties(device).total_memory
        if settings.gpu_budget_bytes:
            # A tiny floor only: set_per_process_memory_fraction rejects 0, and a budget
            # below the context must still make loads fail rather than be ignored.
            fraction = max(1e-6, min(1.0, (settings.gpu_budget_bytes - cuda_runtime_bytes) / total))
        else:
            fraction = 1.0
        torch.cuda.set_per_process_memory_fraction(fraction, device)


def less_held(per_device: tuple[int, ...], held: int) -> tuple[int, ...]:
    """Per-GPU budgets with what kept models hold taken out, from GPU 0 on (where their layers start)."""
    out = []
    for budget in per_device:
        take = min(budget, held)
        out.append(budget - take)
        held -= take
    return tuple(out)


def kv_split(kv: int, plan, count: int) -> list[int]:
    """KV bytes on each of `count` GPUs: each holds its layers' share (all on GPU 0 without a split plan)."""
    holds = list(plan.kv_layers_per_device()) if plan is not None and plan.gpu_layers_per_device else [1]
    holds += [0] * (count - len(holds))
    return [kv * h // max(1, sum(holds)) for h in holds[:count]]
