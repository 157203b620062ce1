"""Load a model at a quantization under a memory budget: the one place that touches bitsandbytes/accelerate.

The device map is computed by our planner (models/memory.py) and handed to
from_pretrained explicitly, so the split the user was shown before loading is the
split they get. Decoder layers that do not fit on the GPU go to CPU RAM, then disk.
fp16/bf16 layers in CPU RAM are then streamed onto the GPU one layer ahead of use
(models/offload.py); bitsandbytes and disk-offloaded layers keep accelerate's
copy-on-call hooks.
"""

from __future__ import annotations

import gc
import time
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from safetensors import SafetensorError

from . import hardware
from .catalog import ModelRef, ModelShape
from .errors import coded
from .integrity import check_safetensors, check_tokenizer_fits
from .memory import GiB, Budget, FitPlan, plan_fit
from .offload import SLOTS as STREAM_SLOTS
from .offload import LayerStreamer, stream_offloaded_layers
from .quant import Quant, dtype_bytes, quant_options, storage_dtype, streams_offload
from .sources import LocalModel, ModelSourceError, default_cache_dir, resolve_local

if TYPE_CHECKING:
    from .fast_decode import FastDecoder

ProgressFn = Callable[[float, str], None]


def _not_cast_notice(record: logging.LogRecord) -> bool:
    return "inputs will be cast" not in record.getMessage()


# bitsandbytes logs on every 8-bit matmul that it casts bf16 inputs to fp16 (its CPU path);
# the cast is expected, and the line would flood the log once per layer per token.
logging.getLogger("bitsandbytes.autograd._functions").addFilter(_not_cast_notice)


class ModelLoadError(RuntimeError):
    """Loading failed for a reason the user can act on; the message says which."""


class NoChatTemplateError(ModelLoadError):
    """The tokenizer has no chat template, so there is no correct way to format a chat."""


@dataclass(frozen=True)
class LoadSettings:
    """How to load: quantization, memory budget, context to plan for."""

    quant: Quant = Quant.NONE
    double_quant: bool = False
    gpu_budget_bytes: int | None = None  # None: free VRAM minus a margin; ignored without a GPU
    context_tokens: int = 4096
    trust_remote_code: bool = False
    cache_dir: Path | None = None
    # fp16/bf16 layers offloaded to CPU RAM are page-locked and prefetched a layer ahead by
    # models/offload.py: 4.2 tok/s for a 7B under 8 GiB on an H200 against 0.6 with accelerate's
    # copy-on-call hooks (bench/decode_speed.py; ../BENCHMARKS.md). --accelerate-offload turns it off.
    stream_offload: bool = True


@dataclass
class LoadedModel:
    """A model ready to generate, with what was planned and what was measured."""

    ref: ModelRef
    model: torch.nn.Module
    tokenizer: object
    shape: ModelShape
    settings: LoadSettings
    dtype: str
    device: str  # where computation runs: "cuda" | "cpu"
    plan: FitPlan
    load_seconds: float
    weights_bytes: int  # measured: bytes of weights resident on the compute device
    split: dict = field(default_factory=dict)  # decoder layers per place: gpu/cpu/disk (+ gpus: per GPU, if several)
    fast: "FastDecoder | None" = None  # static-cache CUDA-graph decoder (Quant.INT4); None: plain generate()
    streamer: LayerStreamer | None = None  # prefetches CPU-offloaded fp16/bf16 layers; None: none or accelerate's
    compile_seconds: float = 0.0  # the fast decoder's one-off compile + graph capture, inside load_seconds
    weights_bytes_per_device: tuple[int, ...] = ()  # measured per GPU when spread over several; () otherwise

    @property
    def input_device(self) -> torch.device:
        """Where input ids must go (the embedding's device)."""
        return self.model.get_input_embeddings().weight.device


def _progress(progress: ProgressFn | None, fraction: float, message: str) -> None:
    if progress:
        progress(fraction, message)


def _torch_dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def make_budget(settings: LoadSettings, cuda_runtime_bytes: int, cache_dir: Path) -> Budget:
    """The memory this load may use: the GPU budget (or None on CPU), free RAM and disk."""
    ram = int(hardware.ram_available() * 0.9)  # leave the OS and the UI some room
    disk = hardware.disk_free(cache_dir)
    if not hardware.cuda_available():
        return Budget(gpu_bytes=None, ram_bytes=ram, disk_bytes=disk)
    count = hardware.cuda_device_count()
    if count > 1:
        return _multi_gpu_budget(settings, cuda_runtime_bytes, count, ram, disk)
    gpu = settings.gpu_budget_bytes
    if gpu is None:
        gpu = hardware.default_gpu_budget_bytes() or 0
        gpu += hardware.gpu_reserved_bytes(0) + cuda_runtime_bytes  # what we already hold is ours to reuse
    return Budget(gpu_bytes=int(gpu), ram_bytes=ram, disk_bytes=disk, cuda_context_bytes=cuda_runtime_bytes)


def _multi_gpu_budget(settings: LoadSettings, cuda_runtime_bytes: int, count: int, ram: int, disk: int) -> Budget:
    """One budget per visible GPU: the user's GPU budget applies to each; by default each GPU's free VRAM."""
    per_device = []
    for d in range(count):
        gpu = settings.gpu_budget_bytes
        if gpu is None:
            # Free VRAM minus the same margin as one GPU, plus what we already hold there.
            gpu = max(0, hardware.gpu_free_bytes(d) - GiB // 2) + hardware.gpu_reserved_bytes(d) + cuda_runtime_bytes
        per_device.append(int(gpu))
    return Budget(gpu_bytes=sum(per_device), ram_bytes=ram, disk_bytes=disk, cuda_context_bytes=cuda_runtime_bytes,
                  gpu_bytes_per_device=tuple(per_device))


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


def _layers_name(meta_model: torch.nn.Module, num_layers: int) -> str:
    for name, module in meta_model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == num_layers:
            return name
    raise ModelLoadError("Could not find the decoder layers of this model to split it across devices.")


def build_device_map(meta_model: torch.nn.Module, plan: FitPlan, num_layers: int) -> dict[str, int | str]:
    """An explicit accelerate device map that realizes `plan` (GPU 0, GPU 1, ..., then "cpu", then "disk")."""
    compute = 0 if plan.device == "cuda" else "cpu"
    layers = _layers_name(meta_model, num_layers)
    return _device_map(meta_model, plan, num_layers, layers, compute)


def _device_map(meta_model: torch.nn.Module, plan: FitPlan, num_layers: int, layers: str,
                compute: int | str) -> dict[str, int | str]:
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


def _meta_model(config, trust_remote_code: bool) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def _bnb_config(quant: Quant, compute_dtype: torch.dtype, double_quant: bool, offloaded: bool):
    from transformers import BitsAndBytesConfig

    if quant is Quant.INT8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_enable_fp32_cpu_offload=offloaded)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_use_double_quant=double_quant,
        llm_int8_enable_fp32_cpu_offload=offloaded,
    )


def _attach_fast_decoder(model: torch.nn.Module, context_tokens: int, shape: ModelShape,
                         progress: ProgressFn | None, cache_dir: Path):
    """A FastDecoder with its cache sized to the context and its uncompiled step captured now;
    the compiled step follows in the background (FastDecoder.start_background_compile)."""
    from . import compile_cache
    from .fast_decode import FastDecoder

    compile_cache.configure(cache_dir)  # before the first Triton kernel: tuned int4 configs persist too
    _progress(progress, 0.8, "Capturing the decode step (tuning the int4 kernels on a first load)")
    fast = FastDecoder(model, max_context=min(context_tokens, shape.max_context), compile_cache_dir=cache_dir)
    seconds = fast.warm_up()
    fast.start_background_compile()
    _progress(progress, 0.95, f"Decode step captured in {seconds:.1f} s; compiling it in the background")
    return fast


def _load_config(local: LocalModel, trust_remote_code: bool):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(local.location, trust_remote_code=trust_remote_code)
    except OSError as e:
        if local.hub:
            raise coded(ModelSourceError(
                f"Could not get {local.location} from the hub ({_first_line(e)}). If you are offline, "
                "download the model once and point at its local folder."
            ), "hub_unreachable", repo=local.location, detail=_first_line(e)) from None
        raise ModelSourceError(f"Could not read the model config in {local.location}: {_first_line(e)}") from None
    except ValueError as e:
        # transformers says "model type X is not recognized" for architectures it lacks.
        hint = "" if trust_remote_code else " If you trust this model's code, rerun with --trust-remote-code."
        raise ModelLoadError(f"transformers cannot build this model: {_first_line(e)}{hint}") from None


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _check_chat_template(tokenizer, location: str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise coded(NoChatTemplateError(
            f"The tokenizer of {location} has no chat template, so it cannot format a chat. "
            "It is probably a base (non-chat) model: pick an instruct/chat model instead."
        ), "no_chat_template", location=location)


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


@dataclass(frozen=True)
class PreparedLoad:
    """Everything checked before a load touches device memory: source, config, tokenizer, plan."""

    ref: ModelRef
    settings: LoadSettings
    local: LocalModel
    config: object
    shape: ModelShape
    tokenizer: object
    device: str  # "cuda" | "cpu"
    plan: FitPlan
    started: float  # perf_counter when preparation began (load time counts from here)

    def replanned(self, budget: Budget) -> "PreparedLoad":
        """The same load planned under another budget (e.g. after other models were unloaded)."""
        plan = plan_for(self.shape, self.settings, budget)
        _check_plan(plan, self.settings)
        return replace(self, plan=plan)


def _check_plan(plan: FitPlan, settings: LoadSettings) -> None:
    if plan.verdict == "no_fit":
        raise ModelLoadError(plan.message)
    if settings.quant is Quant.INT4 and plan.verdict != "gpu":
        raise ModelLoadError(
            f"4bit-fast (int4) needs the whole model on the GPU, but: {plan.message} "
            "Pick 4bit (bitsandbytes), which can offload layers, or lower the context length."
        )


def prepare_load(ref: ModelRef, settings: LoadSettings, budget: Budget,
                 progress: ProgressFn | None = None) -> PreparedLoad:
    """Fetch/convert the files, read config and tokenizer, and plan; raise before any weights load.

    The engine calls this before it unloads the current model, so a load that cannot
    work (offline hub id, missing files, no chat template, won't fit) leaves the old
    model in place.
    """
    from transformers import AutoTokenizer

    started = time.perf_counter()
    cache_dir = settings.cache_dir or default_cache_dir()
    device = "cuda" if budget.gpu_bytes is not None else "cpu"
    offered = {o.quant: o for o in quant_options(device, torch.cuda.get_device_capability(0) if device == "cuda" else None)}
    if not offered[settings.quant].available:
        raise ModelLoadError(offered[settings.quant].reason)
    if ref.entry is not None:  # a catalog model: know it won't fit before downloading gigabytes
        _check_plan(plan_for(ref.entry.shape, settings, budget), settings)
    _progress(progress, 0.0, f"Preparing {ref.label}")
    local = resolve_local(ref, cache_dir, progress=lambda f, m: _progress(progress, 0.3 * f, m),
                          chat_template=ref.entry.chat_template if ref.entry else None)
    config = _load_config(local, settings.trust_remote_code)
    shape = ModelShape.from_config(config)
    plan = plan_for(shape, settings, budget)
    _check_plan(plan, settings)
    try:
        tokenizer = AutoTokenizer.from_pretrained(local.location, trust_remote_code=settings.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelSourceError(f"Could not load the tokenizer of {local.location}: {_first_line(e)}") from None
    _check_chat_template(tokenizer, local.location)
    check_tokenizer_fits(tokenizer, config, local.location)
    if not local.hub:
        check_safetensors(Path(local.location))
    return PreparedLoad(ref=ref, settings=settings, local=local, config=config, shape=shape,
                        tokenizer=tokenizer, device=device, plan=plan, started=started)


def load_prepared(prepared: PreparedLoad, progress: ProgressFn | None = None) -> LoadedModel:
    """Load the weights of a prepared load onto its planned devices."""
    from transformers import AutoModelForCausalLM

    ref, settings, plan, shape, device = prepared.ref, prepared.settings, prepared.plan, prepared.shape, prepared.device
    cache_dir = settings.cache_dir or default_cache_dir()
    dtype = storage_dtype(settings.quant, device)
    kwargs: dict = {"dtype": _torch_dtype(dtype), "trust_remote_code": settings.trust_remote_code}
    offloaded = plan.offloaded_layers > 0 or (device == "cuda" and not plan.lm_head_on_gpu)
    streamed: list[str] = []  # decoder layers in CPU RAM that models/offload.py will stream
    if device == "cuda" or offloaded:
        meta = _meta_model(prepared.config, settings.trust_remote_code)
        layers = _layers_name(meta, shape.num_layers)
        kwargs["device_map"] = _device_map(meta, plan, shape.num_layers, layers, 0 if device == "cuda" else "cpu")
        caps = max_memory(plan, hardware.ram_available())
        if caps:  # the map is explicit; the caps keep accelerate within each GPU's budget where it decides
            kwargs["max_memory"] = caps
        if plan.streamed_layers:
            streamed = [f"{layers}.{i}" for i in range(shape.num_layers) if kwargs["device_map"][f"{layers}.{i}"] == "cpu"]
    if plan.disk_layers:
        kwargs["offload_folder"] = str(cache_dir / "offload")
    if settings.quant in (Quant.INT8, Quant.NF4):
        kwargs["quantization_config"] = _bnb_config(settings.quant, _torch_dtype(dtype), settings.double_quant, offloaded)
    elif settings.quant is Quant.INT4:
        # Loaded in bf16 into RAM, then quantized linear by linear onto the GPU (kernels/int4.py):
        # the bf16 model never exists there whole.
        kwargs["device_map"] = "cpu"

    _progress(progress, 0.35, f"Loading weights ({settings.quant.value}, {plan.message})")
    # Out-of-memory cleanup happens after the except block: inside it, the exception's
    # traceback still holds the frames (and the half-loaded tensors) we want to free.
    out_of_memory = False
    try:
        model = AutoModelForCausalLM.from_pretrained(prepared.local.location, **kwargs)
    except torch.OutOfMemoryError:
        out_of_memory = True
    except (OSError, SafetensorError) as e:  # a file damaged after prepare_load checked it
        raise ModelSourceError(f"Could not load {prepared.local.location}: {_first_line(e)}") from None
    if out_of_memory:
        free_cuda_memory()
        raise coded(ModelLoadError(
            f"Out of GPU memory while loading {ref.label} ({settings.quant.value}). "
            "Lower the context length or the GPU budget's other users, or pick a smaller quantization."
        ), "oom_load", model=ref.label, quant=settings.quant.value)
    model.eval()
    streamer = None
    if streamed:
        _progress(progress, 0.75, f"Page-locking {len(streamed)} offloaded layers for streaming")
        streamer = stream_offloaded_layers(model, streamed, torch.device("cuda", 0))
    tokenizer = prepared.tokenizer
    if model.generation_config.pad_token_id is None and tokenizer.eos_token_id is not None:
        model.generation_config.pad_token_id = tokenizer.eos_token_id
    fast = None
    if settings.quant is Quant.INT4:
        from .kernels.int4 import quantize_model

        failure = None
        try:
            quantize_model(model, torch.device("cuda", 0), lambda f, m: _progress(progress, 0.6 + 0.15 * f, m))
            fast = _attach_fast_decoder(model, settings.context_tokens, shape, progress, cache_dir)
        except torch.OutOfMemoryError:
            failure = "Out of GPU memory while preparing the fast decoder"
        except RuntimeError as e:  # torch.compile / graph capture failed on this GPU or driver
            failure = f"The fast decoder could not be compiled ({_first_line(e)})"
        if failure:
            del model
            free_cuda_memory()
            raise ModelLoadError(f"{failure} of {ref.label}. Lower the context length, or pick 4bit (bitsandbytes).")
    _progress(progress, 1.0, "Loaded")
    split: dict = {"gpu": plan.gpu_layers, "cpu": plan.cpu_layers, "disk": plan.disk_layers}
    if plan.gpu_layers_per_device:
        split["gpus"] = tuple(n for i, n in enumerate(plan.gpu_layers_per_device) if n or i == 0)
    per_gpu = tuple(weights_on_device_bytes(model, f"cuda:{d}") for d in range(len(plan.gpu_layers_per_device)))
    return LoadedModel(
        ref=ref, model=model, tokenizer=tokenizer, shape=shape, settings=settings, dtype=dtype,
        device=device, plan=plan, load_seconds=time.perf_counter() - prepared.started,
        weights_bytes=weights_on_device_bytes(model, device), split=split,
        fast=fast, compile_seconds=fast.compile_seconds if fast else 0.0, streamer=streamer,
        weights_bytes_per_device=per_gpu,
    )


def load_model(
    ref: ModelRef,
    settings: LoadSettings,
    budget: Budget,
    progress: ProgressFn | None = None,
) -> LoadedModel:
    """Resolve, plan under `budget`, and load `ref`; raise ModelLoadError/ModelSourceError on failure."""
    return load_prepared(prepare_load(ref, settings, budget, progress), progress)


def free_cuda_memory() -> None:
    """Return freed tensors to the driver so the VRAM panel (and other apps) see it free."""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
        # cuBLAS keeps a workspace per handle in torch's pool; without this it would show as
        # memory left behind after a model is unloaded.
        torch._C._cuda_clearCublasWorkspaces()
        torch.cuda.empty_cache()


__all__ = ["GiB", "LoadSettings", "LoadedModel", "ModelLoadError", "NoChatTemplateError", "PreparedLoad", "load_model",
           "load_prepared", "plan_for", "prepare_load"]
