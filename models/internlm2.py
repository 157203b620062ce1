"""Load InternLM2 / InternLM2.5 checkpoints as native Llama models, without remote code.

transformers 5 has no InternLM2 class and the hub's `trust_remote_code` modeling files no
longer run on it. But InternLM2 *is* Llama: the weights are renamed, and q/k/v are fused
into one `wqkv` matrix whose rows are grouped per KV head. So we rewrite the checkpoint
once into a plain Llama folder (config, safetensors shards, tokenizer.json, generation
config) and load that with the stock LlamaForCausalLM, which every quantization and
device-map path already supports.

The rewrite streams one source shard at a time (a 7B model never has to fit in RAM twice),
goes to a temporary sibling folder renamed into place only when complete, and carries a
marker with a fingerprint of the source, so a half-written or stale cache is redone,
never loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable

from .cache_folders import move_into_place
from .internlm2_tokenizer import build_tokenizer
from .internlm2_weights import (
    WEIGHT_SUFFIXES, checkpoint_shape, convert_tensor, expected_shapes, iter_tensors, read_config, rope_parameters, weight_files,
)
from .sources import CheckpointError

ProgressFn = Callable[[float, str], None]

FORMAT_VERSION = 1  # bump when the converted layout changes, so old caches are redone
MARKER = "internlm2-conversion.json"
FLUSH_BYTES = 512 * 1024**2  # converted tensors held in RAM before they are written out
_FINGERPRINT_SUFFIXES = (".json", ".model", ".jinja") + WEIGHT_SUFFIXES


def is_internlm2_folder(folder: str | Path) -> bool:
    """True when `folder/config.json` declares `model_type: internlm2`."""
    try:
        return json.loads((Path(folder) / "config.json").read_text()).get("model_type") == "internlm2"
    except (OSError, ValueError, AttributeError):
        return False


# ---------------------------------------------------------------- conversion


def _fingerprint(src: Path, chat_template: str | None) -> str:
    """A hash of the source files' names, sizes and mtimes (and the fallback template)."""
    if not src.is_dir():
        raise CheckpointError(f"{src} is not a folder; point at the folder that holds the InternLM2 checkpoint.")
    h = hashlib.sha256(f"v{FORMAT_VERSION}\n{chat_template or ''}\n".encode())
    for path in sorted(src.iterdir()):
        if path.suffix in _FINGERPRINT_SUFFIXES and path.is_file():
            st = path.stat()
            h.update(f"{path.name}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _fsync(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _is_complete(folder: Path, fingerprint: str) -> bool:
    """True when `folder` is a finished conversion of the source with `fingerprint`, every file intact."""
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False
    if marker.get("format_version") != FORMAT_VERSION or marker.get("fingerprint") != fingerprint:
        return False
    files = marker.get("files") or {}
    # Sizes catch deleted and truncated files without re-reading gigabytes on every load.
    return bool(files) and all((folder / n).is_file() and (folder / n).stat().st_size == size
                               for n, size in files.items())


def _write_generation_config(src: Path, dst: Path, config) -> None:
    from transformers import GenerationConfig

    path = src / "generation_config.json"
    values = json.loads(path.read_text()) if path.is_file() else {}
    values.pop("transformers_version", None)
    # Chat turns end with <|im_end|>; keep the original eos too so base models still stop.
    old = values.get("eos_token_id", [])
    old = old if isinstance(old, list) else [old]
    values["eos_token_id"] = [config.eos_token_id] + [i for i in old if i != config.eos_token_id]
    values.setdefault("bos_token_id", config.bos_token_id)
    values.setdefault("pad_token_id", config.pad_token_id)
    GenerationConfig(**values).save_pretrained(dst)


def convert_internlm2(src: str | Path, dst: str | Path, progress: ProgressFn | None = None,
                      chat_template: str | None = None) -> Path:
    """Rewrite the InternLM2 checkpoint in `src` as a Llama checkpoint folder at `dst`, atomically."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    src, dst = Path(src).resolve(), Path(dst).resolve()
    cfg = read_config(src)
    shape = checkpoint_shape(cfg)
    rope = rope_parameters(cfg)
    files = weight_files(src)
    tokenizer = build_tokenizer(src, chat_template)  # fails fast on a bad tokenizer, before any heavy work
    fingerprint = _fingerprint(src, chat_template)

    shapes = expected_shapes(shape)
    required = {n for n in shapes if not (shape.tied and n == "output.weight")}
    tmp = dst.parent / f".{dst.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        weight_map, seen, total = {}, set(), 0
        for i, path in enumerate(files):
            if progress:
                progress(i / len(files), f"Converting InternLM2 weights: shard {i + 1}/{len(files)}")
            out, out_bytes, part = {}, 0, 0

            def flush() -> None:
                nonlocal out, out_bytes, part, total
                if not out:
                    return
                suffix = f".part{part}" if part else ""
                shard = f"model-{i + 1:05d}-of-{len(files):05d}{suffix}.safetensors"
                save_file(out, tmp / shard, metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(out, shard))
                total += out_bytes
                out, out_bytes, part = {}, 0, part + 1

            for name, tensor in iter_tensors(path):
                for new, converted in convert_tensor(name, tensor, shapes, shape, path.name):
                    out[new] = converted
                    out_bytes += converted.numel() * converted.element_size()
                seen.add(name)
                del tensor  # drop the source tensor as soon as it is converted
                # save_file copies what it writes, so a big source shard is written in parts:
                # the extra RAM stays near 2 x FLUSH_BYTES whatever the shard size.
                if out_bytes >= FLUSH_BYTES:
                    flush()
            flush()
        missing = sorted(required - seen)
        if missing:
            shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise CheckpointError(f"{src} lacks {len(missing)} tensor(s) an InternLM2 model with this config.json "
                                  f"needs: {shown}. "
                                  "The download is incomplete or config.json belongs to another model.")
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))

        config = LlamaConfig(
            architectures=["LlamaForCausalLM"], vocab_size=shape.vocab, hidden_size=shape.hidden,
            intermediate_size=shape.intermediate, num_hidden_layers=shape.layers,
            num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim,
            hidden_act=cfg.get("hidden_act", "silu"), max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6), rope_parameters=rope, attention_bias=False,
            tie_word_embeddings=shape.tied, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=cfg.get("pad_token_id", tokenizer.pad_token_id),
            dtype=cfg.get("dtype") or cfg.get("torch_dtype"),
        )
        config.save_pretrained(tmp)
        _write_generation_config(src, tmp, config)
        tokenizer.save_pretrained(tmp)

        files_written = sorted(p for p in tmp.iterdir() if p.is_file())
        for path in files_written:  # on disk before the marker claims they are, even after a power cut
            _fsync(path)
        sizes = {p.name: p.stat().st_size for p in files_written}
        marker = {"format_version": FORMAT_VERSION, "fingerprint": fingerprint, "source": str(src), "files": sizes}
        (tmp / MARKER).write_text(json.dumps(marker, indent=2))  # written last: its presence means complete
        _fsync(tmp / MARKER)
        move_into_place(tmp, dst, lambda folder: _is_complete(folder, fingerprint))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if progress:
        progress(1.0, "InternLM2 checkpoint converted")
    return dst


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_leftovers(cache_root: Path, base: str, keep: Path) -> None:
    """Delete earlier conversions of this source (stale fingerprints) and temporary folders
    of conversions whose process died: each can be as large as the model."""
    for path in cache_root.glob(f"*{base}-*"):
        if path == keep or not path.is_dir():
            continue
        if ".tmp-" in path.name:
            try:
                if _pid_alive(int(path.name.split(".tmp-")[1].split("-")[0])):
                    continue  # a conversion in progress in another process
            except ValueError:
                continue
        shutil.rmtree(path, ignore_errors=True)


def ensure_converted(src: str | Path, cache_root: str | Path, progress: ProgressFn | None = None,
                     chat_template: str | None = None) -> Path:
    """The cached Llama conversion of the InternLM2 folder `src`, converting it only when missing, incomplete or stale."""
    src, cache_root = Path(src).resolve(), Path(cache_root)
    fingerprint = _fingerprint(src, chat_template)
    # One name per source path, and a new one whenever the source files change.
    base = f"{src.name}-{hashlib.sha256(str(src).encode()).hexdigest()[:10]}"
    dst = cache_root / f"{base}-{fingerprint[:12]}"
    if _is_complete(dst, fingerprint):
        return dst
    cache_root.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(cache_root, base, keep=dst)
    return convert_internlm2(src, dst, progress, chat_template)
