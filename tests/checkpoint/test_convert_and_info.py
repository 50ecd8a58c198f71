"""`nabla convert` round trips bit-exactly and converted models give identical logits; `nabla info`."""

import json

import pytest
import torch
from conftest import TINY_GQA, TINY_MHA, random_state

from checkpoint.helpers import TOKENS, hf_folder, hf_logits, meta_folder, tiny_args
from nabla import Llama
from nabla.checkpoint import open_checkpoint
from nabla.checkpoint.convert import convert_checkpoint
from nabla.checkpoint.info import checkpoint_info
from nabla.cli import main

SCALED_TIED = dict(TINY_GQA, use_scaled_rope=True, tie_word_embeddings=True)


def logits(path, dtype="fp32"):
    llama = Llama.build(path, None, max_seq_len=32, max_batch_size=1, dtype=dtype)
    with torch.no_grad():
        return llama.model(torch.tensor(TOKENS))


@pytest.mark.parametrize("params", [TINY_MHA, SCALED_TIED], ids=["mha", "gqa-scaled-tied"])
def test_meta_hf_meta_is_bit_exact(tmp_path, params):
    state = random_state(tiny_args(params), seed=31)
    src = meta_folder(tmp_path / "meta", params, state)
    convert_checkpoint(src, tmp_path / "hf", "hf")
    convert_checkpoint(tmp_path / "hf", tmp_path / "back", "meta")
    back = torch.load(tmp_path / "back" / "consolidated.00.pth", weights_only=True)
    want = {k: v for k, v in state.items() if not (params.get("tie_word_embeddings") and k == "output.weight")}
    assert set(back) == set(want)
    for key in want:
        assert back[key].dtype == want[key].dtype and torch.equal(back[key], want[key]), key
    a, b = open_checkpoint(src).args, open_checkpoint(tmp_path / "back").args
    ignore = ("multiple_of", "ffn_dim_multiplier")  # HF stores the feed-forward width itself
    assert {k: v for k, v in a.as_dict().items() if k not in ignore} == \
        {k: v for k, v in b.as_dict().items() if k not in ignore}
    assert (tmp_path / "back" / "tokenizer.model").read_bytes() == (src / "tokenizer.model").read_bytes()
    assert torch.equal(logits(src), logits(tmp_path / "hf"))


def test_hf_output_loads_in_transformers(tmp_path):
    from transformers import LlamaForCausalLM

    params = dict(TINY_GQA, use_scaled_rope=True)
    src = meta_folder(tmp_path / "meta", params, random_state(tiny_args(params), seed=32))
    convert_checkpoint(src, tmp_path / "hf", "hf")
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").float().eval()
    torch.testing.assert_close(logits(src), hf_logits(hf), rtol=1e-5, atol=1e-5)


def test_hf_to_sharded_meta(tmp_path):
    path, hf, _ = hf_folder(tmp_path / "hf", TINY_MHA, seed=33)
    convert_checkpoint(path, tmp_path / "mp2", "meta", shards=2, vocab_parallel_embedding=True)
    assert sorted(p.name for p in (tmp_path / "mp2").glob("*.pth")) == ["consolidated.00.pth", "consolidated.01.pth"]
    assert (tmp_path / "mp2" / "tokenizer.json").is_file()
    torch.testing.assert_close(logits(tmp_path / "mp2"), hf_logits(hf), rtol=1e-5, atol=1e-5)


def test_dtype_and_force(tmp_path):
    state = random_state(tiny_args(TINY_MHA), seed=34)
    src = meta_folder(tmp_path / "meta", TINY_MHA, state)
    out = tmp_path / "out"
    convert_checkpoint(src, out, "meta", shards=4)
    with pytest.raises(Exception, match="--force"):
        convert_checkpoint(src, out, "hf", dtype="bf16")
    convert_checkpoint(src, out, "hf", dtype="bf16", force=True)
    assert not list(out.glob("*.pth")) and not (out / "params.json").exists()  # stale shards cleared
    ckpt = open_checkpoint(out)
    assert ckpt.format == "hf" and ckpt.dtype == torch.bfloat16
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_info(make_checkpoint, tmp_path):
    info = checkpoint_info(make_checkpoint(TINY_GQA), context=128, batch=2)
    a = info["architecture"]
    assert info["format"] == "meta" and (a["dim"], a["n_layers"], a["n_kv_heads"], a["vocab_size"]) == (64, 2, 2, 32000)
    assert info["parameters"] == sum(v.numel() for v in random_state(tiny_args(TINY_GQA)).values())
    assert info["tokenizer"]["kind"] == "sentencepiece" and info["tokenizer"]["n_words"] == 32000
    m = info["memory"]
    assert m["kv_cache_bytes"] == 2 * 2 * 2 * 128 * 2 * 16 * 4  # k and v, layers, batch, context, kv heads, hd, fp32
    assert m["weights_bytes"] == info["parameters"] * 4


def test_cli_end_to_end(make_checkpoint, tmp_path, capsys):
    src = make_checkpoint(TINY_MHA)
    assert main(["info", "--model", str(src), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "meta" and info["dtype"] == "float32"
    assert main(["info", "--model", str(src)]) == 0
    text = capsys.readouterr().out
    assert "parameters" in text and "KV cache" in text and "sentencepiece" in text
    out = tmp_path / "hf"
    assert main(["convert", "--model", str(src), "--out", str(out), "--to", "hf"]) == 0
    assert "model.safetensors" in capsys.readouterr().out
    assert main(["info", "--model", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["format"] == "hf"
    assert main(["convert", "--model", str(src), "--out", str(out), "--to", "hf"]) == 1
    assert "--force" in capsys.readouterr().err
    assert main(["convert", "--model", str(out), "--out", str(tmp_path / "m"), "--to", "hf", "--shards", "2"]) == 1
    assert main(["info", "--model", str(tmp_path / "nothing")]) == 1
    assert "does not exist" in capsys.readouterr().err
    torch.testing.assert_close(logits(src), logits(out), rtol=0, atol=0)
