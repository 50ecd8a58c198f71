"""The real Llama 2 tokenizer: known ids and round trips."""

import pytest
from conftest import LLAMA2_TOKENIZER

from nabla.errors import TokenizerError
from nabla.tokenizer import SentencePieceTokenizer, load_tokenizer
from nabla.tokenizer.base import IncrementalDecoder


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(LLAMA2_TOKENIZER)


def test_known_ids(tok):
    assert isinstance(tok, SentencePieceTokenizer)
    assert tok.encode("Hello world", bos=False, eos=False) == [15043, 3186]
    assert tok.encode("Hello world", bos=True, eos=True) == [1, 15043, 3186, 2]
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.n_words) == (1, 2, -1, 32000)
    # Byte fallback: an emoji is spelled by its UTF-8 bytes, pieces <0xF0> = 3 + 0xF0.
    assert tok.encode("🦙", bos=False, eos=False)[-4:] == [3 + 0xF0, 3 + 0x9F, 3 + 0xA6, 3 + 0x99]


@pytest.mark.parametrize("text", ["Hello world", "  leading spaces", "naïve café — 東京 🦙", "a\nb\tc", ""])
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text, bos=True, eos=True)) == text


def test_incremental_pieces_join_to_decode(tok):
    ids = tok.encode("Once upon a time, 東京 had a 🦙 named Zoë.", bos=False, eos=False)
    dec = IncrementalDecoder(tok)
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == tok.decode(ids)
    assert "\ufffd" not in "".join(pieces)


def test_missing_and_wrong_files(tmp_path):
    with pytest.raises(TokenizerError, match="not found"):
        load_tokenizer(tmp_path / "nope.model")
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"this is not a sentencepiece model")
    with pytest.raises(TokenizerError):
        load_tokenizer(bad)
