"""Tiny real checkpoints for logic tests: a random-weight Llama with a trained byte-level BPE
tokenizer and a ChatML chat template, written to disk like any downloaded model."""

from __future__ import annotations

from pathlib import Path

import torch

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "The capital of France is Paris.",
    "Hello world, how are you today?",
    "Small models run on small GPUs; large models need more memory.",
    "你好，世界！模型在显卡上运行。",
]

TINY_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512)


def write_tokenizer(folder: Path, chat_template: str | None = CHATML, vocab_size: int = 320):
    """Train a byte-level BPE tokenizer on a few sentences and save it with `chat_template`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 5, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", unk_token="<unk>",
                                   pad_token="<|im_end|>", bos_token="<|im_start|>")
    if chat_template:
        fast.chat_template = chat_template
    fast.save_pretrained(folder)
    return fast


def write_tiny_llama(folder: Path, seed: int = 0, chat_template: str | None = CHATML, **shape) -> Path:
    """A random-weight LlamaForCausalLM checkpoint + tokenizer in `folder` (fp32 safetensors)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = write_tokenizer(folder, chat_template)
    config = LlamaConfig(vocab_size=len(tokenizer), **{**TINY_SHAPE, **shape},
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    # Larger-than-default weights make the random model's greedy choices decisive, so
    # tests comparing two paths are not decided by float noise between near-equal logits.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    model.save_pretrained(folder)
    return folder
