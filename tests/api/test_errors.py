"""Every user mistake is a clear nabla error, never an assert or a torch traceback."""

import json
import shutil

import pytest
import torch
from conftest import LLAMA2_TOKENIZER, TINY_MHA

from nabla import Llama
from nabla.errors import (
    CheckpointError,
    ConfigError,
    ContextLengthError,
    InvalidRequestError,
    NablaError,
    TokenizerError,
)


def copy_ckpt(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        Llama.build(tmp_path / "nope", None, 32, 1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="empty"):
        Llama.build(tmp_path / "empty", None, 32, 1)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("hi")
    with pytest.raises(CheckpointError, match="not a model folder"):
        Llama.build(tmp_path / "other", None, 32, 1)


def test_params_json_problems(make_checkpoint, tmp_path):
    src = make_checkpoint(TINY_MHA)
    d = copy_ckpt(src, tmp_path / "a")
    (d / "params.json").unlink()
    with pytest.raises((ConfigError, CheckpointError), match="params.json"):
        Llama.build(d, None, 32, 1)
    (d / "params.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        Llama.build(d, None, 32, 1)
    (d / "params.json").write_text(json.dumps(TINY_MHA | {"n_heads": 3}))
    with pytest.raises(ConfigError, match="n_heads"):
        Llama.build(d, None, 32, 1)
    (d / "params.json").write_text(json.dumps(TINY_MHA | {"future_knob": 1}))
    with pytest.warns(UserWarning, match="future_knob"):
        Llama.build(d, None, 32, 1)


def test_weights_that_do_not_fit(make_checkpoint, tmp_path):
    d = copy_ckpt(make_checkpoint(TINY_MHA), tmp_path / "b")
    (d / "params.json").write_text(json.dumps(TINY_MHA | {"dim": 128}))
    with pytest.raises(CheckpointError, match="shape"):
        Llama.build(d, None, 32, 1)
    state = torch.load(d / "consolidated.00.pth", weights_only=True)
    del state["layers.1.feed_forward.w2.weight"]
    torch.save(state, d / "consolidated.00.pth")
    (d / "params.json").write_text(json.dumps(TINY_MHA))
    with pytest.raises(CheckpointError, match="layers.1.feed_forward.w2.weight"):
        Llama.build(d, None, 32, 1)
    (d / "consolidated.00.pth").write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="truncated"):
        Llama.build(d, None, 32, 1)


def test_tokenizer_problems(make_checkpoint, tmp_path):
    d = copy_ckpt(make_checkpoint(TINY_MHA), tmp_path / "c")
    (d / "tokenizer.model").unlink()
    with pytest.raises(TokenizerError, match="tokenizer"):
        Llama.build(d, None, 32, 1)
    with pytest.raises(TokenizerError, match="not found"):
        Llama.build(d, tmp_path / "missing.model", 32, 1)
    bad = tmp_path / "bad.model"
    bad.write_text("garbage")
    with pytest.raises(TokenizerError):
        Llama.build(d, bad, 32, 1)
    small = dict(TINY_MHA, vocab_size=1000)
    d2 = make_checkpoint(small, tokenizer=None)
    with pytest.raises(TokenizerError, match="32000 ids but the model's embedding has only 1000"):
        Llama.build(d2, LLAMA2_TOKENIZER, 32, 1)


def test_bad_build_arguments(make_checkpoint):
    d = make_checkpoint(TINY_MHA)
    for kwargs in ({"max_seq_len": 0}, {"max_batch_size": -1}, {"max_seq_len": 1.5}):
        with pytest.raises(ConfigError):
            Llama.build(d, None, **({"max_seq_len": 32, "max_batch_size": 1} | kwargs))
    with pytest.raises(ConfigError, match="device"):
        Llama.build(d, None, 32, 1, device="tpu")


@pytest.fixture(scope="module")
def llama(make_checkpoint):
    return Llama.build(make_checkpoint(TINY_MHA), None, max_seq_len=32, max_batch_size=2)


@pytest.mark.parametrize("call,exc,match", [
    (lambda g: g.generate([[1, 2], [1], [1]], 4), InvalidRequestError, "max_batch_size is 2"),
    (lambda g: g.generate([list(range(1, 40))], 4), ContextLengthError, "39 tokens but the context"),
    (lambda g: g.generate([], 4), InvalidRequestError, "no prompts"),
    (lambda g: g.generate([[]], 4), InvalidRequestError, "empty"),
    (lambda g: g.generate([[1, 2.5]], 4), InvalidRequestError, "integer token ids"),
    (lambda g: g.generate([["a"]], 4), InvalidRequestError, "integer token ids"),
    (lambda g: g.generate([[1, 99999]], 4), InvalidRequestError, "outside the vocabulary"),
    (lambda g: g.generate([[1, -5]], 4), InvalidRequestError, "outside the vocabulary"),
    (lambda g: g.generate([[1]], 4, temperature=-0.1), InvalidRequestError, "temperature"),
    (lambda g: g.generate([[1]], 4, temperature=float("nan")), InvalidRequestError, "temperature"),
    (lambda g: g.generate([[1]], 4, top_p=0), InvalidRequestError, "top_p"),
    (lambda g: g.generate([[1]], 4, top_p=1.5), InvalidRequestError, "top_p"),
    (lambda g: g.generate([[1]], -1), InvalidRequestError, "max_gen_len"),
    (lambda g: g.text_completion("just a string"), InvalidRequestError, "list of strings"),
    (lambda g: g.text_completion(["a " * 40]), ContextLengthError, "context"),
    (lambda g: g.chat_completion([[{"role": "assistant", "content": "hi"}]]), InvalidRequestError, "user"),
    (lambda g: g.chat_completion([[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]]),
     InvalidRequestError, "alternate"),
    (lambda g: g.chat_completion([[{"role": "user"}]]), InvalidRequestError, "content"),
])
def test_bad_requests(llama, call, exc, match):
    with pytest.raises(exc, match=match):
        call(llama)


def test_errors_share_a_base_class():
    for e in (CheckpointError, ConfigError, TokenizerError, InvalidRequestError, ContextLengthError):
        assert issubclass(e, NablaError)
