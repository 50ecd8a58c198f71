"""The interface every tokenizer offers (SentencePiece, tiktoken, Hugging Face)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable


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
    """Turns a growing list of token ids into text pieces as they arrive: the one
    detokenizer the CLI, the server and explain share.

    A token cannot be decoded alone: SentencePiece drops the leading space of a
    text, and byte-fallback tokens spell one UTF-8 character over several ids.
    Text only changes at its end, though, so each step decodes a short window
    from a recent token (`start`) and emits what the new tokens add to that
    window's text before them (`read`), as vLLM's incremental detokenizer does;
    a window ending in an unfinished UTF-8 character waits for the next token.
    The pieces join to `decode(ids)` and each step costs the same however long
    the text grows.
    """

    CONTEXT = 4
    """Prompt tokens decoded before the first new one: enough for its leading space to come out right."""

    def __init__(self, tokenizer: Tokenizer, prefix: Sequence[int] = ()):
        # With a prefix (the prompt), pieces continue its text: the first one
        # keeps its leading space, as it reads after the prompt.
        self.tokenizer = tokenizer
        self.ids: list[int] = list(prefix)
        self.read = len(self.ids)  # ids[:read] are already text
        self.start = max(0, self.read - self.CONTEXT)

    def push(self, token: int) -> str:
        self.ids.append(token)
        return self._advance(final=False)

    def flush(self) -> str:
        """Whatever is still held back (call once at the end)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        before = self.tokenizer.decode(self.ids[self.start:self.read])
        after = self.tokenizer.decode(self.ids[self.start:])
        if not final and (len(after) <= len(before) or after.endswith("\ufffd") or not after.startswith(before)):
            return ""  # nothing new yet, or the rest of a multi-byte character is still to come
        self.start, self.read = self.read, len(self.ids)  # the next window starts at these new tokens
        return after[len(before):]
