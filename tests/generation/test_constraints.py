"""The vocabulary adapter and grammar-constrained generation through Llama.generate."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
from conftest import LLAMA2_TOKENIZER, LLAMA3_TOKENIZER

import nabla
from nabla.errors import InvalidRequestError
from nabla.generation.constraints import check_schema
from nabla.generation.vocabulary import token_bytes
from nabla.tokenizer import load_tokenizer

STORIES = Path(nabla.__file__).parent / "assets" / "stories"


@pytest.mark.parametrize("path", [LLAMA2_TOKENIZER, LLAMA3_TOKENIZER, STORIES / "tokenizer.model"])
def test_token_bytes_spell_the_text(path):
    tok = load_tokenizer(path)
    vocab = token_bytes(tok)
    assert len(vocab) == tok.n_words and vocab[tok.eos_id] is None
    text = 'Hello {"a": [1, 2.5]} café\n'
    ids = tok.encode(text, bos=False, eos=False)
    assert b"".join(vocab[i] for i in ids).decode().lstrip(" ") == text


@pytest.mark.parametrize("schema, where", [
    ({"type": "object", "properties": {"d": {"format": "date"}}}, "json_schema.properties.d.format"),
    ({"type": "array", "contains": {"type": "integer"}}, "json_schema.contains"),
    ({"type": 5}, "json_schema.type"),
])
def test_unenforceable_or_invalid_schema(schema, where):
    with pytest.raises(InvalidRequestError) as e:
        check_schema(schema)
    assert e.value.param == where


def test_generate_follows_schema():
    llama = nabla.Llama.build(STORIES, max_seq_len=192, max_batch_size=2)
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                               "n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["name", "n"]}
    for temperature in (0, 0.9):
        out = llama.text_completion(["Once upon a time", "A dog"], temperature=temperature, max_gen_len=64,
                                    json_schema=schema)
        for o in out:
            jsonschema.validate(json.loads(o["generation"]), schema)
    free = llama.generate([[1, 100, 200]], 8, temperature=0)[0]
    assert llama.generate([[1, 100, 200]], 8, temperature=0, json_schema=None)[0] == free
