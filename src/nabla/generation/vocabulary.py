"""A tokenizer's vocabulary as byte strings, for grammar engines.

A grammar engine decides which tokens may come next from the bytes each token
adds to the text. Every tokenizer nabla loads spells its tokens differently:
SentencePiece writes a space as "▁" and a byte-fallback token as "<0x0A>",
tiktoken holds raw bytes, and a Hugging Face tokenizer.json is either
byte-level (GPT-2's bytes-to-unicode alphabet) or SentencePiece-like. This
module turns each into one list: the bytes of token i, or None for a special
token (BOS, EOS, <unk>, chat tags), which is never text.

Leaves out: the grammar itself (nabla.generation.constraints).
"""

from __future__ import annotations

import json
import re
from functools import lru_cache

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the printable stand-in of each byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _sentencepiece(tok) -> list[bytes | None]:
    sp = tok.sp
    out: list[bytes | None] = []
    for i in range(sp.vocab_size()):
        if sp.is_control(i) or sp.is_unknown(i):
            out.append(None)
        elif sp.is_byte(i):
            out.append(bytes([int(_BYTE_PIECE.fullmatch(sp.id_to_piece(i)).group(1), 16)]))
        else:
            out.append(sp.id_to_piece(i).replace("▁", " ").encode("utf-8"))
    return out


def _tiktoken(tok) -> list[bytes | None]:
    base = [tok.model.decode_single_token_bytes(i) for i in range(tok.num_base_tokens)]
    return base + [None] * (tok.n_words - tok.num_base_tokens)


def _hf(tok) -> list[bytes | None]:
    spec = json.loads(tok.tk.to_str())
    byte_level = "ByteLevel" in json.dumps(spec.get("decoder") or {})
    byte_fallback = bool((spec.get("model") or {}).get("byte_fallback"))
    specials = {t.get("id") for t in spec.get("added_tokens", []) if t.get("special")}
    table = _unicode_to_byte()
    out: list[bytes | None] = []
    for i in range(tok.n_words):
        piece = tok.tk.id_to_token(i)
        if piece is None or i in specials:
            out.append(None)
        elif byte_level:
            try:
                out.append(bytes(table[c] for c in piece))
            except KeyError:  # an added (non-special) token written as plain text
                out.append(piece.encode("utf-8"))
        elif byte_fallback and _BYTE_PIECE.fullmatch(piece):
            out.append(bytes([int(piece[3:5], 16)]))
        else:
            out.append(piece.replace("▁", " ").encode("utf-8"))
    return out


def token_bytes(tokenizer) -> list[bytes | None]:
    """The bytes each token id adds to the text, None for special tokens (cached on the tokenizer)."""
    cached = getattr(tokenizer, "_nabla_token_bytes", None)
    if cached is not None:
        return cached
    if hasattr(tokenizer, "sp"):
        out = _sentencepiece(tokenizer)
    elif hasattr(tokenizer, "num_base_tokens"):
        out = _tiktoken(tokenizer)
    elif hasattr(tokenizer, "tk"):
        out = _hf(tokenizer)
    else:
        raise TypeError(f"nabla cannot read the vocabulary of {type(tokenizer).__name__} for constrained decoding")
    for i in set(tokenizer.stop_ids) | {tokenizer.bos_id, tokenizer.eos_id}:
        if 0 <= i < len(out):
            out[i] = None
    tokenizer._nabla_token_bytes = out
    return out
