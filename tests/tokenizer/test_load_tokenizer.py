"""load_tokenizer tells the kind from the file's contents, never from its name."""

import shutil

import pytest
from conftest import LLAMA2_TOKENIZER, LLAMA3_TOKENIZER, TINYLLAMA_DIR

from nabla.errors import TokenizerError
from nabla.tokenizer import SentencePieceTokenizer, load_tokenizer, tokenizer_kind
from nabla.tokenizer.hf import HFTokenizer
from nabla.tokenizer.tiktoken import TiktokenTokenizer


def test_kind_from_contents_not_name(tmp_path):
    shutil.copy(LLAMA3_TOKENIZER, tmp_path / "tokenizer.json")
    (tmp_path / "sp").mkdir()
    shutil.copy(LLAMA2_TOKENIZER, tmp_path / "sp" / "tokenizer.json")
    (tmp_path / "hf").mkdir()
    shutil.copy(TINYLLAMA_DIR / "tokenizer.json", tmp_path / "hf" / "tokenizer.model")
    shutil.copy(TINYLLAMA_DIR / "tokenizer_config.json", tmp_path / "hf")
    assert isinstance(load_tokenizer(tmp_path / "tokenizer.json"), TiktokenTokenizer)
    assert isinstance(load_tokenizer(tmp_path / "sp" / "tokenizer.json"), SentencePieceTokenizer)
    assert isinstance(load_tokenizer(tmp_path / "hf" / "tokenizer.model"), HFTokenizer)
    assert tokenizer_kind(LLAMA2_TOKENIZER) == "sentencepiece"


def test_not_a_tokenizer(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"\x00\x01garbage" * 10)
    with pytest.raises(TokenizerError, match="not a tokenizer nabla knows"):
        load_tokenizer(tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        load_tokenizer(tmp_path / "tokenizer.json")
    with pytest.raises(TokenizerError, match="is a folder"):
        load_tokenizer(tmp_path)
    with pytest.raises(TokenizerError, match="not found"):
        load_tokenizer(tmp_path / "missing.model")


def test_broken_tiktoken_file(tmp_path):
    lines = LLAMA3_TOKENIZER.read_bytes().split(b"\n")[:100]
    (tmp_path / "tokenizer.model").write_bytes(b"\n".join(lines[:50] + [b"!!notbase64 x"] + lines[50:]))
    with pytest.raises(TokenizerError):
        load_tokenizer(tmp_path / "tokenizer.model")
