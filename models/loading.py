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

from . import hardware, int4_store
from .bnb_cpu import keep_unpackable_layers_unpacked
from .catalog import ModelRef, ModelShape
from .integrity import check_safetensors, check_tokenizer_fits
from .memory import Budget, FitPlan, Verdict
from .messages import Message
from .messages import first_line as _first_line
from .offload import LayerStreamer, drop_alignment_hooks, stream_offloaded_layers
from .placement import build_device_map, layers_name, max_memory, plan_for, weights_on_device_bytes
from .quant import Quant, quant_options, storage_dtype
from .settings import LoadSettings, ModelLoadError
from .sources import LocalModel, ModelSourceError, default_cache_dir, resolve_local

if TYPE_CHECKING:
    from .fast_decode import FastDecoder

ProgressFn = Callable[[float, str], None]


def _not_cast_notice(record: logging.LogRecord) -> bool:
    return "inputs will be cast" not in record.getMessage()


# bitsandbytes logs on every 8-bit matmul that it casts bf16 inputs to fp16 (its CPU path);
# the cast is expected, and the line would flood the log once per layer per token.
logging.getLogger("bitsandbytes.autograd._functions").addFilter(_not_cast_notice)
log = logging.getLogger(__name__)
STORE_WRITER_THREAD = "int4-store"  # the thread writing a freshly quantized model to the int4 store


class NoChatTemplateError(ModelLoadError):
    """The tokenizer has no chat template, so there is no correct way to format a chat."""


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
    int4_stored: bool = False  # the int4 weights came from an earlier load's store (models/int4_store.py)

    @property
    def input_device(self) -> torch.device:
        """Where input ids must go (the embedding's device)."""
        return self.model.get_input_embeddings().weight.device


def _progress(progress: ProgressFn | None, fraction: float, message: str) -> None:
    if progress:
        progress(fraction, message)


def _torch_dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


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
                         progress: ProgressFn | None, cache_dir: Path, precompiling: list):
    """A FastDecoder with its cache sized to the context and its uncompiled step captured now, once
    the int4 kernels `precompiling` (int4.start_precompile) are built; the compiled step follows in
    the background (FastDecoder.start_background_compile)."""
    from . import compile_cache
    from .fast_decode import FastDecoder
    from .kernels import int4_precompile
    from .kernels.gemv_tiles import choose_tiles

    _progress(progress, 0.8, "Choosing the int4 GEMV tiles (timed on a first load of these shapes on this GPU)")
    fast = FastDecoder(model, max_context=min(context_tokens, shape.max_context), compile_cache_dir=cache_dir)
    waited = time.perf_counter()
    int4_precompile.wait_precompiled(precompiling)
    fast.phases["precompile_wait_s"] = time.perf_counter() - waited
    timing = time.perf_counter()
    fast.gemv_tiles = choose_tiles(model, compile_cache.cache_folder(cache_dir) if cache_dir is not None else None)
    fast.phases["gemv_tiles_s"] = time.perf_counter() - timing
    _progress(progress, 0.85, "Capturing the decode step")
    seconds = fast.warm_up()
    fast.start_background_compile()
    _progress(progress, 0.95, f"Decode step captured in {seconds:.1f} s; compiling it in the background")
    return fast


def _int4_key(local: LocalModel) -> str | None:
    """int4_store's key of a checkpoint: its folder, or a hub repo's snapshot in the hub's cache (not fetched)."""
    location = local.location
    if local.hub:
        from huggingface_hub import snapshot_download

        try:
            location = snapshot_download(location, local_files_only=True)
        except Exception:  # noqa: BLE001 - not cached (or no such repo): nothing stored under it either
            return None
    return int4_store.store_key(location)


def _stored_int4(prepared: "PreparedLoad", cache_dir: Path, key: str, progress: ProgressFn | None):
    """The int4 model stored at an earlier load of this checkpoint (models/int4_store.py), on the GPU; or None."""
    from transformers import GenerationConfig

    from .fused_projections import fuse_projections

    if not (int4_store.store_root(cache_dir) / key).is_dir():
        return None
    _progress(progress, 0.35, "Loading the int4 weights stored at an earlier load")
    model = int4_store.load(cache_dir, key, prepared.config, torch.device("cuda", 0),
                            prepared.settings.trust_remote_code, prepare=fuse_projections)
    if model is not None:
        try:
            model.generation_config = GenerationConfig.from_pretrained(prepared.local.location)
        except OSError:  # no generation_config.json: what from_pretrained derives from the config
            model.generation_config = GenerationConfig.from_model_config(prepared.config)
    return model


def _keep_int4(model: torch.nn.Module, cache_dir: Path, key: str) -> None:
    """Store the freshly quantized `model` for the next load: copied to RAM now, written to disk in a
    thread (the load does not wait). Skipped, and logged, where the disk lacks room; a failed write is
    logged and leaves no entry."""
    import threading

    need = int4_store.stored_bytes(model)
    if hardware.disk_free(int4_store.store_root(cache_dir)) < need + (1 << 30):
        log.info("not storing the int4 weights (%.1f GB): not enough free disk", need / 1e9)
        return
    snap = int4_store.snapshot(model)

    def write() -> None:
        try:
            int4_store.write(snap, cache_dir, key)
        except OSError:
            log.warning("storing the int4 weights failed; the next load quantizes again", exc_info=True)
    threading.Thread(target=write, name=STORE_WRITER_THREAD, daemon=True).start()


def _load_config(local: LocalModel, trust_remote_code: bool):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(local.location, trust_remote_code=trust_remote_code)
    except OSError as e:
        if local.hub:
            raise ModelSourceError("hub_unreachable", repo=local.location, detail=_first_line(e)) from None
        raise ModelSourceError("config_unreadable", location=local.location, detail=_first_line(e)) from None
    except ValueError as e:
        # transformers says "model type X is not recognized" for architectures it lacks.
        hint = "" if trust_remote_code else Message("trust_hint")
        raise ModelLoadError("cannot_build", detail=_first_line(e), hint=hint) from None


def _check_chat_template(tokenizer, location: str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise NoChatTemplateError("no_chat_template", location=location)


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
    if not plan.verdict.loadable:
        raise ModelLoadError(plan.reason.code, **plan.reason.params)
    if settings.quant is Quant.INT4 and plan.verdict is not Verdict.GPU:
        raise ModelLoadError("int4_needs_gpu", plan=plan.reason)


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
        raise ModelLoadError("quant_unavailable", reason=offered[settings.quant].why)
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
        raise ModelSourceError("tokenizer_unreadable", location=local.location, detail=_first_line(e)) from None
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
        layers = layers_name(meta, shape.num_layers)
        kwargs["device_map"] = build_device_map(meta, plan, shape.num_layers)
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

    int4_key = _int4_key(prepared.local) if settings.quant is Quant.INT4 else None
    # Out-of-memory cleanup happens after the except block: inside it, the exception's
    # traceback still holds the frames (and the half-loaded tensors) we want to free.
    out_of_memory = False
    try:
        stored = _stored_int4(prepared, cache_dir, int4_key, progress) if int4_key else None
        if stored is None:
            _progress(progress, 0.35, f"Loading weights ({settings.quant.value}, {plan.message})")
        from_store = stored is not None
        model = stored if from_store else AutoModelForCausalLM.from_pretrained(prepared.local.location, **kwargs)
        del stored  # `model` is the only reference: a failure below must be able to free it
    except torch.OutOfMemoryError:
        out_of_memory = True
    except (OSError, SafetensorError) as e:  # a file damaged after prepare_load checked it
        raise ModelSourceError("weights_unreadable", location=prepared.local.location, detail=_first_line(e)) from None
    if out_of_memory:
        free_cuda_memory()
        raise ModelLoadError("oom_load", model=ref.label, quant=settings.quant.value)
    model.eval()
    if settings.quant is Quant.NF4:
        keep_unpackable_layers_unpacked(model)  # odd shapes on AVX512-BF16 CPUs (models/bnb_cpu.py)
    streamer = None
    if streamed:
        _progress(progress, 0.75, f"Page-locking {len(streamed)} offloaded layers for streaming")
        streamer = stream_offloaded_layers(model, streamed, torch.device("cuda", 0))
        drop_alignment_hooks(model, "cuda")
    tokenizer = prepared.tokenizer
    if model.generation_config.pad_token_id is None and tokenizer.eos_token_id is not None:
        model.generation_config.pad_token_id = tokenizer.eos_token_id
    fast = None
    if settings.quant is Quant.INT4:
        from . import compile_cache
        from .fused_projections import fuse_projections
        from .kernels.int4 import quantize_model, start_precompile

        failure = None
        try:
            compile_cache.configure(cache_dir)  # before the first Triton compile: kernels and tuned tiles persist
            if not from_store:
                fuse_projections(model)  # q/k/v and gate/up as one GEMV each (fused before quantizing: exact)
                precompiling = start_precompile(model)  # the kernels compile while the weights are quantized
                quantize_model(model, torch.device("cuda", 0), lambda f, m: _progress(progress, 0.6 + 0.15 * f, m))
            else:
                precompiling = start_precompile(model)
            fast = _attach_fast_decoder(model, settings.context_tokens, shape, progress, cache_dir, precompiling)
            int4_key = int4_key or _int4_key(prepared.local)  # a hub model is in the hub's cache now
            if int4_key and not from_store:  # kept for the next load (after the warm-up: ready does not wait)
                _keep_int4(model, cache_dir, int4_key)
        except torch.OutOfMemoryError:
            failure = ModelLoadError("fast_decoder_oom", model=ref.label)
        except RuntimeError as e:  # torch.compile / graph capture failed on this GPU or driver
            failure = ModelLoadError("fast_decoder_failed", model=ref.label, detail=_first_line(e))
        if failure:
            del model
            free_cuda_memory()
            raise failure
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
        weights_bytes_per_device=per_gpu, int4_stored=from_store,
    )


def free_cuda_memory() -> None:
    """Return freed tensors to the driver so the VRAM panel (and other apps) see it free."""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
        # cuBLAS keeps a workspace per handle in torch's pool; without this it would show as
        # memory left behind after a model is unloaded.
        torch._C._cuda_clearCublasWorkspaces()
        torch.cuda.empty_cache()


__all__ = ["LoadSettings", "LoadedModel", "ModelLoadError", "NoChatTemplateError", "PreparedLoad", "load_prepared",
           "plan_for", "prepare_load"]
