"""The families outside the model: convert, info, quantization, tensor parallel, bad config.json."""

import json

import pytest
import torch
from hf_families import MORE, PROMPT, save_family

from nabla import Llama
from nabla.checkpoint import open_checkpoint
from nabla.checkpoint.convert import convert_checkpoint
from nabla.checkpoint.hf import config_to_args
from nabla.checkpoint.info import checkpoint_info
from nabla.distributed.tensor_parallel import check_divisible
from nabla.errors import ConfigError, NablaError

IDS = torch.tensor([PROMPT + MORE])


def logits(path, **kw):
    llama = Llama.build(path, None, max_seq_len=64, max_batch_size=1, dtype="fp32", device="cpu", **kw)
    with torch.inference_mode():
        return llama.model(IDS)


@pytest.mark.parametrize("family", ["phi3", "gemma2", "qwen2"])
def test_convert_to_hf_round_trip(tmp_path, family):
    src, hf = save_family(tmp_path / "src", family)
    convert_checkpoint(src, tmp_path / "out", "hf")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == hf.config.model_type
    torch.testing.assert_close(logits(tmp_path / "out"), logits(src), rtol=0, atol=0)
    import transformers  # and transformers reads the converted folder as the same model

    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(IDS).logits, hf(IDS).logits, rtol=0, atol=1e-5)  # sdpa vs eager


@pytest.mark.parametrize("to,family", [("meta", "gemma"), ("gguf", "gemma2")])
def test_convert_to_a_format_that_cannot_hold_the_family_is_an_error(tmp_path, to, family):
    # GGUF holds every family (tests/checkpoint/test_gguf_families.py), but not a Gemma 2 whose
    # query_pre_attn_scalar (20 here) differs from the one llama.cpp infers
    src, _ = save_family(tmp_path / "src", family)
    with pytest.raises(NablaError, match=f"'{family}' model.*--to hf"):
        convert_checkpoint(src, tmp_path / "out", to)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_info_names_the_family(tmp_path):
    src, _ = save_family(tmp_path / "src", "gemma2")
    a = checkpoint_info(src)["architecture"]
    assert a["model_type"] == "gemma2" and a["switches"]["sliding_window"] == 6
    assert a["switches"]["attn_logit_softcap"] == 0.5


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_biases(tmp_path, mode):
    src, _ = save_family(tmp_path / "src", "qwen2")
    exact, quant = logits(src), logits(src, quantize=mode)
    # weight-only quantization moves the logits a little; dropping the q/k/v biases would move them a lot
    assert (quant - exact).abs().max() < {"int8": 0.05, "int4": 0.15}[mode] * exact.abs().max()
    llama = Llama.build(src, None, max_seq_len=64, max_batch_size=1, dtype="fp32", device="cpu", quantize=mode)
    assert llama.model.layers[0].attention.wq.bias is not None


def test_tensor_parallel_refuses_qkv_biases(tmp_path):
    src, _ = save_family(tmp_path / "src", "qwen2")
    with pytest.raises(ConfigError, match="biases of q, k and v"):
        check_divisible(open_checkpoint(src).args, 2)
    check_divisible(open_checkpoint(save_family(tmp_path / "g", "gemma2")[0]).args, 2)  # no biases: fine


BASE = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 96, "vocab_size": 300,
        "max_position_embeddings": 64}


@pytest.mark.parametrize("change,match", [
    ({"model_type": "mixtral", "architectures": ["MixtralForCausalLM"]}, "'mixtral'.*mixture-of-experts"),
    ({"model_type": "qwen3_moe"}, "'qwen3_moe'.*mixture-of-experts"),
    ({"model_type": "bloom"}, "'bloom'.*model types llama, mistral, qwen2"),
    ({"num_experts": 8}, "'qwen2'.*mixture-of-experts"),
    ({"partial_rotary_factor": 0.5}, "'qwen2'.*partial rotary"),
    ({"hidden_act": "gelu"}, "'qwen2'.*hidden_act 'gelu'"),
    ({"attn_logit_softcapping": 30.0}, "'qwen2'.*attn_logit_softcapping"),
    ({"mlp_bias": True}, "'qwen2'.*mlp_bias"),
    ({"rope_scaling": {"rope_type": "mrope", "factor": 2.0}}, "'mrope' is not supported"),
    ({"architectures": ["Qwen2ForSequenceClassification"]}, "Qwen2ForSequenceClassification"),
])
def test_unimplemented_config_is_a_config_error(change, match):
    with pytest.raises(ConfigError, match=match):
        config_to_args({**BASE, **change})
