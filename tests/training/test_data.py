"""Corpus reading and cleaning, token files, batches and bits-per-byte bookkeeping."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nabla.errors import ConfigError
from nabla.tokenizer.sentencepiece import SentencePieceTokenizer
from nabla.training.data import (
    TokenData,
    build_token_files,
    get_batch,
    parse_sources,
    read_documents,
    token_byte_lengths,
    train_tokenizer,
)

GUTENBERG = ("\ufeffThe Project Gutenberg EBook of A Tale\r\n\r\nLicense blah\r\n"
             "*** START OF THIS PROJECT GUTENBERG EBOOK A TALE ***\r\n\r\n"
             "Once there was a fox   \r\nwho lived in a wood.\r\n\r\n[Illustration]\r\n\r\n"
             "The fox was glad.\r\n\r\n"
             "*** END OF THIS PROJECT GUTENBERG EBOOK A TALE ***\r\nLicense text at the end\r\n")

V1 = ("One day, Lily found a needle in her room. She knew it was difficult to play with it because it was sharp. Lily wanted to share.\n"
      "\n"
      "Lily went to her mom and said, \"Mom, I found this needle. Can you share it with me and sew my shirt?\" Her mom smiled.\n"
      "Once upon a time, there was a little car named Beep. Beep loved to go fast and play in the sun. Beep was a healthy car.\n"
      "\n"
      "One day, Beep was driving in the park when he saw a big tree. The tree had many leaves that were falling on the ground.\n")


def test_gutenberg_header_footer_bom_and_crlf_are_stripped(tmp_path):
    p = tmp_path / "book.txt"
    p.write_bytes(GUTENBERG.encode("utf-8"))
    docs = list(read_documents(p))
    text = "".join(t for t, _ in docs)
    assert text == "Once there was a fox who lived in a wood.\n\nThe fox was glad."
    assert docs[-1][1] is True


def test_tinystories_v1_layout_splits_stories_not_paragraphs(tmp_path):
    p = tmp_path / "v1.txt"
    p.write_text(V1, encoding="utf-8")
    docs = [t for t, _ in read_documents(p)]
    assert len(docs) == 2
    assert docs[0].startswith("One day, Lily") and "\n\nLily went" in docs[0]
    assert docs[1].startswith("Once upon a time") and docs[1].endswith("ground.")


def test_endoftext_layout(tmp_path):
    p = tmp_path / "v2.txt"
    p.write_text("A story.\nMore.  \n<|endoftext|>\nB story.\n<|endoftext|>\nC cut off", encoding="utf-8")
    assert [t for t, _ in read_documents(p)] == ["A story.\nMore.", "B story.", "C cut off"]


def test_bad_files_are_skipped_with_a_warning_and_nothing_left_is_an_error(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    (tmp_path / "good.txt").write_text("hello there\n", encoding="utf-8")
    with pytest.warns(UserWarning) as record:
        sources = parse_sources([str(tmp_path)])
    assert [p.name for p in sources[0].files] == ["good.txt"]
    messages = " ".join(str(w.message) for w in record)
    assert "empty" in messages and "not UTF-8" in messages
    (tmp_path / "good.txt").unlink()
    with pytest.warns(UserWarning), pytest.raises(ConfigError, match="no usable training text"):
        parse_sources([str(tmp_path)])
    with pytest.raises(ConfigError, match="no such file"):
        parse_sources([str(tmp_path / "missing")])


def test_vocab_too_large_for_the_corpus(tmp_path):
    p = tmp_path / "small.txt"
    p.write_text("a tiny bit of text\n" * 5, encoding="utf-8")
    with pytest.raises(ConfigError, match="--vocab-size"):
        train_tokenizer(parse_sources([str(p)]), tmp_path / "tok.model", vocab_size=5000)


def test_token_files_weights_split_and_bits_per_byte_table(corpus, tokenizer_path, tmp_path):
    tok = SentencePieceTokenizer(tokenizer_path)
    meta1 = build_token_files(parse_sources([str(corpus)]), tok, tmp_path / "d1", val_fraction=0.1, seed=0)
    meta3 = build_token_files(parse_sources([f"{corpus}*3"]), tok, tmp_path / "d3", val_fraction=0.1, seed=0)
    assert meta3["train_tokens"] == 3 * meta1["train_tokens"]
    assert meta3["val_tokens"] == meta1["val_tokens"] > 0
    data = TokenData(tmp_path / "d1")
    stream = data.train.tolist()
    assert stream[0] == tok.bos_id and stream.count(tok.bos_id) == stream.count(tok.eos_id)
    # Token byte lengths add up to the UTF-8 size of the decoded text.
    doc = stream[1:stream.index(tok.eos_id)]
    assert token_byte_lengths(tok)[doc].sum() == len(tok.decode(doc).encode("utf-8")) + 1  # + dummy-prefix space
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    x, y = get_batch(data.train, 4, 16, g1, torch.device("cpu"))
    assert x.shape == y.shape == (4, 16) and torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(x, get_batch(data.train, 4, 16, g2, torch.device("cpu"))[0])
    with pytest.raises(ConfigError, match="--seq-len"):
        data.check(seq_len=len(data.val))
    assert np.all(data.val < tok.n_words)
