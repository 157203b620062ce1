"""InternLM2's checkpoint read as Llama's: its config and shapes, its weight files, and each
tensor renamed (and the fused `wqkv` split per KV group) into the LlamaForCausalLM layout."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from .sources import CheckpointError

WEIGHT_SUFFIXES = (".safetensors", ".bin")
_ROPE_TYPES = ("linear", "dynamic")  # the only scalings InternLM2's modeling code implements


@dataclass(frozen=True)
class CheckpointShape:
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


def read_config(src: Path) -> dict:
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


def checkpoint_shape(cfg: dict) -> CheckpointShape:
    try:
        heads = cfg["num_attention_heads"]
        shape = CheckpointShape(cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], heads,
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

    s = checkpoint_shape(cfg)
    return ModelShape(hidden_size=s.hidden, num_layers=s.layers, num_heads=s.heads, num_kv_heads=s.kv_heads,
                      vocab_size=s.vocab, intermediate_size=s.intermediate,
                      max_context=int(cfg.get("max_position_embeddings") or 32768), tie_word_embeddings=s.tied)


def rope_parameters(cfg: dict) -> dict:
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


def expected_shapes(s: CheckpointShape) -> dict[str, tuple[int, ...]]:
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


def llama_name(name: str) -> str:
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


def convert_tensor(name: str, tensor: torch.Tensor, shapes: dict, s: CheckpointShape, file: str) -> Iterator[tuple[str, torch.Tensor]]:
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
        yield llama_name(name), tensor.contiguous().clone()




def weight_files(src: Path) -> list[Path]:
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


def iter_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
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
