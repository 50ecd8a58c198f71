"""Hugging Face `tokenizer.json` files, through the `tokenizers` library.

BOS and EOS come from the folder's metadata, not from the model's name:
`tokenizer_config.json` (bos_token, eos_token), then `generation_config.json`
and `config.json` (bos/eos_token_id; eos may be a list, whose every id
load_tokenizer makes a stop id through nabla.tokenizer.stops). Special tokens written in the text (e.g. `</s>`
in a rendered chat template) are recognised, as transformers does; BOS/EOS
are only added when asked.

Leaves out: slow (Python) tokenizers and anything that needs transformers.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from nabla.errors import TokenizerError
from nabla.jsonfile import read_json_object, token_ids


def token_text(value) -> str | None:
    """tokenizer_config.json writes special tokens as "<s>" or {"content": "<s>", ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _without_legacy_prefix(tk):
    """A copy of `tk` that prepends "▁" once, at the start of the text.

    Llama tokenizer.json files prepend "▁" in the normalizer, which is
    SentencePiece's behaviour for plain text (kept for `encode`), but it also
    puts a stray "▁" after every special token inside a text ("</s>\n").
    With `"legacy": false` in tokenizer_config.json, transformers uses a
    Metaspace pre-tokenizer with prepend_scheme "first" instead; chat
    templates are encoded with this copy so that prompts equal
    `apply_chat_template`'s.
    """
    from tokenizers import Tokenizer as _Tokenizer
    from tokenizers import normalizers, pre_tokenizers

    norm = json.loads(tk.to_str()).get("normalizer") or {}
    steps = [n.get("type") for n in norm.get("normalizers", [])] if norm.get("type") == "Sequence" else []
    if steps != ["Prepend", "Replace"] or norm["normalizers"][0].get("prepend") != "▁":
        return tk
    copy = _Tokenizer.from_str(tk.to_str())
    copy.normalizer = normalizers.Sequence([])
    copy.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    return copy


def _plain_copies(tk):
    """Two copies of `tk` that read special-token strings as plain characters: one for text
    at the very start, one for text after a special token. The second differs only where a
    Metaspace pre-tokenizer prepends "▁" to the "first" piece: the library does that for the
    piece at offset 0 alone, and every separately encoded piece would count as first."""
    from tokenizers import Tokenizer as _Tokenizer

    def never_prepend(node) -> bool:
        if isinstance(node, list):
            return any([never_prepend(n) for n in node])
        if not isinstance(node, dict):
            return False
        changed = any([never_prepend(v) for v in node.values()])
        if node.get("type") == "Metaspace" and node.get("prepend_scheme") == "first":
            node["prepend_scheme"] = "never"
            changed = True
        return changed

    data = json.loads(tk.to_str())
    first = _Tokenizer.from_str(json.dumps(data))
    rest = _Tokenizer.from_str(json.dumps(data)) if never_prepend(data.get("pre_tokenizer")) else first
    first.encode_special_tokens = rest.encode_special_tokens = True
    return first, rest


class HFTokenizer:
    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer as _Tokenizer

        path = Path(path)
        if not path.is_file():
            raise TokenizerError(f"tokenizer file {path} not found; pass the path of tokenizer.json")
        try:
            self.tk = _Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust library raises plain Exception
            raise TokenizerError(f"{path} is not a Hugging Face tokenizer.json ({e})") from None
        self.path = path
        folder = path.parent
        self.config = read_json_object(folder / "tokenizer_config.json", missing_ok=True, error=TokenizerError)
        self.tk_chat = _without_legacy_prefix(self.tk) if self.config.get("legacy") is False else self.tk
        model_config = read_json_object(folder / "config.json", missing_ok=True, error=TokenizerError)
        gen_config = read_json_object(folder / "generation_config.json", missing_ok=True, error=TokenizerError)

        self.n_words: int = self.tk.get_vocab_size(with_added_tokens=True)
        self.bos_token = token_text(self.config.get("bos_token"))
        self.eos_token = token_text(self.config.get("eos_token"))
        bos = self._id(self.bos_token)
        if bos is None:
            bos = next(iter(token_ids(gen_config.get("bos_token_id"), str(folder / "generation_config.json"))
                            + token_ids(model_config.get("bos_token_id"), str(folder / "config.json"))), None)
        eos_ids = [self._id(self.eos_token)] if self._id(self.eos_token) is not None else []
        for ids in (token_ids(gen_config.get("eos_token_id"), str(folder / "generation_config.json")),
                    token_ids(model_config.get("eos_token_id"), str(folder / "config.json"))):
            eos_ids += [i for i in ids if i not in eos_ids]
        if bos is None or not eos_ids:
            raise TokenizerError(
                f"cannot tell the BOS/EOS tokens of {path}: put the tokenizer_config.json (bos_token, "
                "eos_token) or config.json (bos_token_id, eos_token_id) that came with it in the same folder")
        self.bos_id: int = bos
        self.eos_id: int = eos_ids[0]
        self.stop_ids: tuple[int, ...] = (self.eos_id,)  # load_tokenizer adds the configs' other eos ids
        if self.bos_token is None:
            self.bos_token = self.tk.id_to_token(bos)
        if self.eos_token is None:
            self.eos_token = self.tk.id_to_token(self.eos_id)
        # Meta pads with -1 (no padding token); a pad token that is also a
        # BOS/EOS (TinyLlama's "</s>") must not be mistaken for padding.
        pad = self._id(token_text(self.config.get("pad_token")))
        self.pad_id: int = pad if pad is not None and pad not in (bos, *eos_ids) else -1

    def _id(self, text: str | None) -> int | None:
        return self.tk.token_to_id(text) if text else None

    def encode(self, s: str, bos: bool, eos: bool) -> list[int]:
        if not isinstance(s, str):
            raise TokenizerError(f"can only encode text (str), got {type(s).__name__}")
        ids = self.tk.encode(s, add_special_tokens=False).ids
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_with_special(self, s: str) -> list[int]:
        """Encode rendered chat text: special tokens in it count, nothing is added."""
        return self.tk_chat.encode(s, add_special_tokens=False).ids

    @property
    def special_tokens(self) -> dict[str, int]:
        """The special added tokens by their text ("</s>": 2); `encode_with_special` reads these."""
        return {t.content: i for i, t in self.tk.get_added_tokens_decoder().items() if t.special}

    def encode_plain(self, s: str, at_start: bool) -> list[int]:
        """Encode a piece of rendered chat text with no special token recognised in it, as
        `encode_with_special` would encode it between two special tokens; `at_start`: the piece
        opens the text rather than following a special token."""
        if getattr(self, "_plain", None) is None:
            self._plain = _plain_copies(self.tk_chat)
        return self._plain[0 if at_start else 1].encode(s, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        # Special tokens are not text (as SentencePiece drops BOS/EOS).
        return self.tk.decode(list(ids), skip_special_tokens=True)

    def id_to_piece(self, i: int) -> str:
        return self.tk.id_to_token(i) or ""

    def __repr__(self) -> str:
        return f"HFTokenizer({str(self.path)!r}, n_words={self.n_words})"
