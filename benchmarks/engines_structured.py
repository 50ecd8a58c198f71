"""Which grammar engine: xgrammar, llguidance and outlines-core on the same schemas and vocabularies.

For each engine, tokenizer and schema: compile time, then a random walk through
the grammar (each step: compute the allowed-token mask, draw an allowed token,
feed it back) timed per mask, and whether the finished text parses and
validates with jsonschema. The walk draws uniformly among allowed tokens and,
after 60 steps, prefers tokens that close strings, objects and arrays, so it
ends. Results go in BENCHMARKS.md ("Structured output").

    PYTHONPATH=src python benchmarks/engines_structured.py
"""

from __future__ import annotations

import json
import random
import statistics
import time
from pathlib import Path

import jsonschema
import torch

from nabla.generation.vocabulary import token_bytes
from nabla.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parent.parent
TOKENIZERS = {"stories (SP, 4096)": ROOT / "src/nabla/assets/stories/tokenizer.model",
              "llama2 (SP, 32000)": ROOT / "tests/data/llama2/tokenizer.model"}
SCHEMAS = {
    "object": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                                "age": {"type": "integer", "minimum": 0, "maximum": 120}},
               "required": ["name", "age"], "additionalProperties": False},
    "array": {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 4},
    "enum+anyOf": {"type": "object", "properties": {"c": {"enum": ["red", "green"]},
                                                    "v": {"anyOf": [{"type": "number"}, {"type": "null"}]}},
                   "required": ["c", "v"], "additionalProperties": False},
    "nested $ref": {"$defs": {"p": {"type": "object", "properties": {"x": {"type": "number"}},
                                    "required": ["x"], "additionalProperties": False}},
                    "type": "object", "properties": {"a": {"$ref": "#/$defs/p"},
                                                     "b": {"type": "array", "items": {"$ref": "#/$defs/p"},
                                                           "maxItems": 2}},
                    "required": ["a", "b"], "additionalProperties": False},
    "pattern": {"type": "object", "properties": {"id": {"type": "string", "pattern": "^[a-z]{3}[0-9]{2}$"}},
                "required": ["id"], "additionalProperties": False},
}
CLOSERS = (b'"', b"}", b"]")


class XGrammar:
    name = "xgrammar"

    def __init__(self, vocab, stop_ids, tok):
        import xgrammar as xgr
        self.xgr = xgr
        enc = [b if b is not None else b"" for b in vocab]
        info = xgr.TokenizerInfo(enc, xgr.VocabType.RAW, stop_token_ids=list(stop_ids))
        self.compiler = xgr.GrammarCompiler(info, max_threads=1)
        self.n = len(vocab)

    def compile(self, schema):
        return self.compiler.compile_json_schema(json.dumps(schema), strict_mode=True)

    def start(self, compiled):
        m = self.xgr.GrammarMatcher(compiled)
        bm = self.xgr.allocate_token_bitmask(1, self.n)
        return m, bm

    def mask(self, state):
        m, bm = state
        m.fill_next_token_bitmask(bm)
        return _bits(bm[0], self.n)

    def accept(self, state, t):
        assert state[0].accept_token(t)


class LLGuidance:
    name = "llguidance"

    def __init__(self, vocab, stop_ids, tok):
        import llguidance
        import llguidance.torch as lt
        self.ll, self.lt = llguidance, lt

        class G:
            eos_token_id = stop_ids[0]
            bos_token_id = tok.bos_id
            tokens = [b if b is not None else b"" for b in vocab]
            special_token_ids = [i for i, b in enumerate(vocab) if b is None]

            def __call__(self, s):
                # SentencePiece puts a space before a text's start: tokenize after a newline, drop it.
                s = s.decode("utf-8", "replace") if isinstance(s, bytes) else s
                pre = tok.encode("\n", False, False)
                ids = tok.encode("\n" + s, False, False)
                return ids[len(pre):] if ids[:len(pre)] == pre else tok.encode(s, False, False)
        self.tok = llguidance.LLTokenizer(llguidance.TokenizerWrapper(G()), eos_token=list(stop_ids))
        self.n = len(vocab)

    def compile(self, schema):
        return self.ll.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults={"whitespace_flexible": False})

    def start(self, grammar):
        m = self.ll.LLMatcher(self.tok, grammar, log_level=0)
        assert not m.is_error(), m.get_error()
        return m, self.lt.allocate_token_bitmask(1, self.tok.vocab_size)

    def mask(self, state):
        m, bm = state
        self.lt.fill_next_token_bitmask(m, bm, 0)
        return _bits(bm[0], self.n)

    def accept(self, state, t):
        assert state[0].consume_token(t), state[0].get_error()


class Outlines:
    name = "outlines-core"

    def __init__(self, vocab, stop_ids, tok):
        import outlines_core
        self.oc = outlines_core
        words: dict[bytes, list[int]] = {}
        for i, b in enumerate(vocab):
            if b is not None and b:
                words.setdefault(b, []).append(i)
        self.vocab = outlines_core.Vocabulary(stop_ids[0], words)
        self.n = len(vocab)

    def compile(self, schema):
        regex = self.oc.json_schema.build_regex_from_schema(json.dumps(schema))
        return self.oc.Index(regex, self.vocab)

    def start(self, index):
        return self.oc.Guide(index)

    def mask(self, guide):
        allowed = torch.zeros(self.n, dtype=torch.bool)
        allowed[torch.tensor(guide.get_tokens())] = True
        return allowed

    def accept(self, guide, t):
        guide.advance(t)


def _bits(words: torch.Tensor, n: int) -> torch.Tensor:
    shifts = torch.arange(32, dtype=torch.int32)
    return ((words[:, None] >> shifts) & 1).reshape(-1)[:n].bool()


def walk(engine, compiled, vocab, stop_ids, rng, max_steps=200):
    state = engine.start(compiled)
    out, times = b"", []
    for step in range(max_steps):
        t0 = time.perf_counter()
        allowed = engine.mask(state)
        times.append(time.perf_counter() - t0)
        ids = allowed.nonzero()[:, 0].tolist()
        stops = [i for i in ids if i in stop_ids]
        if stops:
            return out, times
        if step > 60:
            close = [i for i in ids if vocab[i] and any(c in vocab[i] for c in CLOSERS)]
            ids = close or ids
        t = rng.choice(ids)
        out += vocab[t]
        engine.accept(state, t)
    return None, times


def main():
    rows = []
    for tname, path in TOKENIZERS.items():
        tok = load_tokenizer(path)
        vocab = token_bytes(tok)
        stops = list(tok.stop_ids)
        for make in (XGrammar, LLGuidance, Outlines):
            t0 = time.perf_counter()
            engine = make(vocab, stops, tok)
            setup = time.perf_counter() - t0
            for sname, schema in SCHEMAS.items():
                try:
                    t0 = time.perf_counter()
                    compiled = engine.compile(schema)
                    compile_s = time.perf_counter() - t0
                except Exception as e:  # an engine that cannot take the schema
                    rows.append((tname, engine.name, sname, setup, None, None, f"compile failed: {e}"[:60]))
                    continue
                ok, per_mask = 0, []
                for seed in range(3):
                    text, times = walk(engine, compiled, vocab, set(stops), random.Random(seed))
                    per_mask += times
                    if text is not None:
                        try:
                            jsonschema.validate(json.loads(text), schema)
                            ok += 1
                        except Exception as e:
                            print(engine.name, sname, "INVALID", text[:80], str(e)[:80])
                rows.append((tname, engine.name, sname, setup, compile_s, statistics.median(per_mask),
                             f"{ok}/3 valid"))
    print("| tokenizer | engine | schema | setup s | compile ms | median mask us | result |")
    print("|---|---|---|---|---|---|---|")
    for t, e, s, setup, c, m, r in rows:
        cs = "-" if c is None else f"{c * 1e3:.1f}"
        ms = "-" if m is None else f"{m * 1e6:.0f}"
        print(f"| {t} | {e} | {s} | {setup:.2f} | {cs} | {ms} | {r} |")


if __name__ == "__main__":
    main()
