"""Cheap checks that a checkpoint's files are whole and belong together, run before anything is unloaded.

A corrupt or truncated .safetensors file, or a tokenizer from another model, would otherwise
fail only after the current model was unloaded (the weights) or in the middle of an answer
(an IndexError in the embedding). Reading the safetensors headers costs milliseconds.
"""

from __future__ import annotations

from pathlib import Path

from .sources import ModelSourceError


def check_safetensors(folder: Path) -> None:
    """Every *.safetensors file in `folder` has a readable header whose tensors fit in the file."""
    from safetensors import SafetensorError, safe_open

    for path in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as f:
                f.keys()
        except (SafetensorError, OSError) as e:
            detail = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ModelSourceError("corrupt_weights", file=path.name, folder=str(folder), detail=detail) from None


def check_tokenizer_fits(tokenizer, config, location: str) -> None:
    """The tokenizer gives no token id the model's embedding lacks (a tokenizer from another model)."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    rows = getattr(text_config, "vocab_size", None)
    tokens = len(tokenizer)
    if rows and tokens > rows:
        raise ModelSourceError("tokenizer_mismatch", location=location, tokens=tokens, rows=rows)
