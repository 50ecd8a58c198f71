"""The training loop: loss falls, exact resume, the output folder loads, and bad input fails clearly."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from nabla import cli
from nabla.errors import CheckpointError, ConfigError
from nabla.training import train

from .conftest import TINY


def run(tmp_path, corpus, tokenizer_path, name, **kw):
    return train(data=[str(corpus)], out=str(tmp_path / name), **{**TINY, "tokenizer": str(tokenizer_path), **kw})


def state(path):
    return torch.load(path / "train_state.pt", map_location="cpu", weights_only=True)


def test_cli_loss_falls_and_the_folder_loads_with_llama_build(corpus, tokenizer_path, tmp_path):
    out = tmp_path / "run"
    rc = cli.main(["train", "--data", str(corpus), "--out", str(out), "--preset", "tiny",
                   "--tokenizer", str(tokenizer_path), "--steps", "40", "--lr", "3e-3", "--warmup", "4",
                   "--seq-len", "32", "--batch-size", "8", "--eval-every", "20", "--eval-tokens", "512",
                   "--no-progress"])
    assert rc == 0
    for name in ("params.json", "consolidated.00.pth", "tokenizer.model", "train_state.pt", "log.csv",
                 "loss.png", "summary.json"):
        assert (out / name).is_file(), name
    rows = list(csv.DictReader(open(out / "log.csv")))
    first = float(rows[0]["train_loss"])
    assert first > 0.8 * math.log(320)  # starts near uniform over the vocabulary
    summary = json.loads((out / "summary.json").read_text())
    assert summary["val_loss"] < 0.5 * first
    assert 0 < summary["val_bpb"] < 8
    assert json.loads((out / "params.json").read_text())["vocab_size"] == 320

    from nabla.api import Llama

    llama = Llama.build(out, None, max_seq_len=64, max_batch_size=1)
    text = llama.text_completion(["Once upon a time"], temperature=0.0, max_gen_len=12)[0]["generation"]
    assert isinstance(text, str) and text.strip()


def test_resume_is_bit_identical(corpus, tokenizer_path, tmp_path):
    kw = dict(steps=12, dropout=0.1, lr=3e-3)  # dropout: the RNG state must be restored too
    run(tmp_path, corpus, tokenizer_path, "straight", **kw)
    first = run(tmp_path, corpus, tokenizer_path, "chunked", stop_at=6, **kw)
    assert first["stopped"] and first["step"] == 6
    resumed = train(out=str(tmp_path / "chunked"), resume=True, progress=False)
    assert resumed["step"] == 12 and not resumed["stopped"]
    a, b = state(tmp_path / "straight"), state(tmp_path / "chunked")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for i, s in a["optimizer"]["state"].items():
        assert torch.equal(s["exp_avg_sq"], b["optimizer"]["state"][i]["exp_avg_sq"])
    assert torch.equal(a["batch_rng"], b["batch_rng"])


def test_output_folder_rules(corpus, tokenizer_path, tmp_path):
    run(tmp_path, corpus, tokenizer_path, "out", steps=2)
    with pytest.raises(ConfigError, match="--resume .* --force"):
        run(tmp_path, corpus, tokenizer_path, "out", steps=2)
    with pytest.raises(CheckpointError, match="different architecture"):
        train(out=str(tmp_path / "out"), resume=True, dim=128, progress=False)
    with pytest.raises(CheckpointError, match="nothing to resume"):
        train(out=str(tmp_path / "nothing"), resume=True, progress=False)
    result = run(tmp_path, corpus, tokenizer_path, "out", steps=2, force=True)
    assert result["step"] == 2
    # --init-from continues from the trained weights with a fresh optimizer.
    again = run(tmp_path, corpus, tokenizer_path, "again", steps=1, init_from=str(tmp_path / "out"),
                tokenizer=None)
    assert again["step"] == 1
    with pytest.raises(ConfigError, match="fixed shape"):
        run(tmp_path, corpus, tokenizer_path, "again2", steps=1, init_from=str(tmp_path / "out"), dim=32)


def test_bad_settings_fail_clearly(corpus, tokenizer_path, tmp_path):
    with pytest.raises(ConfigError, match="--seq-len"):
        run(tmp_path, corpus, tokenizer_path, "long", seq_len=100_000, steps=1)
    with pytest.raises(ConfigError, match="--steps"):
        run(tmp_path, corpus, tokenizer_path, "zero", steps=0)
    with pytest.raises(ConfigError, match="--vocab-size"):
        run(tmp_path, corpus, tokenizer_path, "vocab", vocab_size=100, steps=1)
    with pytest.raises(ConfigError, match="--data"):
        train(out=str(tmp_path / "nodata"), progress=False)


def test_out_of_memory_suggests_a_smaller_batch(corpus, tokenizer_path, tmp_path, monkeypatch):
    from nabla.model.llama import Transformer

    def oom(self, tokens, *a, **k):
        raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(Transformer, "forward", oom)
    with pytest.raises(ConfigError, match="smaller --batch-size"):
        run(tmp_path, corpus, tokenizer_path, "oom", steps=1)


def test_sigterm_saves_a_checkpoint_and_stops(corpus, tokenizer_path, tmp_path, monkeypatch):
    import os
    import signal

    import nabla.training.loop as train_module

    calls = []
    real_get_batch = train_module.get_batch

    def get_batch(*a, **k):
        calls.append(1)
        if len(calls) == 3:  # during step 3, as `kill <pid>` would
            os.kill(os.getpid(), signal.SIGTERM)
        return real_get_batch(*a, **k)

    monkeypatch.setattr(train_module, "get_batch", get_batch)
    result = run(tmp_path, corpus, tokenizer_path, "term", steps=50)
    assert result["stopped"] and result["step"] == 3
    assert state(tmp_path / "term")["step"] == 3
    assert (tmp_path / "term" / "consolidated.00.pth").is_file()
