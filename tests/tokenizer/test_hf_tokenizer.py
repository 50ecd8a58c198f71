"""Hugging Face tokenizer.json (TinyLlama's) against SentencePiece on the same vocabulary."""

import json
import shutil

import pytest
from conftest import LLAMA2_TOKENIZER, STORY_TEXT, TINYLLAMA_DIR

from nabla.errors import TokenizerError
from nabla.tokenizer import load_tokenizer
from nabla.tokenizer.hf import HFTokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(TINYLLAMA_DIR / "tokenizer.json")


@pytest.fixture(scope="module")
def sp():
    return load_tokenizer(LLAMA2_TOKENIZER)


def sample_texts():
    text = STORY_TEXT.read_text(encoding="utf-8")
    paragraphs = [p for p in text[:60_000].split("\n") if p.strip()][:150]
    return paragraphs + ["Hello world", " leading space", "  two  spaces", "tab\there", "line\nbreak",
                         "naïve café — 日本語 😀", "a\u00a0b", "x\u2028y", ""]


def test_known_ids(tok):
    assert isinstance(tok, HFTokenizer)
    assert tok.encode("Hello world", bos=True, eos=False) == [1, 15043, 3186]
    assert tok.encode("Hello world", bos=True, eos=True) == [1, 15043, 3186, 2]
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.n_words, tok.stop_ids) == (1, 2, -1, 32000, (2,))


def test_equals_sentencepiece(tok, sp):
    for text in sample_texts():
        assert tok.encode(text, bos=True, eos=True) == sp.encode(text, bos=True, eos=True), text
        ids = sp.encode(text, bos=True, eos=False)
        assert tok.decode(ids) == sp.decode(ids), text


def test_stop_ids_from_generation_config(tmp_path):
    for f in TINYLLAMA_DIR.iterdir():
        shutil.copy(f, tmp_path / f.name)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 29889]}))
    tok = load_tokenizer(tmp_path / "tokenizer.json")
    assert tok.eos_id == 2 and tok.stop_ids == (2, 29889)


def test_bos_eos_from_config_json(tmp_path):
    shutil.copy(TINYLLAMA_DIR / "tokenizer.json", tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2, 13]}))
    tok = load_tokenizer(tmp_path / "tokenizer.json")
    assert (tok.bos_id, tok.eos_id, tok.stop_ids) == (1, 2, (2, 13))


def test_no_bos_eos_anywhere(tmp_path):
    shutil.copy(TINYLLAMA_DIR / "tokenizer.json", tmp_path)
    with pytest.raises(TokenizerError, match="BOS/EOS"):
        load_tokenizer(tmp_path / "tokenizer.json")
