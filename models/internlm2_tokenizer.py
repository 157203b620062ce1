"""InternLM2's tokenizer as a standard fast tokenizer: built from its sentencepiece tokenizer.model
(read with the sentencepiece package's protobuf schema), with `<|im_end|>` as eos and a chat template."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .sources import CheckpointError

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# InternLM2's own chat format (ChatML with a leading BOS), for folders that ship no template;
# the catalog's InternLM2 entries name the same file.
CHATML_TEMPLATE = (Path(__file__).parent / "chat_templates" / "internlm2.jinja").read_text(encoding="utf-8")


@dataclass
class _SentencePiece:
    pieces: list[tuple[str, float, int]]  # (piece, score, type: 1 normal, 2 unknown, 3 control, 4 user, 6 byte)
    is_bpe: bool
    add_dummy_prefix: bool


def _read_sentencepiece(path: Path) -> _SentencePiece:
    """The pieces and options of a sentencepiece tokenizer.model (its ModelProto, read by protobuf)."""
    from google.protobuf.message import DecodeError
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    proto = sp_pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except DecodeError as e:
        raise CheckpointError(f"{path} is not a sentencepiece model ({e}).") from None
    pieces = [(p.piece, p.score, p.type) for p in proto.pieces]
    return _SentencePiece(pieces, proto.trainer_spec.model_type == sp_pb2.TrainerSpec.BPE,
                          proto.normalizer_spec.add_dummy_prefix)


def _token_text(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def _source_chat_template(src: Path, tok_cfg: dict) -> str | None:
    template = tok_cfg.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if not template and (src / "chat_template.jinja").is_file():
        template = (src / "chat_template.jinja").read_text()
    return template or None


def build_tokenizer(src: Path, chat_template: str | None):
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
