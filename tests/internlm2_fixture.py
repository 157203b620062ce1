"""Synthesized InternLM2-format checkpoints: random weights under the real key names and the
fused, KV-grouped wqkv layout, real-looking config/tokenizer files, and a sentencepiece
tokenizer trained on the spot. Used by the tests and reusable by benchmarks."""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch

TINY_INTERNLM2 = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=512, max_position_embeddings=512)
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# The real hub tokenizer_config's chat template (ChatML with a leading BOS).
HUB_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "The capital of France is Paris.",
    "Hello world, how are you today?",
    "Small models run on small GPUs; large models need more memory.",
    "system user assistant: answer briefly and politely.",
    "你好，世界！模型在显卡上运行。",
]
SPECIAL_TOKENS = ["<|plugin|>", "<|interpreter|>", "<|action_end|>", "<|action_start|>", IM_END, IM_START]


def train_tiny_sentencepiece(folder: Path, vocab_size: int = 512, chat_template: str | None = HUB_CHAT_TEMPLATE) -> Path:
    """Train a BPE sentencepiece `tokenizer.model` (byte fallback, ChatML tokens as single pieces)
    and write a hub-like `tokenizer_config.json` next to it; returns the model file."""
    import sentencepiece as spm

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 20), model_writer=model, model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, character_coverage=1.0, user_defined_symbols=SPECIAL_TOKENS,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, normalization_rule_name="identity",
        remove_extra_whitespaces=False, num_threads=1, minloglevel=2,
    )
    path = folder / "tokenizer.model"
    path.write_bytes(model.getvalue())

    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    special = ["<unk>", "<s>", "</s>"] + SPECIAL_TOKENS
    tok_cfg = {
        "added_tokens_decoder": {str(sp.piece_to_id(t)): {"content": t, "lstrip": False, "normalized": False,
                                                          "rstrip": False, "single_word": False, "special": True}
                                 for t in special},
        "additional_special_tokens": [IM_START, IM_END],
        "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer",
                                       "tokenization_internlm2_fast.InternLM2TokenizerFast"]},
        "bos_token": "<s>", "eos_token": "</s>", "pad_token": "</s>", "unk_token": "<unk>",
        "clean_up_tokenization_spaces": False, "tokenizer_class": "InternLM2Tokenizer",
    }
    if chat_template:
        tok_cfg["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))
    return path


def random_internlm2_state_dict(shape: dict, dtype=torch.float32, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights with InternLM2's names and shapes (fused wqkv grouped per KV head)."""
    g = torch.Generator().manual_seed(seed)
    hidden, inter, vocab = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    heads, kv = shape["num_attention_heads"], shape["num_key_value_heads"]
    head_dim = hidden // heads

    def w(*size, std=0.2):
        return (torch.randn(*size, generator=g) * std).to(dtype)

    def norm():  # near 1, but not exactly, so a misplaced norm weight shows up in the logits
        return (1.0 + 0.1 * torch.randn(hidden, generator=g)).to(dtype)

    state = {"model.tok_embeddings.weight": w(vocab, hidden, std=1.0)}
    for i in range(shape["num_hidden_layers"]):
        p = f"model.layers.{i}."
        state[p + "attention.wqkv.weight"] = w(kv * (heads // kv + 2) * head_dim, hidden)
        state[p + "attention.wo.weight"] = w(hidden, hidden)
        state[p + "feed_forward.w1.weight"] = w(inter, hidden)
        state[p + "feed_forward.w3.weight"] = w(inter, hidden)
        state[p + "feed_forward.w2.weight"] = w(hidden, inter)
        state[p + "attention_norm.weight"] = norm()
        state[p + "ffn_norm.weight"] = norm()
    state["model.norm.weight"] = norm()
    state["output.weight"] = w(vocab, hidden)
    return state


def write_internlm2_checkpoint(folder: Path, shape_kwargs: dict | None = None, num_shards: int = 2,
                               dtype=torch.float32, seed: int = 0, weights_format: str = "safetensors",
                               chat_template: str | None = HUB_CHAT_TEMPLATE, state: dict | None = None,
                               **config_overrides) -> Path:
    """An InternLM2 hub-style folder: config.json (model_type internlm2), tokenizer, and weights
    in `num_shards` files ("safetensors" or "bin"; more than one gets an index)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shape = {**TINY_INTERNLM2, **(shape_kwargs or {})}
    train_tiny_sentencepiece(folder, vocab_size=shape["vocab_size"], chat_template=chat_template)
    config = {
        "architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2",
        "auto_map": {"AutoConfig": "configuration_internlm2.InternLM2Config",
                     "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"},
        **shape, "bias": False, "hidden_act": "silu", "initializer_range": 0.02, "rms_norm_eps": 1e-5,
        "rope_theta": 1000000, "rope_scaling": None, "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "use_cache": True,
        "attn_implementation": "eager", "torch_dtype": str(dtype).removeprefix("torch."),
        **config_overrides,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    # Like the real chat models' file: stop on </s> or <|im_end|> (id 92542 there, small here).
    tok_cfg = json.loads((folder / "tokenizer_config.json").read_text())
    im_end_id = next(int(i) for i, t in tok_cfg["added_tokens_decoder"].items() if t["content"] == IM_END)
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2, im_end_id]}))

    state = state if state is not None else random_internlm2_state_dict(shape, dtype, seed)
    names = list(state)
    chunks = [names[i::num_shards] for i in range(num_shards)]  # interleaved: layers span shards
    ext = "safetensors" if weights_format == "safetensors" else "bin"
    stem = "model" if ext == "safetensors" else "pytorch_model"
    weight_map = {}
    for i, chunk in enumerate(chunks):
        file = f"{stem}.{ext}" if num_shards == 1 else f"{stem}-{i + 1:05d}-of-{num_shards:05d}.{ext}"
        part = {n: state[n].contiguous() for n in chunk}
        if ext == "safetensors":
            save_file(part, folder / file, metadata={"format": "pt"})
        else:
            torch.save(part, folder / file)
        weight_map.update(dict.fromkeys(chunk, file))
    if num_shards > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                 "weight_map": weight_map}
        (folder / f"{stem}.{ext}.index.json").write_text(json.dumps(index, indent=2))
    return folder


def load_internlm2_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of an InternLM2 folder written by `write_internlm2_checkpoint`."""
    from safetensors.torch import load_file

    state = {}
    for path in sorted(Path(folder).iterdir()):
        if path.suffix == ".safetensors":
            state.update(load_file(path))
        elif path.suffix == ".bin":
            state.update(torch.load(path, weights_only=True))
    return state
