"""Tokenizers rebuilt from a GGUF file's metadata (the `tokenizer.*` keys llama.cpp reads).

`gguf_tokenizer(meta, source)` takes those keys as plain Python values and returns:

    tokenizer.ggml.model "llama"  -> SentencePieceTokenizer over a SentencePiece BPE
        model made in memory from the tokens, scores and token types (llama.cpp's
        token types are SentencePiece's piece types, so they carry over as they are);
    tokenizer.ggml.model "gpt2"   -> GGUFBPETokenizer: a `tokenizers` byte-level BPE
        from the tokens and merges, split first by the regex `tokenizer.ggml.pre`
        names (llama-bpe: Llama 3's, qwen2: Qwen2/2.5/3's); control tokens are special tokens, recognised in chat
        templates only (text encodes them as characters, as Meta's Llama 3 tokenizer does).

Special ids (bos, eos, eot, pad, unk) come from the metadata; eos and eot are
stop ids; `tokenizer.chat_template` becomes the chat format (JinjaChatFormat).
`add_bos` records `tokenizer.ggml.add_bos_token`; as with every nabla tokenizer,
whether a BOS is added is the caller's `encode(s, bos, eos)` (Meta's API adds it).

Leaves out: other vocabularies (bert, t5, rwkv...) and pre-tokenizers other
than llama-bpe, qwen2 and gpt2's default; they raise TokenizerError. Qwen2's
tokenizer.json also NFC-normalizes text first; llama.cpp does not, nor does this.
"""

from __future__ import annotations

import struct
from functools import partial

from nabla.errors import TokenizerError
from nabla.tokenizer.hf import HFTokenizer
from nabla.tokenizer.sentencepiece import SentencePieceTokenizer

# llama.cpp's token types (also SentencePiece's piece types)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+")
"""Qwen2's pre-tokenizer split as its tokenizer.json states it (llama.cpp's "qwen2" spells the same
alternatives out case by case)."""
PRE_PATTERNS = {"default": GPT2_PATTERN, "gpt2": GPT2_PATTERN, "qwen2": QWEN2_PATTERN}  # + llama-bpe, below


def _pre_pattern(pre: str, source: str) -> str:
    from nabla.tokenizer.tiktoken import LLAMA3_PATTERN

    patterns = {**PRE_PATTERNS, "llama-bpe": LLAMA3_PATTERN, "llama3": LLAMA3_PATTERN}
    if pre not in patterns:
        raise TokenizerError(f"{source}: tokenizer.ggml.pre is {pre!r}, a pre-tokenizer nabla does not have "
                             f"(it has {', '.join(sorted(patterns))}); pass --tokenizer with the model's "
                             "tokenizer.json instead")
    return patterns[pre]


# ------------------------------------------------------------ SentencePiece
def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int32 ids are ten-byte varints
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, value) -> bytes:
    """One protobuf field: bytes/str (length-delimited), float (32-bit) or int/bool (varint)."""
    if isinstance(value, str):
        value = value.encode("utf-8")
    if isinstance(value, bytes):
        return _varint(number << 3 | 2) + _varint(len(value)) + value
    if isinstance(value, float):
        return _varint(number << 3 | 5) + struct.pack("<f", value)
    return _varint(number << 3) + _varint(int(value))


def sentencepiece_proto(tokens, scores, types, *, unk: int, bos: int, eos: int, pad: int,
                        add_space_prefix: bool = True) -> bytes:
    """A serialized SentencePiece ModelProto (BPE, byte fallback when there are byte pieces).

    Field numbers are sentencepiece_model.proto's: ModelProto pieces=1, trainer_spec=2,
    normalizer_spec=3; piece=1, score=2, type=3; TrainerSpec model_type=3 (BPE=2),
    vocab_size=4, byte_fallback=35, unk/bos/eos/pad_id=40..43; NormalizerSpec name=1,
    add_dummy_prefix=3, remove_extra_whitespaces=4, escape_whitespaces=5.
    """
    out = bytearray()
    for piece, score, kind in zip(tokens, scores, types):
        out += _field(1, _field(1, piece) + _field(2, float(score)) + _field(3, int(kind)))
    trainer = (_field(3, 2) + _field(4, len(tokens)) + _field(35, BYTE in types) + _field(40, unk)
               + _field(41, bos) + _field(42, eos) + _field(43, pad))
    normalizer = _field(1, "identity") + _field(3, add_space_prefix) + _field(4, False) + _field(5, True)
    return bytes(out + _field(2, trainer) + _field(3, normalizer))


def _sentencepiece(meta: dict, source: str) -> SentencePieceTokenizer:
    tokens = meta["tokenizer.ggml.tokens"]
    scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    if not (len(tokens) == len(scores) == len(types)):
        raise TokenizerError(f"{source}: {len(tokens)} tokens but {len(scores)} scores and {len(types)} token "
                             "types; the file's vocabulary is damaged: download or convert it again")
    unk = meta.get("tokenizer.ggml.unknown_token_id", types.index(UNKNOWN) if UNKNOWN in types else 0)
    types = [UNKNOWN if i == unk else t if t in (NORMAL, CONTROL, USER_DEFINED, UNUSED, BYTE) else NORMAL
             for i, t in enumerate(types)]  # SentencePiece wants exactly one unknown piece
    proto = sentencepiece_proto(tokens, scores, types, unk=unk, bos=meta.get("tokenizer.ggml.bos_token_id", -1),
                                eos=meta.get("tokenizer.ggml.eos_token_id", -1),
                                pad=meta.get("tokenizer.ggml.padding_token_id", -1),
                                add_space_prefix=bool(meta.get("tokenizer.ggml.add_space_prefix", True)))
    return SentencePieceTokenizer.from_proto(proto, source)


# ------------------------------------------------------------ byte-level BPE
class GGUFBPETokenizer(HFTokenizer):
    """A GPT-2-style BPE vocabulary from GGUF metadata, with HFTokenizer's encode/decode."""

    def __init__(self, meta: dict, source: str):  # noqa: D107 - HFTokenizer reads files; this reads metadata
        from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
        from tokenizers import Tokenizer as _Tokenizer

        tokens = meta["tokenizer.ggml.tokens"]
        merges = meta.get("tokenizer.ggml.merges")
        if not merges:
            raise TokenizerError(f"{source}: a gpt2 (BPE) vocabulary without tokenizer.ggml.merges; the file is "
                                 "incomplete: convert the model again with llama.cpp's convert_hf_to_gguf.py")
        pattern = _pre_pattern(meta.get("tokenizer.ggml.pre") or "default", source)
        types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
        vocab = {t: i for i, t in enumerate(tokens)}
        try:
            model = models.BPE(vocab, [tuple(m.split(" ", 1)) for m in merges], ignore_merges=True)
        except Exception as e:  # the Rust library raises plain Exception
            raise TokenizerError(f"{source}: the BPE vocabulary does not load ({e})") from None
        tk = _Tokenizer(model)
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tk.decoder = decoders.ByteLevel()
        specials = [AddedToken(t, special=True, normalized=False)
                    for t, k in zip(tokens, types) if k == CONTROL]
        added = [AddedToken(t, special=False, normalized=False)
                 for t, k in zip(tokens, types) if k == USER_DEFINED]
        tk.add_special_tokens(specials)
        tk.add_tokens(added)
        self.tk = self.tk_chat = tk
        self.path, self.config = source, {}
        self.n_words = len(tokens)
        self.bos_id = meta.get("tokenizer.ggml.bos_token_id", -1)
        self.eos_id = meta.get("tokenizer.ggml.eos_token_id", -1)
        if not (0 <= self.bos_id < self.n_words and 0 <= self.eos_id < self.n_words):
            raise TokenizerError(f"{source}: tokenizer.ggml.bos_token_id / eos_token_id missing or out of the "
                                 f"vocabulary ({self.bos_id}, {self.eos_id}); the file is incomplete")
        self.bos_token, self.eos_token = tokens[self.bos_id], tokens[self.eos_id]
        pad = meta.get("tokenizer.ggml.padding_token_id", -1)
        self.pad_id = pad if pad not in (self.bos_id, self.eos_id) else -1
        self.stop_ids = (self.eos_id,)

    def encode(self, s: str, bos: bool, eos: bool) -> list[int]:
        """Special tokens' text in `s` is plain text, as in Meta's Llama 3 tokenizer (chat templates
        use `encode_with_special`)."""
        if not isinstance(s, str):
            raise TokenizerError(f"can only encode text (str), got {type(s).__name__}")
        ids = self.encode_plain(s, at_start=True)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def __repr__(self) -> str:
        return f"GGUFBPETokenizer({self.path!r}, n_words={self.n_words})"


# ------------------------------------------------------------ both
def gguf_tokenizer(meta: dict, source: str):
    """The tokenizer a GGUF file's `tokenizer.*` metadata describes (`source` names the file in errors)."""
    kind = meta.get("tokenizer.ggml.model")
    if not meta.get("tokenizer.ggml.tokens"):
        raise TokenizerError(f"{source} holds no vocabulary (tokenizer.ggml.tokens); pass --tokenizer FILE "
                             "with the model's tokenizer.model or tokenizer.json")
    if kind == "llama":
        tok = _sentencepiece(meta, source)
    elif kind == "gpt2":
        tok = GGUFBPETokenizer(meta, source)
    else:
        raise TokenizerError(f"{source} has a {kind!r} vocabulary (tokenizer.ggml.model); nabla reads 'llama' "
                             "(SentencePiece) and 'gpt2' (BPE) ones: pass --tokenizer with the model's "
                             "tokenizer.json instead")
    n = tok.n_words
    stops = [tok.eos_id]
    for key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        i = meta.get(key)
        if isinstance(i, int) and 0 <= i < n and i not in stops:
            stops.append(i)
    tok.stop_ids = tuple(stops)
    tok.add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", True))
    template = meta.get("tokenizer.chat_template")
    if isinstance(template, str) and template.strip():
        from nabla.tokenizer.chat import JinjaChatFormat

        tokens = meta["tokenizer.ggml.tokens"]
        bos = tokens[tok.bos_id] if 0 <= tok.bos_id < n else ""
        eos = tokens[tok.eos_id] if 0 <= tok.eos_id < n else ""
        tok.chat_format = partial(JinjaChatFormat, template=template, bos_token=bos, eos_token=eos)
    elif kind == "gpt2" and "<|start_header_id|>" in tok.special_tokens:
        from nabla.tokenizer.chat import Llama3ChatFormat

        tok.chat_format = Llama3ChatFormat
    return tok


__all__ = ["gguf_tokenizer", "GGUFBPETokenizer", "sentencepiece_proto"]
