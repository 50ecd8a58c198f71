"""Hugging Face Llama folders load into nabla and give transformers' logits and tokens."""

import json

import pytest
import torch
from conftest import TINY_GQA, TINY_MHA

from checkpoint.helpers import TOKENS, hf_folder, hf_greedy, hf_logits, nabla_greedy
from nabla import Llama
from nabla.checkpoint import open_checkpoint
from nabla.checkpoint.hf import config_to_args, permute_qk, unpermute_qk
from nabla.errors import ConfigError

SCALED = dict(TINY_GQA, use_scaled_rope=True)
TIED = dict(TINY_GQA, tie_word_embeddings=True)
HEAD_DIM = dict(TINY_GQA, head_dim=32, hidden_dim=96)  # head_dim != dim / n_heads, odd ffn width


def build(path, **kw):
    return Llama.build(path, None, max_seq_len=64, max_batch_size=2, dtype="fp32", **kw)


def assert_same_greedy(llama, hf, n=12):
    ours = nabla_greedy(llama, TOKENS[0], n)
    ref = hf_greedy(hf, TOKENS[0], n)
    assert ours == ref[:len(ours)]
    assert len(ours) == n or ref[len(ours)] in llama.stop_ids


@pytest.mark.parametrize("params", [TINY_MHA, TINY_GQA, SCALED, TIED, HEAD_DIM],
                         ids=["mha", "gqa", "rope-llama3", "tied", "head-dim"])
def test_logits_and_tokens_equal_transformers(tmp_path, params):
    path, hf, _ = hf_folder(tmp_path / "hf", params, seed=3)
    ckpt = open_checkpoint(path)
    assert ckpt.format == "hf" and ckpt.tokenizer_path.name == "tokenizer.json"
    llama = build(path)
    with torch.no_grad():
        ours = llama.model(torch.tensor(TOKENS))
    torch.testing.assert_close(ours, hf_logits(hf), rtol=1e-5, atol=1e-5)
    assert_same_greedy(llama, hf)


def test_sharded_safetensors(tmp_path):
    path, hf, _ = hf_folder(tmp_path / "hf", TINY_GQA, seed=4, max_shard_size="2MB")
    assert (path / "model.safetensors.index.json").is_file()
    ckpt = open_checkpoint(path)
    assert len(ckpt.files) > 1
    llama = build(path)
    with torch.no_grad():
        torch.testing.assert_close(llama.model(torch.tensor(TOKENS)), hf_logits(hf), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("params", [TINY_GQA, TIED], ids=["untied", "tied"])
def test_pytorch_model_bin(tmp_path, params):
    path, hf, _ = hf_folder(tmp_path / "hf", params, seed=5, bin_file=True)
    assert not list(path.glob("*.safetensors"))
    llama = build(path)
    with torch.no_grad():
        torch.testing.assert_close(llama.model(torch.tensor(TOKENS)), hf_logits(hf), rtol=1e-5, atol=1e-5)


def test_transformers4_style_config(tmp_path):
    """rope_theta and rope_scaling at the top level (transformers 4) read like rope_parameters (5)."""
    path, hf, _ = hf_folder(tmp_path / "hf", SCALED, seed=6)
    config = json.loads((path / "config.json").read_text())
    params = config.pop("rope_parameters", None)
    assert params is not None and params["rope_type"] == "llama3"
    config["rope_theta"] = params.pop("rope_theta")
    config["rope_scaling"] = {"type": "llama3", **{k: v for k, v in params.items() if k != "rope_type"}}
    (path / "config.json").write_text(json.dumps(config))
    llama = build(path)
    assert llama.model.args.rope_scaling["original_max_position_embeddings"] == \
        params["original_max_position_embeddings"]
    with torch.no_grad():
        torch.testing.assert_close(llama.model(torch.tensor(TOKENS)), hf_logits(hf), rtol=1e-5, atol=1e-5)


def test_config_fields():
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "intermediate_size": 100, "vocab_size": 300, "rms_norm_eps": 1e-6, "head_dim": 8,
              "tie_word_embeddings": True,
              "rope_parameters": {"rope_type": "default", "rope_theta": 1234.0}}
    args = config_to_args(config)
    assert (args.dim, args.n_layers, args.n_heads, args.n_kv_heads, args.hidden_dim, args.vocab_size,
            args.head_dim, args.norm_eps, args.rope_theta, args.rope_scaling, args.tie_word_embeddings) == \
        (64, 2, 4, 2, 100, 300, 8, 1e-6, 1234.0, None, True)
    with pytest.raises(ConfigError, match="yarn"):
        config_to_args({**config, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ConfigError, match="gelu"):
        config_to_args({**config, "hidden_act": "gelu"})


def test_eos_lists_become_stop_tokens(tmp_path):
    path, _, _ = hf_folder(tmp_path / "hf", TINY_GQA, seed=7)
    config = json.loads((path / "config.json").read_text())
    config["eos_token_id"] = [2, 13]
    (path / "config.json").write_text(json.dumps(config))
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2, 29889]}))
    ckpt = open_checkpoint(path)
    assert ckpt.bos_id == 1 and ckpt.eos_ids == [2, 13, 29889]
    llama = build(path)
    assert set(llama.stop_ids) == {2, 13, 29889}


def test_permute_round_trip():
    w = torch.randn(4 * 16, 64)
    assert torch.equal(unpermute_qk(permute_qk(w, 4), 4), w)
    # within a head, HF row i (first half) and i + 8 (second half) are Meta rows 2i and 2i+1
    hf_rows = permute_qk(w, 4)
    assert torch.equal(hf_rows[3], w[6]) and torch.equal(hf_rows[8 + 3], w[7])


def test_auto_dtype_keeps_bf16(tmp_path):
    path, _, _ = hf_folder(tmp_path / "hf", TINY_GQA, seed=8, dtype=torch.bfloat16)
    assert open_checkpoint(path).dtype == torch.bfloat16
    llama = Llama.build(path, None, max_seq_len=32, max_batch_size=1, dtype="auto", device="cpu")
    # bf16 stays bf16 where it is stored; on a CPU without bf16 arithmetic (nabla.device.bf16_weights_only)
    # only the linear weights do, and products run in fp32.
    assert llama.model.layers[0].attention.wq.weight.dtype == torch.bfloat16
    fp32 = Llama.build(path, None, max_seq_len=32, max_batch_size=1, dtype="fp32", device="cpu")
    assert fp32.model.tok_embeddings.weight.dtype == torch.float32
    tokens = torch.tensor([[1, 15043, 3186, 29892]])
    with torch.inference_mode():  # the checkpoint's values are bf16 already: both compute the same products
        torch.testing.assert_close(llama.model(tokens).float(), fp32.model(tokens), atol=2e-2, rtol=2e-2)
