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
import struct
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

ProgressFn = Callable[[float, str], None]

FORMAT_VERSION = 1  # bump when the converted layout changes, so old caches are redone
MARKER = "internlm2-conversion.json"
FLUSH_BYTES = 512 * 1024**2  # converted tensors held in RAM before they are written out
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# InternLM2's own chat format (ChatML with a leading BOS), for folders that ship no template;
# the catalog's InternLM2 entries name the same file.
CHATML_TEMPLATE = (Path(__file__).parent / "chat_templates" / "internlm2.jinja").read_text(encoding="utf-8")
_WEIGHT_SUFFIXES = (".safetensors", ".bin")
_FINGERPRINT_SUFFIXES = (".json", ".model", ".jinja") + _WEIGHT_SUFFIXES
_ROPE_TYPES = ("linear", "dynamic")  # the only scalings InternLM2's modeling code implements


class CheckpointError(ValueError):
    """The InternLM2 checkpoint cannot be converted; the message says what is wrong and how to fix it."""


def is_internlm2_folder(folder: str | Path) -> bool:
    """True when `folder/config.json` declares `model_type: internlm2`."""
    try:
        return json.loads((Path(folder) / "config.json").read_text()).get("model_type") == "internlm2"
    except (OSError, ValueError, AttributeError):
        return False


# ---------------------------------------------------------------- config and shapes


@dataclass(frozen=True)
class _Shape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool

    @property
    def head_dim(self) -> int:
        """Size of one attention head."""
        return self.hidden // self.heads

    @property
    def q_per_kv(self) -> int:
        """Query heads per key/value head (the GQA group size)."""
        return self.heads // self.kv_heads


def _read_config(src: Path) -> dict:
    path = src / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{src} has no config.json; point at the folder that holds the checkpoint.")
    cfg = json.loads(path.read_text())
    if cfg.get("model_type") != "internlm2":
        raise CheckpointError(f"{path} says model_type {cfg.get('model_type')!r}, not 'internlm2'.")
    if cfg.get("bias"):
        # Llama's attention_bias would also need o_proj/k/v biases split exactly like wqkv;
        # no released chat model uses biases, so we refuse rather than guess.
        raise CheckpointError(
            f"{path} has bias: true (attention biases), which this converter does not support; "
            "all released InternLM2 chat models use bias: false. Use a bias-free checkpoint."
        )
    return cfg


def _shape(cfg: dict) -> _Shape:
    try:
        heads = cfg["num_attention_heads"]
        shape = _Shape(cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], heads,
                       cfg.get("num_key_value_heads") or heads, cfg["vocab_size"],
                       bool(cfg.get("tie_word_embeddings", False)))
    except KeyError as e:
        raise CheckpointError(f"config.json lacks {e.args[0]!r}; re-download the checkpoint's config.json.") from None
    if shape.hidden % shape.heads or shape.heads % shape.kv_heads:
        raise CheckpointError(f"config.json is inconsistent: hidden_size {shape.hidden}, "
                              f"{shape.heads} heads, {shape.kv_heads} KV heads do not divide evenly.")
    return shape


def internlm2_shape(cfg: dict):
    """The memory-planning ModelShape of an InternLM2 config.json (before any conversion)."""
    from .catalog import ModelShape

    s = _shape(cfg)
    return ModelShape(hidden_size=s.hidden, num_layers=s.layers, num_heads=s.heads, num_kv_heads=s.kv_heads,
                      vocab_size=s.vocab, intermediate_size=s.intermediate,
                      max_context=int(cfg.get("max_position_embeddings") or 32768), tie_word_embeddings=s.tied)


def _rope_parameters(cfg: dict) -> dict:
    """InternLM2's `rope_theta` + `rope_scaling` in transformers 5's single `rope_parameters` dict."""
    params = {"rope_type": "default", "rope_theta": float(cfg.get("rope_theta", 10000.0))}
    scaling = cfg.get("rope_scaling")
    if scaling:
        kind = scaling.get("type") or scaling.get("rope_type")
        if kind not in _ROPE_TYPES:
            raise CheckpointError(f"config.json has rope_scaling type {kind!r}; supported: {', '.join(_ROPE_TYPES)}. "
                                  "Remove rope_scaling (losing long context) or use a supported type.")
        params.update(rope_type=kind, factor=float(scaling["factor"]))
    return params


def _expected_shapes(s: _Shape) -> dict[str, tuple[int, ...]]:
    """Every InternLM2 tensor name with the shape config.json implies."""
    qkv_rows = s.kv_heads * (s.q_per_kv + 2) * s.head_dim
    shapes = {"model.tok_embeddings.weight": (s.vocab, s.hidden), "model.norm.weight": (s.hidden,),
              "output.weight": (s.vocab, s.hidden)}
    for i in range(s.layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "attention.wqkv.weight": (qkv_rows, s.hidden),
            p + "attention.wo.weight": (s.hidden, s.heads * s.head_dim),
            p + "feed_forward.w1.weight": (s.intermediate, s.hidden),
            p + "feed_forward.w3.weight": (s.intermediate, s.hidden),
            p + "feed_forward.w2.weight": (s.hidden, s.intermediate),
            p + "attention_norm.weight": (s.hidden,),
            p + "ffn_norm.weight": (s.hidden,),
        })
    return shapes


_RENAMES = (  # (InternLM2 name part, Llama name part)
    ("model.tok_embeddings.", "model.embed_tokens."),
    (".attention.wo.", ".self_attn.o_proj."),
    (".feed_forward.w1.", ".mlp.gate_proj."),
    (".feed_forward.w3.", ".mlp.up_proj."),
    (".feed_forward.w2.", ".mlp.down_proj."),
    (".attention_norm.", ".input_layernorm."),
    (".ffn_norm.", ".post_attention_layernorm."),
)


def _llama_name(name: str) -> str:
    if name == "output.weight":
        return "lm_head.weight"
    for old, new in _RENAMES:
        name = name.replace(old, new)
    return name


def split_wqkv(wqkv: torch.Tensor, num_heads: int, num_kv_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split InternLM2's fused `wqkv` weight into Llama's q_proj, k_proj, v_proj weights."""
    q_per_kv = num_heads // num_kv_heads
    head_dim = wqkv.shape[0] // (num_kv_heads * (q_per_kv + 2))
    # Rows are grouped per KV head: its q_per_kv query heads, then its key head, then its value head.
    grouped = wqkv.reshape(num_kv_heads, q_per_kv + 2, head_dim, wqkv.shape[-1])
    # clone(): safetensors refuses tensors that share storage, and views would pin the fused tensor.
    q = grouped[:, :q_per_kv].reshape(num_heads * head_dim, -1).clone()
    k = grouped[:, -2].reshape(num_kv_heads * head_dim, -1).clone()
    v = grouped[:, -1].reshape(num_kv_heads * head_dim, -1).clone()
    return q, k, v


def _convert_tensor(name: str, tensor: torch.Tensor, shapes: dict, s: _Shape, file: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Llama (name, tensor) pairs for one InternLM2 tensor, after checking its shape against config.json."""
    if name.endswith("rotary_emb.inv_freq"):
        return  # a cached buffer some old .bin files carry; Llama recomputes it
    if name not in shapes:
        raise CheckpointError(f"unexpected tensor {name!r} in {file}: not part of an InternLM2 model with "
                              f"{s.layers} layers. Is config.json from a different checkpoint?")
    if tuple(tensor.shape) != shapes[name]:
        raise CheckpointError(f"tensor {name!r} in {file} has shape {tuple(tensor.shape)}, expected {shapes[name]} "
                              f"from config.json (hidden_size {s.hidden}, {s.heads} heads, {s.kv_heads} KV heads, "
                              f"intermediate_size {s.intermediate}, vocab_size {s.vocab}). The weights and config.json "
                              "do not match: re-download the checkpoint.")
    if name.endswith(".attention.wqkv.weight"):
        prefix = name[: -len("attention.wqkv.weight")] + "self_attn."
        q, k, v = split_wqkv(tensor, s.heads, s.kv_heads)
        yield from ((prefix + "q_proj.weight", q), (prefix + "k_proj.weight", k), (prefix + "v_proj.weight", v))
    else:
        yield _llama_name(name), tensor.contiguous().clone()


# ---------------------------------------------------------------- weight files


def _weight_files(src: Path) -> list[Path]:
    """The checkpoint's weight files in order, preferring safetensors over .bin."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = src / index_name
        if index.is_file():
            names = dict.fromkeys(json.loads(index.read_text())["weight_map"].values())
            missing = [n for n in names if not (src / n).is_file()]
            if missing:
                raise CheckpointError(f"{index_name} lists {', '.join(missing)}, missing from {src}; "
                                      "the download is incomplete: download those files again.")
            return [src / n for n in names]
    for pattern in ("*.safetensors", "pytorch_model*.bin"):
        files = sorted(src.glob(pattern))
        if files:
            return files
    raise CheckpointError(f"{src} has no weight files (*.safetensors or pytorch_model*.bin); "
                          "the download is incomplete: download the weights too.")


def _iter_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of one weight file, read one tensor at a time where the format allows."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
        return
    try:  # mmap keeps a .bin shard on disk instead of in RAM; only zip-format files support it
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:
        state = torch.load(path, map_location="cpu", weights_only=True)
    yield from state.items()


# ---------------------------------------------------------------- tokenizer


def _protobuf_fields(buf: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) pairs of a protobuf message: enough to read a sentencepiece model
    without the `protobuf` package, which transformers would otherwise need for this."""

    def varint(pos: int) -> tuple[int, int]:
        value = shift = 0
        while True:
            byte = buf[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                return value, pos
            shift += 7

    pos = 0
    while pos < len(buf):
        key, pos = varint(pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = varint(pos)
        elif wire == 2:
            size, pos = varint(pos)
            value, pos = buf[pos:pos + size], pos + size
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, pos = buf[pos:pos + size], pos + size
        else:
            raise CheckpointError(f"tokenizer.model is not a sentencepiece model (protobuf wire type {wire}).")
        yield field, value


@dataclass
class _SentencePiece:
    pieces: list[tuple[str, float, int]]  # (piece, score, type: 1 normal, 2 unknown, 3 control, 4 user, 6 byte)
    is_bpe: bool
    add_dummy_prefix: bool


def _read_sentencepiece(path: Path) -> _SentencePiece:
    pieces, model_type, dummy_prefix = [], 1, True  # protobuf defaults: unigram, dummy prefix on
    for field, value in _protobuf_fields(path.read_bytes()):
        if field == 1:  # ModelProto.pieces
            piece, score, kind = "", 0.0, 1
            for f, v in _protobuf_fields(value):
                if f == 1:
                    piece = v.decode("utf-8")
                elif f == 2:
                    score = struct.unpack("<f", v)[0]
                elif f == 3:
                    kind = v
            pieces.append((piece, score, kind))
        elif field == 2:  # trainer_spec.model_type
            model_type = dict(_protobuf_fields(value)).get(3, model_type)
        elif field == 3:  # normalizer_spec.add_dummy_prefix
            dummy_prefix = bool(dict(_protobuf_fields(value)).get(3, dummy_prefix))
    return _SentencePiece(pieces, model_type == 2, dummy_prefix)


def _token_text(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def _source_chat_template(src: Path, tok_cfg: dict) -> str | None:
    template = tok_cfg.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if not template and (src / "chat_template.jinja").is_file():
        template = (src / "chat_template.jinja").read_text()
    return template or None


def _build_tokenizer(src: Path, chat_template: str | None):
    """A fast tokenizer equivalent to InternLM2's own InternLM2TokenizerFast, but with
    `<|im_end|>` as eos and a chat template, built straight from tokenizer.model."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    model_path = src / "tokenizer.model"
    if not model_path.is_file():
        raise CheckpointError(f"{src} has no tokenizer.model (InternLM2's sentencepiece tokenizer); "
                              "download tokenizer.model from the same repository as the weights.")
    sp = _read_sentencepiece(model_path)
    if not sp.is_bpe or not sp.pieces:
        raise CheckpointError(f"{model_path} is not a sentencepiece BPE model, as InternLM2's tokenizer is.")
    tok_cfg_path = src / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text()) if tok_cfg_path.is_file() else {}

    # Like InternLM2's converter: tokens named in added_tokens_decoder replace the piece at their id.
    pieces = [p for p, _, _ in sp.pieces]
    special_ids = {i for i, (_, _, kind) in enumerate(sp.pieces) if kind in (2, 3, 4)}
    for token_id, token in (tok_cfg.get("added_tokens_decoder") or {}).items():
        if int(token_id) < len(pieces):
            pieces[int(token_id)] = _token_text(token)
            special_ids.add(int(token_id))
    vocab = {piece: i for i, piece in enumerate(pieces)}
    unk = next((pieces[i] for i, (_, _, kind) in enumerate(sp.pieces) if kind == 2), "<unk>")
    if IM_END not in vocab or IM_START not in vocab:
        raise CheckpointError(f"{model_path} has no {IM_START}/{IM_END} tokens, so it cannot be an InternLM2 "
                              "chat tokenizer; use the tokenizer.model that came with the weights.")

    # sentencepiece BPE scores rank its merges: a piece with a higher score was merged earlier.
    merges = []
    for piece, score, kind in sp.pieces:
        if kind == 1:
            splits = [(piece[:i], piece[i:], score) for i in range(1, len(piece))
                      if piece[:i] in vocab and piece[i:] in vocab]
            merges += sorted(splits, key=lambda m: (vocab[m[0]], vocab[m[1]]))
    merges.sort(key=lambda m: (-m[2], -len(m[0]), -len(m[1])))
    backend = Tokenizer(BPE(vocab, [(a, b) for a, b, _ in merges], unk_token=unk, fuse_unk=True,
                            byte_fallback=True))
    # sentencepiece marks spaces (and the start of text) with "▁"; undo it when decoding.
    prefix = [normalizers.Prepend("▁")] if sp.add_dummy_prefix else []
    backend.normalizer = normalizers.Sequence(prefix + [normalizers.Replace(" ", "▁")])
    strip = [decoders.Strip(" ", 1, 0)] if sp.add_dummy_prefix else []
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()] + strip)
    backend.add_special_tokens([AddedToken(pieces[i], special=True, normalized=False) for i in sorted(special_ids)])

    bos = _token_text(tok_cfg.get("bos_token")) or "<s>"
    if tok_cfg.get("add_bos_token", True):  # InternLM2 prepends BOS to every encoded text
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=bos, eos_token=IM_END,
        unk_token=_token_text(tok_cfg.get("unk_token")) or unk,
        pad_token=_token_text(tok_cfg.get("pad_token")) or "</s>",
        chat_template=_source_chat_template(src, tok_cfg) or chat_template or CHATML_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )


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
    cfg = _read_config(src)
    shape = _shape(cfg)
    rope = _rope_parameters(cfg)
    files = _weight_files(src)
    tokenizer = _build_tokenizer(src, chat_template)  # fails fast on a bad tokenizer, before any heavy work
    fingerprint = _fingerprint(src, chat_template)

    shapes = _expected_shapes(shape)
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

            for name, tensor in _iter_tensors(path):
                for new, converted in _convert_tensor(name, tensor, shapes, shape, path.name):
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
        _move_into_place(tmp, dst, fingerprint)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if progress:
        progress(1.0, "InternLM2 checkpoint converted")
    return dst


def _move_into_place(tmp: Path, dst: Path, fingerprint: str) -> None:
    """Rename `tmp` to `dst`; an old `dst` is moved aside first (a rename over a non-empty folder fails)."""
    if dst.exists():
        if _is_complete(dst, fingerprint):  # another process finished the same conversion first
            shutil.rmtree(tmp)
            return
        old = dst.parent / f".{dst.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        dst.rename(old)
        shutil.rmtree(old, ignore_errors=True)
    try:
        tmp.rename(dst)
    except OSError:
        if not _is_complete(dst, fingerprint):
            raise
        shutil.rmtree(tmp)  # lost a race with another process converting the same source


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
