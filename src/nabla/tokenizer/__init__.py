"""Tokenizers behind one small interface: encode(s, bos, eos), decode(ids)."""

from __future__ import annotations

from pathlib import Path

from nabla.errors import TokenizerError
from nabla.tokenizer.base import Tokenizer
from nabla.tokenizer.sentencepiece import SentencePieceTokenizer


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Open a tokenizer file, telling its kind from its contents."""
    path = Path(path)
    if not path.exists():
        raise TokenizerError(f"tokenizer file {path} not found; pass --tokenizer FILE (a tokenizer.model)")
    if path.is_dir():
        raise TokenizerError(f"{path} is a folder; pass the tokenizer file itself (e.g. {path}/tokenizer.model)")
    return SentencePieceTokenizer(path)


__all__ = ["Tokenizer", "SentencePieceTokenizer", "load_tokenizer"]
