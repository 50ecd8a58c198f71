"""The interface every tokenizer offers (SentencePiece, tiktoken, Hugging Face)."""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable


@runtime_checkable
class Tokenizer(Protocol):
    bos_id: int
    eos_id: int
    pad_id: int
    """-1 when the vocabulary has no padding token (Llama's)."""
    n_words: int
    stop_ids: tuple[int, ...]
    """Ids that end a generation (eos_id, plus e.g. Llama 3's <|eot_id|>)."""

    def encode(self, s: str, bos: bool, eos: bool) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class IncrementalDecoder:
    """Turns a growing list of token ids into text pieces as they arrive.

    SentencePiece drops the leading space of a text and byte-fallback tokens
    spell one UTF-8 character over several ids, so a token cannot be decoded
    alone. Decoding everything so far and emitting what is new (holding back
    an unfinished UTF-8 sequence) makes the pieces join to exactly
    `decode(all ids)`.
    """

    def __init__(self, tokenizer: Tokenizer, prefix: Sequence[int] = ()):
        # With a prefix (the prompt), pieces continue its text: the first one
        # keeps its leading space, as it reads after the prompt.
        self.tokenizer = tokenizer
        self.ids: list[int] = list(prefix)
        self.text = tokenizer.decode(self.ids) if self.ids else ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd") or not text.startswith(self.text):
            return ""  # wait for the rest of a multi-byte character
        piece, self.text = text[len(self.text):], text
        return piece

    def flush(self) -> str:
        """Whatever is still held back (call once at the end)."""
        text = self.tokenizer.decode(self.ids)
        if not text.startswith(self.text):  # pragma: no cover - decode is prefix-stable in practice
            return ""
        piece, self.text = text[len(self.text):], text
        return piece
