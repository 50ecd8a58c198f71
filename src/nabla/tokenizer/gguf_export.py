"""Any nabla tokenizer as the `tokenizer.*` metadata of a GGUF file (what llama.cpp and nabla.tokenizer.gguf read).

`gguf_vocab(tokenizer, vocab_size)` returns a GGUFVocab:

    SentencePiece tokenizer.model          -> "llama": its pieces, scores and piece types as they are
    tokenizer.json, SentencePiece-style    -> "llama": pieces by id; a piece's score is minus the rank
      BPE (byte fallback, "▁" spaces;         of the first merge that makes it, so SentencePiece's
      Llama 2, Mistral, Gemma, Phi-3)         highest-score-first merging applies the merges in order
    tokenizer.json, byte-level BPE         -> "gpt2": tokens by id, the merges, and `tokenizer.ggml.pre`
      (Qwen2/2.5/3, Llama 3)                  named from its pre-tokenizer regex (qwen2, llama-bpe)
    None                                   -> a stand-in "llama" vocabulary (random weights)

Added tokens are control tokens when special, user-defined otherwise; ids past
the tokenizer's last piece up to the embedding's rows are "[PADn]" (unused),
as convert_hf_to_gguf.py writes them. Whether the text starts with a space
(`add_space_prefix`) is read off the tokenizer itself.

Leaves out: tiktoken tokenizer.model files (Llama 3 from Meta; convert its
tokenizer.json instead), Unigram and WordPiece vocabularies (refused).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from nabla.errors import ConfigError
from nabla.tokenizer.gguf import GPT2_PATTERN, QWEN2_PATTERN

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # llama.cpp's token types

@dataclass
class GGUFVocab:
    model: str
    """tokenizer.ggml.model: "llama" (SentencePiece) or "gpt2" (byte-level BPE)."""
    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None
    merges: list[str] | None = None
    pre: str | None = None
    special: dict[str, int] = field(default_factory=dict)
    """bos / eos / unk / pad / eot -> id."""
    add_bos: bool | None = None
    add_space_prefix: bool | None = None
    chat_template: str | None = None


def _pad(vocab: GGUFVocab, vocab_size: int) -> GGUFVocab:
    """Pad to the embedding's rows (some models have more rows than the tokenizer has pieces)."""
    if len(vocab.tokens) > vocab_size:
        raise ConfigError(f"the tokenizer has {len(vocab.tokens)} tokens but the model's embedding only "
                          f"{vocab_size} rows; pass the model's own tokenizer")
    for i in range(len(vocab.tokens), vocab_size):
        vocab.tokens.append(f"[PAD{i}]")
        vocab.types.append(UNUSED)
        if vocab.scores is not None:
            vocab.scores.append(-1e9)
    return vocab


def _stand_in(vocab_size: int) -> GGUFVocab:
    """<unk>, <s>, </s>, the 256 byte tokens llama.cpp looks up, then placeholder pieces."""
    if vocab_size < 259:
        raise ConfigError(f"a stand-in GGUF vocabulary needs at least 259 tokens, the model has {vocab_size}")
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [UNKNOWN, CONTROL, CONTROL] + [BYTE] * 256
    tokens += [f"\u2581t{i}" for i in range(len(tokens), vocab_size)]
    types += [NORMAL] * (vocab_size - len(types))
    scores = [0.0] * 259 + [-float(i) for i in range(vocab_size - 259)]
    return GGUFVocab("llama", tokens, types, scores, special={"bos": 1, "eos": 2, "unk": 0})


def _sentencepiece(tok) -> GGUFVocab:
    sp = tok.sp
    n = sp.vocab_size()
    types = [UNKNOWN if sp.is_unknown(i) else CONTROL if sp.is_control(i) else BYTE if sp.is_byte(i)
             else UNUSED if sp.is_unused(i) else NORMAL for i in range(n)]
    special = {"bos": sp.bos_id(), "eos": sp.eos_id(), "unk": sp.unk_id()}
    if sp.pad_id() >= 0:
        special["pad"] = sp.pad_id()
    pieces = sp.encode_as_pieces("a")
    return GGUFVocab("llama", [sp.id_to_piece(i) for i in range(n)], types, [float(sp.get_score(i)) for i in range(n)],
                     special=special, add_space_prefix=bool(pieces) and pieces[0].startswith("\u2581"))


def _types_of(node) -> set[str]:
    """Every "type" named in a tokenizer.json component (nested sequences included)."""
    if isinstance(node, dict):
        return ({node["type"]} if isinstance(node.get("type"), str) else set()).union(
            *(_types_of(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(_types_of(v) for v in node))
    return set()


def _split_patterns(node) -> list[str]:
    if isinstance(node, dict):
        found = [node["pattern"]["Regex"]] if node.get("type") == "Split" and isinstance(
            node.get("pattern"), dict) and "Regex" in node["pattern"] else []
        return found + [p for v in node.values() for p in _split_patterns(v)]
    if isinstance(node, list):
        return [p for v in node for p in _split_patterns(v)]
    return []


def _pre_name(j: dict, source: str) -> str:
    from nabla.tokenizer.tiktoken import LLAMA3_PATTERN

    patterns = _split_patterns(j.get("pre_tokenizer"))
    if not patterns:
        return "gpt2"  # ByteLevel's own regex
    known = {QWEN2_PATTERN: "qwen2", LLAMA3_PATTERN: "llama-bpe", GPT2_PATTERN: "gpt2"}
    if len(patterns) == 1 and patterns[0] in known:
        return known[patterns[0]]
    raise ConfigError(f"{source}: its pre-tokenizer splits with {patterns[0][:80]!r}, which is not one nabla can "
                      "name for llama.cpp (qwen2, llama-bpe, gpt2); convert this model with llama.cpp's "
                      "convert_hf_to_gguf.py instead")


def _hf(tok) -> GGUFVocab:
    source = str(getattr(tok, "path", "tokenizer.json"))
    j = json.loads(tok.tk.to_str())
    model = j.get("model") or {}
    if model.get("type") != "BPE":
        raise ConfigError(f"{source} is a {model.get('type')!r} tokenizer; GGUF output writes BPE vocabularies "
                          "(SentencePiece-style or byte-level); convert with llama.cpp's convert_hf_to_gguf.py")
    added = {a["id"]: a for a in j.get("added_tokens") or []}
    by_id = {i: t for t, i in model["vocab"].items()}
    by_id.update({i: a["content"] for i, a in added.items()})
    n = max(by_id) + 1
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(n)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    kinds = _types_of(j.get("pre_tokenizer")) | _types_of(j.get("decoder"))
    types = [UNUSED if i not in by_id or tokens[i] == f"[PAD{i}]"  # an id the converter filled in
             else (CONTROL if added[i].get("special") else USER_DEFINED) if i in added
             else NORMAL for i in range(n)]
    special = {"bos": tok.bos_id, "eos": tok.eos_id}
    if getattr(tok, "pad_id", -1) >= 0:
        special["pad"] = tok.pad_id
    others = [i for i in tok.stop_ids if i != tok.eos_id]
    if others:
        special["eot"] = others[0]
    config = getattr(tok, "config", {}) or {}
    template = config.get("chat_template") if isinstance(config.get("chat_template"), str) else None
    add_bos = config.get("add_bos_token")
    if add_bos is None:  # else the post-processor's template says whether a special token opens the text
        single = [p.get("single") or [] for p in _components(j.get("post_processor"))
                  if p.get("type") == "TemplateProcessing"]
        add_bos = bool(single) and bool(single[0]) and "SpecialToken" in single[0][0] if single else None
    if "ByteLevel" in kinds:
        return GGUFVocab("gpt2", tokens, types, merges=merges, pre=_pre_name(j, source), special=special,
                         add_bos=add_bos, chat_template=template)
    if not (model.get("byte_fallback") or "Metaspace" in kinds or "ByteFallback" in kinds):
        raise ConfigError(f"{source}: a BPE tokenizer that is neither byte-level nor SentencePiece-style; "
                          "convert with llama.cpp's convert_hf_to_gguf.py instead")
    rank: dict[str, int] = {}
    for r, m in enumerate(merges):  # SentencePiece merges the highest-scoring piece first: score = -rank
        rank.setdefault(m.replace(" ", "", 1), r)
    unk = model.get("unk_token")
    for i, t in enumerate(tokens):
        if types[i] == NORMAL and t == unk:
            types[i] = UNKNOWN
        elif types[i] == NORMAL and len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
            types[i] = BYTE
    scores = [-float(rank[t]) if t in rank and types[i] == NORMAL else 0.0 for i, t in enumerate(tokens)]
    if unk in model["vocab"]:
        special["unk"] = model["vocab"][unk]
    prefix = _types_of(j.get("normalizer")) & {"Prepend"} or any(
        p.get("type") == "Metaspace" and p.get("prepend_scheme", "always" if p.get("add_prefix_space", True)
                                               else "never") != "never"
        for p in _components(j.get("pre_tokenizer")))
    return GGUFVocab("llama", tokens, types, scores, special=special, add_space_prefix=bool(prefix),
                     add_bos=add_bos, chat_template=template)


def _components(node) -> list[dict]:
    if isinstance(node, dict):
        return [node] + [c for v in node.values() for c in _components(v)]
    if isinstance(node, list):
        return [c for v in node for c in _components(v)]
    return []


def gguf_vocab(tokenizer, vocab_size: int) -> GGUFVocab:
    """The GGUF vocabulary of a nabla tokenizer (or a stand-in one for None), padded to `vocab_size`."""
    if tokenizer is None:
        return _stand_in(vocab_size)
    if getattr(tokenizer, "sp", None) is not None:
        vocab = _sentencepiece(tokenizer)
    elif getattr(tokenizer, "tk", None) is not None:
        vocab = _hf(tokenizer)
    else:
        raise ConfigError(f"GGUF export writes SentencePiece and Hugging Face tokenizer.json vocabularies, not "
                          f"{type(tokenizer).__name__}; pass the model's tokenizer.json (--tokenizer), or convert "
                          "with llama.cpp's convert_hf_to_gguf.py")
    if vocab.add_bos is None:  # a tokenizer read from GGUF metadata knows; else SentencePiece's habit
        vocab.add_bos = bool(getattr(tokenizer, "add_bos", vocab.model == "llama"))
    return _pad(vocab, vocab_size)
