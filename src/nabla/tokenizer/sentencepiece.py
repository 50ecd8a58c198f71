"""SentencePiece `tokenizer.model` files (Llama 1 and 2, and models nabla trains), or the same
model given as bytes (`from_proto`: a GGUF file's vocabulary, rebuilt by nabla.tokenizer.gguf)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from sentencepiece import SentencePieceProcessor

from nabla.errors import TokenizerError


class SentencePieceTokenizer:
    def __init__(self, model_path: str | Path):
        path = Path(model_path)
        if not path.is_file():
            raise TokenizerError(f"tokenizer file {path} not found; pass the path of tokenizer.model")
        self.sp = SentencePieceProcessor()
        try:
            ok = self.sp.Load(str(path))
        except (RuntimeError, OSError) as e:
            raise TokenizerError(f"{path} is not a SentencePiece model ({e})") from None
        if not ok:  # pragma: no cover - Load raises on failure in current releases
            raise TokenizerError(f"{path} is not a SentencePiece model")
        self._init_ids(path)

    @classmethod
    def from_proto(cls, proto: bytes, source: str) -> SentencePieceTokenizer:
        """A tokenizer from a serialized ModelProto; `source` names where it came from in messages."""
        self = cls.__new__(cls)
        self.sp = SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(proto)
        except (RuntimeError, OSError) as e:
            raise TokenizerError(f"{source}: its vocabulary is not a valid SentencePiece model ({e})") from None
        self._init_ids(Path(source))
        return self

    def _init_ids(self, path: Path) -> None:
        self.path = path
        self.n_words: int = self.sp.vocab_size()
        self.bos_id: int = self.sp.bos_id()
        self.eos_id: int = self.sp.eos_id()
        self.pad_id: int = self.sp.pad_id()
        self.stop_ids: tuple[int, ...] = (self.eos_id,)

    def encode(self, s: str, bos: bool, eos: bool) -> list[int]:
        if not isinstance(s, str):
            raise TokenizerError(f"can only encode text (str), got {type(s).__name__}")
        ids = self.sp.encode(s)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode(list(ids))

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(i)

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({str(self.path)!r}, n_words={self.n_words})"
