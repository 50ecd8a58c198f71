"""Generated text as clients see it: decoded a few tokens at a time, and held back
while it could still be the start of a stop string, so that a stop string never
reaches the client, even when it is split over tokens. And each token's own
text and bytes, as the logprobs fields show it (`TokenText`).

Leaves out: the logprobs fields themselves (nabla.server.responses).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from nabla.tokenizer.base import IncrementalDecoder

_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@dataclass
class Tok:
    """A generated (or echoed) token as the logprobs fields show it."""

    id: int
    text: str
    bytes: list[int]
    logprob: float | None
    top: list[tuple[str, list[int], float]] | None
    offset: int = 0  # characters before it in the choice's text


class TokenText:
    """Token ids as `Tok`s: the text each token adds on its own, and its UTF-8 bytes."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._special = {tokenizer.bos_id, *tokenizer.stop_ids}
        self.piece = functools.lru_cache(maxsize=65536)(self._piece)  # per instance: no cache outlives it

    def _piece(self, i: int) -> tuple[str, list[int]]:
        """The text token i adds (SentencePiece's '▁' as a space) and its UTF-8 bytes."""
        if i in self._special:
            return "", []
        piece = getattr(self.tokenizer, "id_to_piece", None)
        if piece is None:
            s = self.tokenizer.decode([i])
            return s, list(s.encode())
        p = piece(i)
        m = _BYTE.fullmatch(p)
        if m:
            b = int(m[1], 16)
            return (chr(b) if b < 0x80 else f"bytes:\\x{b:02x}"), [b]
        s = p.replace("\u2581", " ")
        return s, list(s.encode())

    def tok(self, token: int, logprob: float | None, top: list[tuple[int, float]] | None) -> Tok:
        text, raw = self.piece(token)
        tops = None if top is None else [(*self.piece(t), lp) for t, lp in top]
        return Tok(token, text, raw, logprob, tops)


class ChoiceText:
    """A choice's generated text, released as far as no stop string can still begin."""

    def __init__(self, tokenizer, prompt: list[int], stops: list[str], base: int = 0):
        self.decoder = IncrementalDecoder(tokenizer, prompt)
        self.stops = stops
        self.base = base  # offset of the generated text in the choice's text (echo)
        self.text = ""
        self.sent = 0
        self.pending: list[tuple[Tok, int, int]] = []  # token, start, end in self.text

    def push(self, tok: Tok) -> tuple[str, list[Tok], bool]:
        start = len(self.text)
        self.text += self.decoder.push(tok.id)
        tok.offset = self.base + start
        self.pending.append((tok, start, len(self.text)))
        return self._release(final=False)

    def finish(self) -> tuple[str, list[Tok], bool]:
        self.text += self.decoder.flush()
        return self._release(final=True)

    def _release(self, final: bool) -> tuple[str, list[Tok], bool]:
        cut, stopped = len(self.text), False
        found = [i for i in (self.text.find(s, self.sent) for s in self.stops) if i >= 0]
        if found:
            cut, stopped = min(found), True
        elif not final:
            cut -= self._held()
        piece, self.sent = self.text[self.sent:cut], cut
        if stopped:
            toks = [t for t, start, _ in self.pending if start < cut]
            self.pending = []
        else:
            toks = [t for t, _, end in self.pending if end <= cut]
            self.pending = [p for p in self.pending if p[2] > cut]
        return piece, toks, stopped

    def _held(self) -> int:
        """Length of the longest tail of the unsent text that starts a stop string."""
        best = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.text) - self.sent), best, -1):
                if self.text.endswith(s[:k]):
                    best = k
                    break
        return best
