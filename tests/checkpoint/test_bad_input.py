"""Folders and files that are not what they should be: clear errors, never a torch traceback."""

import json
import shutil

import pytest
import torch
from conftest import TINY_GQA, TINY_MHA, random_state

from checkpoint.helpers import copy_hf_tokenizer, hf_folder, meta_folder, tiny_args
from nabla import Llama
from nabla.checkpoint import open_checkpoint
from nabla.errors import CheckpointError, ConfigError, TokenizerError


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path, _, _ = hf_folder(tmp_path_factory.mktemp("hf") / "model", TINY_GQA, seed=21)
    return path


@pytest.fixture(scope="module")
def meta_dir(make_checkpoint):
    return make_checkpoint(TINY_MHA)


def test_both_formats(tmp_path, hf_dir, meta_dir):
    both = tmp_path / "both"
    shutil.copytree(hf_dir, both)
    for f in meta_dir.iterdir():
        shutil.copy(f, both / f.name)
    with pytest.raises(CheckpointError, match="both a Meta checkpoint"):
        open_checkpoint(both)


def test_neither_format(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(CheckpointError, match="not a model folder.*notes.txt"):
        open_checkpoint(tmp_path)
    (tmp_path / "sub").mkdir()
    with pytest.raises(CheckpointError, match="empty"):
        open_checkpoint(tmp_path / "sub")
    with pytest.raises(CheckpointError, match="does not exist"):
        open_checkpoint(tmp_path / "missing")


def test_half_a_checkpoint(tmp_path, hf_dir, meta_dir):
    a = tmp_path / "a"
    a.mkdir()
    shutil.copy(meta_dir / "params.json", a)
    with pytest.raises(CheckpointError, match="no consolidated"):
        open_checkpoint(a)
    b = tmp_path / "b"
    b.mkdir()
    shutil.copy(hf_dir / "config.json", b)
    with pytest.raises(CheckpointError, match="config.json but no weights"):
        open_checkpoint(b)
    c = tmp_path / "c"
    c.mkdir()
    shutil.copy(meta_dir / "consolidated.00.pth", c)
    with pytest.raises(CheckpointError, match="no params.json"):
        open_checkpoint(c)


def test_truncated_safetensors(tmp_path, hf_dir):
    bad = tmp_path / "bad"
    shutil.copytree(hf_dir, bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        Llama.build(bad, None, max_seq_len=32, max_batch_size=1)


def test_truncated_pth(tmp_path, meta_dir):
    bad = tmp_path / "bad"
    shutil.copytree(meta_dir, bad)
    data = (bad / "consolidated.00.pth").read_bytes()
    (bad / "consolidated.00.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        Llama.build(bad, None, max_seq_len=32, max_batch_size=1)


def test_index_names_missing_shard(tmp_path):
    path, _, _ = hf_folder(tmp_path / "hf", TINY_GQA, seed=22, max_shard_size="2MB")
    shards = sorted(path.glob("model-*.safetensors"))
    shards[-1].unlink()
    with pytest.raises(CheckpointError, match=f"{shards[-1].name}.*download the missing"):
        open_checkpoint(path)


def test_index_that_is_not_json(tmp_path):
    path, _, _ = hf_folder(tmp_path / "hf", TINY_GQA, seed=22, max_shard_size="2MB")
    (path / "model.safetensors.index.json").write_text("{oops")
    with pytest.raises(CheckpointError, match="not a valid index"):
        open_checkpoint(path)


@pytest.mark.parametrize("change,name", [({"model_type": "mixtral", "architectures": ["MixtralForCausalLM"]},
                                          "mixtral.*mixture-of-experts"),
                                         ({"model_type": "falcon", "architectures": ["FalconForCausalLM"]},
                                          "falcon.*model types llama, mistral"),
                                         ({"model_type": "llama", "architectures": ["GPT2LMHeadModel"]},
                                          "GPT2LMHeadModel")])
def test_not_llama(tmp_path, hf_dir, change, name):
    bad = tmp_path / "bad"
    shutil.copytree(hf_dir, bad)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ConfigError, match=name):
        Llama.build(bad, None, max_seq_len=32, max_batch_size=1)


def test_config_that_does_not_fit_weights(tmp_path, hf_dir):
    bad = tmp_path / "bad"
    shutil.copytree(hf_dir, bad)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "num_attention_heads": 8, "head_dim": 16}))
    with pytest.raises(CheckpointError, match="q_proj.*does not fit"):
        open_checkpoint(bad)


def test_unexpected_weight(tmp_path, hf_dir):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(hf_dir, bad)
    sd = load_file(bad / "model.safetensors")
    sd["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    save_file(sd, bad / "model.safetensors")
    with pytest.raises(CheckpointError, match="q_proj.bias"):
        open_checkpoint(bad)


def test_tokenizer_larger_than_embedding(tmp_path):
    """Fewer tokenizer ids than embedding rows is normal (padded embeddings); more is an error."""
    small = dict(TINY_GQA, vocab_size=1000)
    state = random_state(tiny_args(small), seed=23)
    path = meta_folder(tmp_path / "meta", small, state, tokenizer=None)
    copy_hf_tokenizer(path)  # 32000 ids
    with pytest.raises(TokenizerError, match="32000 ids.*1000 rows"):
        Llama.build(path, None, max_seq_len=32, max_batch_size=1)
    padded = dict(TINY_GQA, vocab_size=32064)
    path = meta_folder(tmp_path / "padded", padded, random_state(tiny_args(padded), seed=23), tokenizer=None)
    copy_hf_tokenizer(path)
    llama = Llama.build(path, None, max_seq_len=32, max_batch_size=1)
    assert llama.model.args.vocab_size == 32064 and llama.tokenizer.n_words == 32000


def test_missing_tokenizer(tmp_path):
    state = random_state(tiny_args(TINY_MHA), seed=24)
    path = meta_folder(tmp_path / "meta", TINY_MHA, state, tokenizer=None)
    with pytest.raises(TokenizerError, match="tokenizer_path"):
        Llama.build(path, None, max_seq_len=32, max_batch_size=1)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_weights_the_config_does_not_use(tmp_path, meta_dir):
    bad = _copy(meta_dir, tmp_path / "bad")
    params = json.loads((bad / "params.json").read_text())
    (bad / "params.json").write_text(json.dumps({**params, "n_layers": params["n_layers"] - 1}))
    with pytest.raises(CheckpointError, match=r"config does not use: layers\.1\."):
        Llama.build(bad, None, max_seq_len=32, max_batch_size=1)


def test_nan_or_infinite_weights_are_refused(tmp_path, meta_dir):
    for value in (float("nan"), float("inf")):
        bad = _copy(meta_dir, tmp_path / f"bad-{value}")
        state = torch.load(bad / "consolidated.00.pth", weights_only=True)
        state["layers.0.feed_forward.w2.weight"][3, 5] = value
        torch.save(state, bad / "consolidated.00.pth")
        with pytest.raises(CheckpointError, match=r"layers\.0\.feed_forward\.w2\.weight holds NaN or infinite"):
            Llama.build(bad, None, max_seq_len=32, max_batch_size=1)


def test_empty_pth_and_params_without_dim(tmp_path, meta_dir):
    bad = _copy(meta_dir, tmp_path / "empty")
    (bad / "consolidated.00.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"consolidated\.00\.pth is empty \(0 bytes\)"):
        Llama.build(bad, None, max_seq_len=32, max_batch_size=1)
    bad = _copy(meta_dir, tmp_path / "nodim")
    params = json.loads((bad / "params.json").read_text())
    del params["dim"]
    (bad / "params.json").write_text(json.dumps(params))
    with pytest.raises(ConfigError, match="params.json has no 'dim'"):
        Llama.build(bad, None, max_seq_len=32, max_batch_size=1)


def test_info_verify_checks_the_checklist(tmp_path, meta_dir, capsys):
    import hashlib

    from nabla.cli import main

    folder = _copy(meta_dir, tmp_path / "download")
    names = sorted(p.name for p in folder.iterdir())
    (folder / "checklist.chk").write_text(
        "".join(f"{hashlib.md5((folder / n).read_bytes()).hexdigest()}  {n}\n" for n in names))
    assert main(["info", "--model", str(folder), "--verify"]) == 0
    assert all(f"ok   {n}" in capsys.readouterr().out for n in names[:1])
    # 4 KB of random bytes inside the weights: torch may still load it, the checklist does not.
    raw = bytearray((folder / "consolidated.00.pth").read_bytes())
    raw[len(raw) // 2: len(raw) // 2 + 4096] = torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes()
    (folder / "consolidated.00.pth").write_bytes(bytes(raw))
    assert main(["info", "--model", str(folder), "--verify"]) == 1
    err = capsys.readouterr().err
    assert "1 of 3 files" in err and "consolidated.00.pth: MD5 differs" in err and "Traceback" not in err
    (folder / "checklist.chk").unlink()
    assert main(["info", "--model", str(folder), "--verify"]) == 1
    assert "has no checklist.chk" in capsys.readouterr().err
