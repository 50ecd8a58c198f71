"""A nabla tokenizer as the Hugging Face files `transformers` opens: tokenizer.json,
tokenizer_config.json and generation_config.json (their contents; the caller writes them).

    SentencePiece BPE (Llama 1/2, the built-in model, models nabla trains) -> a
        `tokenizers` BPE with byte fallback, as transformers' LlamaConverter builds it:
        merges from the pieces ordered by score, "▁" for spaces prepended by the
        normalizer (the "legacy" layout of Meta's own Llama 2 tokenizer.json, which
        encodes every text as SentencePiece does, a leading space included), and
        Replace/ByteFallback/Fuse/Strip decoders;
    tiktoken (Llama 3)                    -> a byte-level BPE with Llama 3's split
        pattern, merges recovered from the ranks and the 256 special tokens, as
        Meta's Llama 3 tokenizer.json has it;
    tokenizer.json (HFTokenizer)          -> the same `tokenizers` object.

tokenizer_config.json names `PreTrainedTokenizerFast`, so that transformers 4 and 5
both use tokenizer.json as it is (transformers 5's `LlamaTokenizer` would rebuild
the pipeline with a Metaspace pre-tokenizer, which drops SentencePiece's extra "▁"
before a text that starts with a space). Its chat template is the format nabla
uses for the tokenizer: Meta's Llama 2 [INST] format or Llama 3 headers, as the
published Hugging Face templates of those models write them.

Leaves out: writing files (nabla.checkpoint.convert does, atomically) and
SentencePiece unigram models (Llama's are BPE): they raise TokenizerError.
"""

from __future__ import annotations

import json

from nabla.errors import TokenizerError

# The chat template of meta-llama/Llama-2-7b-chat-hf's tokenizer_config.json: Meta's Llama 2 format
# (nabla.tokenizer.chat.Llama2ChatFormat) as text.
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)
# The chat template of meta-llama/Meta-Llama-3-8B-Instruct's tokenizer_config.json: Meta's Llama 3
# header format (nabla.tokenizer.chat.Llama3ChatFormat) as text.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# SentencePiece piece types (sentencepiece_model.proto)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


# ------------------------------------------------------------ SentencePiece
def _fields(data: bytes):
    """(field number, value) of a serialized protobuf message: ints for varints, bytes otherwise."""
    pos = 0

    def varint():
        nonlocal pos
        n = shift = 0
        while True:
            b = data[pos]
            pos += 1
            n |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return n

    while pos < len(data):
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == 0:
            yield number, varint()
        elif wire == 2:
            size = varint()
            yield number, data[pos:pos + size]
            pos += size
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            yield number, data[pos:pos + size]
            pos += size
        else:
            raise ValueError(f"protobuf wire type {wire}")


def sentencepiece_specs(proto: bytes) -> tuple[list[tuple[str, float, int]], dict, dict]:
    """The pieces (text, score, type), trainer spec (model_type, byte_fallback) and normalizer spec
    (add_dummy_prefix, remove_extra_whitespaces, escape_whitespaces, precompiled_charsmap) of a
    serialized ModelProto, with sentencepiece_model.proto's defaults."""
    import struct

    pieces = []
    trainer = {"model_type": 1, "byte_fallback": False}
    normalizer = {"add_dummy_prefix": True, "remove_extra_whitespaces": True, "escape_whitespaces": True,
                  "precompiled_charsmap": b""}
    for number, value in _fields(proto):
        if number == 1:
            piece, score, kind = "", 0.0, NORMAL
            for n, v in _fields(value):
                if n == 1:
                    piece = v.decode("utf-8")
                elif n == 2:
                    score = struct.unpack("<f", v)[0]
                elif n == 3:
                    kind = v
            pieces.append((piece, score, kind))
        elif number == 2:
            for n, v in _fields(value):
                if n == 3:
                    trainer["model_type"] = v
                elif n == 35:
                    trainer["byte_fallback"] = bool(v)
        elif number == 3:
            for n, v in _fields(value):
                key = {2: "precompiled_charsmap", 3: "add_dummy_prefix", 4: "remove_extra_whitespaces",
                       5: "escape_whitespaces"}.get(n)
                if key is not None:
                    normalizer[key] = v if key == "precompiled_charsmap" else bool(v)
    return pieces, trainer, normalizer


def _sentencepiece_tokenizer(tok):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE

    sp = tok.sp
    source = str(getattr(tok, "path", "the tokenizer"))
    try:
        specs, trainer, norm = sentencepiece_specs(sp.serialized_model_proto())
    except (IndexError, ValueError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{source}: cannot read the SentencePiece model's settings ({e})") from None
    if trainer["model_type"] != 2:
        raise TokenizerError(f"{source} is a SentencePiece model of type {trainer['model_type']} (not BPE); "
                             "nabla writes tokenizer.json for BPE models only (Llama's): pass --tokenizer with "
                             "the model's own tokenizer.json")
    n = len(specs)
    pieces = [p for p, _, _ in specs]
    kinds = [k for _, _, k in specs]
    vocab = {p: i for i, p in enumerate(pieces)}
    # Merges as LlamaConverter ranks them: every split of a piece into two pieces, by the piece's
    # score (highest first), then by the ids of the two halves.
    normal = {p: (score, i) for i, (p, score, kind) in enumerate(specs) if kind == NORMAL}
    ranked = []
    for piece, (score, i) in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((-score, i, normal[left][1], normal[right][1], left, right))
    merges = [(left, right) for *_, left, right in sorted(ranked)]
    unk = pieces[sp.unk_id()] if sp.unk_id() >= 0 else None
    tk = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True,
                       byte_fallback=trainer["byte_fallback"], dropout=None))
    steps = []
    if norm["precompiled_charsmap"]:
        steps.append(normalizers.Precompiled(norm["precompiled_charsmap"]))
    if norm["remove_extra_whitespaces"]:  # spaces only, as SentencePiece
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if norm["add_dummy_prefix"]:
        steps.append(normalizers.Prepend("▁"))
    if norm["escape_whitespaces"]:
        steps.append(normalizers.Replace(" ", "▁"))
    tk.normalizer = normalizers.Sequence(steps)
    tk.add_special_tokens([AddedToken(pieces[i], special=True, normalized=False)
                           for i in range(n) if kinds[i] in (UNKNOWN, CONTROL)])
    # SentencePiece emits user-defined pieces whole, wherever they are in a text
    tk.add_tokens([AddedToken(pieces[i], special=False, normalized=False)
                   for i in range(n) if kinds[i] == USER_DEFINED])
    dec = [decoders.Replace("▁", " ")]
    if trainer["byte_fallback"]:
        dec.append(decoders.ByteFallback())
    dec.append(decoders.Fuse())
    if norm["add_dummy_prefix"]:
        dec.append(decoders.Strip(content=" ", left=1, right=0))
    tk.decoder = decoders.Sequence(dec)
    bos = pieces[tok.bos_id] if 0 <= tok.bos_id < n else None
    if bos is not None:
        tk.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, tok.bos_id)])
    return tk


# ------------------------------------------------------------------- tiktoken
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the alphabet of byte-level BPE vocabularies)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def _tiktoken_tokenizer(tok):
    from tiktoken.load import load_tiktoken_bpe
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE

    from nabla.tokenizer.tiktoken import LLAMA3_PATTERN

    ranks = load_tiktoken_bpe(str(tok.path))
    table = _bytes_to_unicode()

    def text(b: bytes) -> str:
        return "".join(table[x] for x in b)

    vocab = {text(b): r for b, r in ranks.items()}
    # Each token of rank r came from merging two shorter tokens; list the splits by r, as transformers'
    # TikTokenConverter does (ties by the halves' ranks).
    merges = []
    for b, r in ranks.items():
        splits = [(ranks[b[:k]], ranks[b[k:]], b[:k], b[k:]) for k in range(1, len(b))
                  if b[:k] in ranks and b[k:] in ranks]
        merges += [(r, lr, rr, text(lb), text(rb)) for lr, rr, lb, rb in splits]
    merges.sort()
    tk = Tokenizer(BPE(vocab=vocab, merges=[(a, b) for *_, a, b in merges], fuse_unk=False,
                       byte_fallback=False, dropout=None, ignore_merges=True))
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    tk.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    specials = sorted(tok.special_tokens.items(), key=lambda kv: kv[1])
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, _ in specials])
    bos = "<|begin_of_text|>"
    tk.post_processor = processors.Sequence([
        processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True),
        processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                      special_tokens=[(bos, tok.bos_id)])])
    return tk


# ----------------------------------------------------------------- the files
def hf_tokenizer(tok):
    """A `tokenizers.Tokenizer` that encodes and decodes as `tok` does."""
    if getattr(tok, "tk", None) is not None:  # already one (tokenizer.json, GGUF byte-level BPE)
        return tok.tk
    if getattr(tok, "sp", None) is not None:
        return _sentencepiece_tokenizer(tok)
    if getattr(tok, "special_tokens", None) is not None and getattr(tok, "path", None) is not None:
        return _tiktoken_tokenizer(tok)
    raise TokenizerError(f"nabla cannot write a tokenizer.json for {tok!r}; pass --tokenizer with the "
                         "model's own tokenizer.json")


def tokenizer_json(tok) -> str:
    """The text of a tokenizer.json for `tok`."""
    return json.dumps(json.loads(hf_tokenizer(tok).to_str()), indent=2, ensure_ascii=False) + "\n"


def _token(tok, i: int | None) -> str | None:
    if i is None or not 0 <= i < tok.n_words:
        return None
    piece = getattr(tok, "id_to_piece", None)
    return piece(i) if piece is not None else None


def default_chat_template(tok) -> str:
    """The published Hugging Face template of the chat format nabla uses for `tok` (Llama 2's unless
    the tokenizer names another)."""
    from nabla.tokenizer.chat import Llama3ChatFormat

    fmt = getattr(tok, "chat_format", None)
    if fmt is Llama3ChatFormat:
        return LLAMA3_TEMPLATE
    template = getattr(fmt, "keywords", {}).get("template")  # a JinjaChatFormat partial
    return template if template else LLAMA2_TEMPLATE


def tokenizer_config(tok, *, model_max_length: int | None = None, chat_template: str | None = None) -> dict:
    """tokenizer_config.json for `tok`: its class, bos/eos/unk/pad tokens, add_bos_token (Meta's
    generate adds a BOS), the chat template and the context length."""
    if getattr(tok, "special_tokens", None) is not None and getattr(tok, "tk", None) is None:
        bos, eos = "<|begin_of_text|>", _token(tok, tok.eos_id) or "<|end_of_text|>"
        unk = None
    else:
        bos, eos = _token(tok, tok.bos_id), _token(tok, tok.eos_id)
        sp = getattr(tok, "sp", None)
        unk = sp.id_to_piece(sp.unk_id()) if sp is not None and sp.unk_id() >= 0 else None
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos,
              "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False}
    if unk is not None:
        config["unk_token"] = unk
    if tok.pad_id >= 0 and _token(tok, tok.pad_id):
        config["pad_token"] = _token(tok, tok.pad_id)
    if model_max_length:
        config["model_max_length"] = int(model_max_length)
    config["chat_template"] = chat_template or default_chat_template(tok)
    return {k: v for k, v in config.items() if v is not None}


def generation_config(tok, *, bos_id: int | None = None, eos_ids: list[int] | None = None) -> dict:
    """generation_config.json: the BOS id and every stop id (the tokenizer's EOS and end-of-turn tokens)."""
    stops = list(eos_ids or [])
    stops += [i for i in tok.stop_ids if i not in stops]
    config = {"bos_token_id": tok.bos_id if bos_id is None else bos_id,
              "eos_token_id": stops[0] if len(stops) == 1 else stops}
    if tok.pad_id >= 0:
        config["pad_token_id"] = tok.pad_id
    return config
