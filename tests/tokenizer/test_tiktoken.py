"""The real Llama 3 tiktoken tokenizer: known ids, special tokens, round trips."""

import pytest
from conftest import LLAMA3_TOKENIZER

from nabla.tokenizer import load_tokenizer
from nabla.tokenizer.base import IncrementalDecoder
from nabla.tokenizer.tiktoken import TiktokenTokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(LLAMA3_TOKENIZER)


def test_known_ids(tok):
    assert isinstance(tok, TiktokenTokenizer)
    assert tok.encode("Hello world", bos=False, eos=False) == [9906, 1917]
    assert tok.encode(" Once upon a time", bos=False, eos=False) == [9843, 5304, 264, 892]
    assert tok.encode("Hello world", bos=True, eos=True) == [128000, 9906, 1917, 128001]


def test_special_tokens(tok):
    s = tok.special_tokens
    assert len(s) == 256 and tok.n_words == 128256
    assert (s["<|begin_of_text|>"], s["<|end_of_text|>"], s["<|start_header_id|>"], s["<|end_header_id|>"],
            s["<|eot_id|>"]) == (128000, 128001, 128006, 128007, 128009)
    assert s["<|reserved_special_token_0|>"] == 128002 and s["<|reserved_special_token_4|>"] == 128008
    assert s["<|reserved_special_token_5|>"] == 128010 and s["<|reserved_special_token_250|>"] == 128255
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (128000, 128001, -1)
    assert set(tok.stop_ids) == {128001, 128009}


def test_special_text_is_plain_text(tok):
    """As in Meta's encode: a prompt cannot smuggle in a special token."""
    ids = tok.encode("<|eot_id|>", bos=False, eos=False)
    assert 128009 not in ids and tok.decode(ids) == "<|eot_id|>"
    assert tok.encode_with_special("<|eot_id|>") == [128009]


@pytest.mark.parametrize("text", ["Hello world", "naïve café — 日本語 😀", "  two  spaces\n\ttab", ""])
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text, bos=False, eos=False)) == text


def test_long_runs(tok):
    text = "a" * 30_000 + " " * 30_000 + "b"
    assert tok.decode(tok.encode(text, bos=False, eos=False)) == text


def test_incremental_decoding(tok):
    ids = tok.encode("emoji 😀 and 日本", bos=False, eos=False)
    dec = IncrementalDecoder(tok)
    assert "".join(dec.push(i) for i in ids) + dec.flush() == "emoji 😀 and 日本"
