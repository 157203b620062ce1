"""Random-weight checkpoints with the exact shapes of real models, for GPU benches.

Real weights can't be fetched on the GPU machine; speed and memory depend on shape only.
Weights are drawn on the GPU when there is one (fast), written one layer-shard at a time
so a 7B never sits in host RAM whole.

    python bench/synth.py /tmp/toy --dtype float32            # a 2-layer toy for CPU benches
    python bench/synth.py /tmp/7b --like internlm2.5-7b-chat   # a catalog model's shape
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repo's packages

from models.catalog import ModelShape
from models.memory import layer_params

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def write_word_tokenizer(folder: Path, vocab_size: int) -> None:
    """A word-level tokenizer covering every id ("t0".."tN") plus ChatML specials, with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size - 2)}
    vocab["<|im_start|>"] = vocab_size - 2
    vocab["<|im_end|>"] = vocab_size - 1
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|im_start|>",
                                   unk_token="t0", pad_token="<|im_end|>")
    fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    fast.chat_template = CHATML
    fast.save_pretrained(folder)


def _randn(shape, dtype, device, generator, std=0.02) -> torch.Tensor:
    return (torch.randn(shape, device=device, generator=generator, dtype=torch.float32) * std).to(dtype)


def write_random_llama(folder: Path, shape: ModelShape, dtype: torch.dtype = torch.float16, seed: int = 0,
                       rope_theta: float = 1e6, rope_scaling: dict | None = None) -> Path:
    """A LlamaForCausalLM checkpoint of `shape` with random weights, one shard per layer."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=device).manual_seed(seed)
    h, n_layers = shape.hidden_size, shape.num_layers
    weight_map: dict[str, str] = {}

    def save(tensors: dict[str, torch.Tensor], name: str) -> None:
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, folder / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})

    shards = n_layers + 1
    head = {"model.embed_tokens.weight": _randn((shape.vocab_size, h), dtype, device, gen),
            "model.norm.weight": torch.ones(h, dtype=dtype)}
    if not shape.tie_word_embeddings:
        head["lm_head.weight"] = _randn((shape.vocab_size, h), dtype, device, gen)
    save(head, f"model-00001-of-{shards:05d}.safetensors")
    names = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    for i in range(n_layers):
        p = f"model.layers.{i}."
        tensors = {}
        for name, (out_f, in_f) in zip(names, layer_params(shape).linear_shapes):
            module = "self_attn" if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            tensors[f"{p}{module}.{name}.weight"] = _randn((out_f, in_f), dtype, device, gen)
        tensors[p + "input_layernorm.weight"] = torch.ones(h, dtype=dtype)
        tensors[p + "post_attention_layernorm.weight"] = torch.ones(h, dtype=dtype)
        save(tensors, f"model-{i + 2:05d}-of-{shards:05d}.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    rope = {"rope_type": "default", "rope_theta": rope_theta}
    if rope_scaling:
        rope = {**rope_scaling, "rope_theta": rope_theta}
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h,
        "intermediate_size": shape.intermediate_size, "num_hidden_layers": n_layers,
        "num_attention_heads": shape.num_heads, "num_key_value_heads": shape.num_kv_heads,
        "head_dim": shape.head_dim, "vocab_size": shape.vocab_size, "max_position_embeddings": shape.max_context,
        "rms_norm_eps": 1e-5, "rope_parameters": rope, "tie_word_embeddings": shape.tie_word_embeddings,
        "attention_bias": False, "hidden_act": "silu", "dtype": str(dtype).removeprefix("torch."),
        "bos_token_id": shape.vocab_size - 2, "eos_token_id": shape.vocab_size - 1, "pad_token_id": shape.vocab_size - 1,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    (folder / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": shape.vocab_size - 1, "pad_token_id": shape.vocab_size - 1, "bos_token_id": shape.vocab_size - 2}))
    write_word_tokenizer(folder, shape.vocab_size)
    return folder


def main() -> None:
    """Command-line entry point: write a random checkpoint of a catalog model's shape, or a small one."""
    import argparse

    from models.catalog import load_catalog

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="folder to write")
    p.add_argument("--like", help="catalog id whose shape to copy (default: a 2-layer toy for CPU benches)")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    args = p.parse_args()
    shape = (load_catalog().entries[args.like].shape if args.like else
             ModelShape(hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, vocab_size=2000,
                        intermediate_size=256, max_context=32768))
    print(write_random_llama(Path(args.out), shape, getattr(torch, args.dtype)))


if __name__ == "__main__":
    main()
