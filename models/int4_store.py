"""A model's int4 weights kept on disk, so a later load of the same checkpoint skips quantizing it.

Why: an int4 load reads the full-precision checkpoint into RAM (a 7B: 15 GB of bf16), fuses its
projections and quantizes every linear layer on the GPU. That was 10.7 s of the 7B's 15.9 s to full
speed on a second load on the H200 (BENCHMARKS.md, session 23), and it needs the whole bf16 model
in CPU RAM each time. The stored int4 model is a quarter of those bytes and goes straight to the GPU.

What is stored: every parameter and buffer of the quantized model (the packed weights, scales and
offsets, embeddings, norms, and the non-persistent buffers such as the rotary frequencies), one
safetensors file, with a manifest of which modules are Int4Linear. A stored model is rebuilt on
the meta device from its config, fused and given Int4Linear shells the same way, then filled.

Keyed by the checkpoint's files (names, sizes, modification times), the format version and the
torch version, so a changed checkpoint or a new format never loads stale weights. A folder is
complete only once its manifest is written last (a crash mid-write leaves no usable entry), and
an entry that fails to load is deleted and the load quantizes again: never a crash.

Only the KEEP_ENTRIES most recently used entries are kept: a key never matches again once the
checkpoint or torch changes, so without a bound every upgrade would leave gigabytes behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
import uuid
from pathlib import Path

import torch

from .cache_folders import move_into_place
from .cache_report import folder_bytes
from .kernels.int4 import GROUP, Int4Linear, share_workspace

log = logging.getLogger(__name__)

FORMAT = 2  # bump when the packed layout or what is stored changes (2: gate/up rows interleaved)
WEIGHTS, MANIFEST = "weights.safetensors", "manifest.json"
STALE_PARTIAL_S = 3600  # an unfinished write this old was cut short (a write takes seconds)
# A user comparing sizes switches between two or three int4 models; a 7B's entry is ~4.5 GB.
KEEP_ENTRIES = 4


def store_root(cache_dir: Path) -> Path:
    """The folder every stored int4 model lives under."""
    return Path(cache_dir) / "int4"


def store_key(location: str | Path) -> str | None:
    """The name of `location`'s stored int4 model: a hash of its weight and config files' names, sizes and
    modification times, the format and torch's version. None where it is not a local folder of weights."""
    folder = Path(location)
    if not folder.is_dir():
        return None
    files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".json") and p.is_file())
    if not any(p.suffix in (".safetensors", ".bin") for p in files):
        return None
    digest = hashlib.sha256(f"format {FORMAT} group {GROUP} torch {torch.__version__}".encode())
    for p in files:
        stat = p.stat()
        digest.update(f"{p.name} {stat.st_size} {stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:24]


def size_bytes(cache_dir: Path) -> int:
    """Bytes the stored int4 models take on disk."""
    return folder_bytes(store_root(cache_dir))


def stored_bytes(model: torch.nn.Module) -> int:
    """Bytes `model`'s stored form takes (every distinct parameter and buffer)."""
    return sum(t.numel() * t.element_size() for t in _tensors(model)[0].values())


def snapshot(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    """The quantized `model`'s tensors copied to the CPU, and its manifest: what `write` stores. (Taken
    before a background write, so that the write holds no GPU memory after the model is unloaded.)"""
    tensors, aliases = _tensors(model)
    dtype = str(model.get_input_embeddings().weight.dtype).removeprefix("torch.")  # the activations' dtype
    manifest = {"format": FORMAT, "dtype": dtype, "aliases": aliases,
                "int4": {name: {"in_features": m.in_features, "out_features": m.out_features,
                                "bias": m.bias is not None}
                         for name, m in model.named_modules() if isinstance(m, Int4Linear)}}
    return {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}, manifest


def write(snap: tuple[dict[str, torch.Tensor], dict], cache_dir: Path, key: str) -> Path:
    """Store a snapshot under `key`; its folder. Written into a temporary folder and renamed, the
    manifest last, so a reader never sees half an entry."""
    from safetensors.torch import save_file

    tensors, manifest = snap
    final = store_root(cache_dir) / key
    for stale in store_root(cache_dir).glob(f".{key}.*.partial"):  # a write cut short (the app was closed)
        if time.time() - stale.stat().st_mtime > STALE_PARTIAL_S:
            shutil.rmtree(stale, ignore_errors=True)
    partial = store_root(cache_dir) / f".{key}.{uuid.uuid4().hex}.partial"
    partial.mkdir(parents=True)
    try:
        save_file(tensors, partial / WEIGHTS, metadata={"format": str(FORMAT)})
        (partial / MANIFEST).write_text(json.dumps(manifest))
        # Another app process storing the same checkpoint may have finished first; its entry is the same
        # weights and may be loading now, so it is kept.
        move_into_place(partial, final, lambda folder: (folder / MANIFEST).is_file())
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    prune(cache_dir, KEEP_ENTRIES)
    return final


def prune(cache_dir: Path, keep: int) -> list[str]:
    """Delete all but the `keep` most recently used entries (a load or a write marks an entry used);
    the keys deleted. A folder without a manifest (damaged) counts as the least recently used."""
    entries = [p for p in store_root(cache_dir).glob("*") if p.is_dir() and not p.name.startswith(".")]

    def last_used(folder: Path) -> float:
        try:
            return (folder / MANIFEST).stat().st_mtime
        except OSError:
            return float("-inf")
    gone = sorted(entries, key=last_used, reverse=True)[keep:]
    for folder in gone:
        log.info("removing the int4 weights stored in %s: only the %d most recently used are kept", folder, keep)
        shutil.rmtree(folder, ignore_errors=True)
    return [folder.name for folder in gone]


def save(model: torch.nn.Module, cache_dir: Path, key: str) -> Path:
    """Store the quantized `model` under `key` (snapshot, then write); its folder."""
    return write(snapshot(model), cache_dir, key)


def load(cache_dir: Path, key: str, config, device: torch.device, trust_remote_code: bool = False,
         prepare=None) -> torch.nn.Module | None:
    """The model stored under `key`, rebuilt from `config` with its tensors on `device`; None if there is
    none. `prepare(model)` redoes, on the meta model, what was done before quantizing (fusing the
    projections). A damaged or mismatched entry is logged, deleted and reported as None; running out
    of GPU memory is raised, as loading the checkpoint would."""
    folder = store_root(cache_dir) / key
    if not (folder / MANIFEST).is_file():
        return None
    try:
        model = _load(folder, config, device, trust_remote_code, prepare)
        (folder / MANIFEST).touch()  # used now: prune keeps the most recently used entries
        return model
    except torch.OutOfMemoryError:  # not the entry's fault: the caller says the model does not fit
        raise
    except Exception:  # noqa: BLE001 - a stored entry must never fail a load: quantize again instead
        log.warning("the stored int4 weights in %s could not be loaded; quantizing again", folder, exc_info=True)
        shutil.rmtree(folder, ignore_errors=True)
        return None


def _load(folder: Path, config, device: torch.device, trust_remote_code: bool, prepare) -> torch.nn.Module:
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    manifest = json.loads((folder / MANIFEST).read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"stored format {manifest.get('format')}, expected {FORMAT}")
    with torch.device("meta"):
        # in the dtype the stored model ran in (from_pretrained's dtype=, which its config then says)
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code,
                                                 dtype=getattr(torch, manifest["dtype"]))
    if prepare is not None:
        prepare(model)
    for name, spec in manifest["int4"].items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        with torch.device("meta"):
            shell = Int4Linear(torch.empty(0, spec["out_features"], dtype=torch.int32), torch.empty(0),
                               torch.empty(0), spec["in_features"], torch.empty(0) if spec["bias"] else None)
        setattr(parent, child, shell)
    expected = {name for name, _ in _named_tensors(model)}
    with safe_open(str(folder / WEIGHTS), framework="pt", device=str(device)) as f:
        stored = set(f.keys()) | set(manifest["aliases"])
        if stored != expected:
            raise ValueError(f"stored tensors differ from the model's: {sorted(stored ^ expected)[:5]}")
        for name in f.keys():
            _assign(model, name, f.get_tensor(name))
    for alias, name in manifest["aliases"].items():  # tied weights: the same tensor under both names
        _assign(model, alias, _get(model, name))
    for module_name, module in model.named_modules():  # a tensor kept outside parameters and buffers
        for attr, value in vars(module).items():
            if isinstance(value, torch.Tensor) and value.is_meta:
                raise ValueError(f"{module_name}.{attr} is not stored")
    model.eval()
    share_workspace(model)
    return model


def _named_tensors(model: torch.nn.Module):
    yield from model.named_parameters(remove_duplicate=False)
    yield from model.named_buffers(remove_duplicate=False)


def _tensors(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Distinct tensors by their first name, and every further name of an already named tensor (tied weights)."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first_name: dict[int, str] = {}
    for name, t in _named_tensors(model):
        if t is None:
            continue
        if id(t) in first_name:
            aliases[name] = first_name[id(t)]
        else:
            first_name[id(t)] = name
            tensors[name] = t
    return tensors, aliases


def _get(model: torch.nn.Module, name: str) -> torch.Tensor:
    owner, _, attr = name.rpartition(".")
    return getattr(model.get_submodule(owner) if owner else model, attr)


def _assign(model: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Put `tensor` in place of the parameter or buffer `name` (as a parameter where that was one)."""
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    if attr in owner._parameters:
        owner._parameters[attr] = tensor if isinstance(tensor, torch.nn.Parameter) else \
            torch.nn.Parameter(tensor, requires_grad=False)
    elif attr in owner._buffers:
        owner._buffers[attr] = tensor
    else:
        raise ValueError(f"the model has no parameter or buffer {name}")
