"""Llama 3's tiktoken `tokenizer.model`: byte-level BPE ranks plus 256 special tokens.

The file holds one `base64(token) rank` line per mergeable token (128,000 in
Llama 3); the special tokens follow them, in the order Meta's llama3
tokenizer.py lists them. Text is encoded with no special tokens recognised
(a literal "<|eot_id|>" in a prompt is plain text), as Meta's `encode` does.

Leaves out: other tiktoken encodings (cl100k and friends are not Llama's).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

from nabla.errors import TokenizerError
from nabla.tokenizer.chat import Llama3ChatFormat

# Llama 3's pre-tokenizer split pattern (Meta's `pat_str`).
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
NUM_SPECIAL = 256
LLAMA3_SPECIAL = [
    "<|begin_of_text|>", "<|end_of_text|>",
    "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|reserved_special_token_2|>", "<|reserved_special_token_3|>",
    "<|start_header_id|>", "<|end_header_id|>",
    "<|reserved_special_token_4|>",
    "<|eot_id|>",  # end of turn
] + [f"<|reserved_special_token_{i}|>" for i in range(5, NUM_SPECIAL - 5)]

# tiktoken's Rust core may overflow its stack on very long runs of the same
# kind of character; Meta cuts the text like this before encoding.
MAX_CHARS = 400_000
MAX_RUN = 25_000


def _runs(s: str, limit: int) -> Iterator[str]:
    """Pieces of `s` with at most `limit` consecutive whitespace or non-whitespace characters."""
    start, run, is_space = 0, 0, None
    for i, ch in enumerate(s):
        space = ch.isspace()
        run = run + 1 if space == is_space else 1
        is_space = space
        if run > limit:
            yield s[start:i]
            start, run = i, 1
    yield s[start:]


class TiktokenTokenizer:
    def __init__(self, model_path: str | Path):
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe

        path = Path(model_path)
        if not path.is_file():
            raise TokenizerError(f"tokenizer file {path} not found; pass the path of tokenizer.model")
        try:
            ranks = load_tiktoken_bpe(str(path))
        except (ValueError, OSError, UnicodeDecodeError) as e:
            raise TokenizerError(f"{path} is not a tiktoken BPE file ({e})") from None
        self.path = path
        self.num_base_tokens = len(ranks)
        self.special_tokens = {tok: self.num_base_tokens + i for i, tok in enumerate(LLAMA3_SPECIAL)}
        self.model = tiktoken.Encoding(name=path.name, pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                                       special_tokens=self.special_tokens)
        self.n_words: int = self.num_base_tokens + len(self.special_tokens)
        self.bos_id: int = self.special_tokens["<|begin_of_text|>"]
        self.eos_id: int = self.special_tokens["<|end_of_text|>"]
        self.pad_id: int = -1
        self.stop_ids: tuple[int, ...] = (self.eos_id, self.special_tokens["<|eot_id|>"])
        self.chat_format = Llama3ChatFormat

    def encode(self, s: str, bos: bool, eos: bool) -> list[int]:
        if not isinstance(s, str):
            raise TokenizerError(f"can only encode text (str), got {type(s).__name__}")
        ids: list[int] = []
        for i in range(0, len(s), MAX_CHARS):
            for piece in _runs(s[i:i + MAX_CHARS], MAX_RUN):
                ids += self.model.encode(piece, allowed_special=set(), disallowed_special=())
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_with_special(self, s: str) -> list[int]:
        """Encode rendered chat text, where "<|eot_id|>" and friends are special tokens."""
        return self.model.encode(s, allowed_special="all")

    def decode(self, ids: Sequence[int]) -> str:
        # errors="replace": a token may hold part of a UTF-8 character.
        return self.model.decode(list(ids), errors="replace")

    def id_to_piece(self, i: int) -> str:
        return self.model.decode_single_token_bytes(i).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return f"TiktokenTokenizer({str(self.path)!r}, n_words={self.n_words})"
