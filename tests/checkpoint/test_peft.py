"""LoRA adapters in PEFT's layout: made by peft and run by nabla, made by nabla and run by peft; bad adapters."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_GQA, TINY_MHA, random_state
from hf_reference import hf_model_from_meta

from nabla import Llama
from nabla.checkpoint.meta import args_from_params
from nabla.checkpoint.peft import Adapter, adapter_of, read_adapter, write_adapter
from nabla.errors import CheckpointError, ConfigError
from nabla.model.lora import LoraSettings, add_lora, lora_layers

peft = pytest.importorskip("peft")

TOKENS = torch.tensor([[1, 450, 4996, 17354, 1701, 432, 17204, 975, 278, 17366, 11203, 29889]])
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def peft_model(params, targets=ALL, r=4, alpha=8.0, seed=0, rslora=False):
    """A peft LoRA model on HF LlamaForCausalLM holding the tiny base, with random (non-zero) adapters."""
    args = args_from_params(params)
    hf = hf_model_from_meta(random_state(args, seed), args)
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0,
                          init_lora_weights=False, use_rslora=rslora)
    torch.manual_seed(seed + 1)
    model = peft.get_peft_model(hf, cfg).eval()
    with torch.no_grad():  # peft's non-default init makes B random too; make it larger so the update shows
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.05)
    return model


@pytest.mark.parametrize("params", [TINY_MHA, TINY_GQA], ids=["mha", "gqa"])
@pytest.mark.parametrize("merge", [False, True], ids=["runtime", "merged"])
def test_peft_adapter_gives_peft_logits_in_nabla(make_checkpoint, tmp_path, params, merge):
    ref = peft_model(params)
    ref.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        want = ref(TOKENS).logits
        base = ref.get_base_model()
        with ref.disable_adapter():
            plain = base(TOKENS).logits
    assert (want - plain).abs().max() > 1e-2  # the adapter changes the logits
    llama = Llama.build(make_checkpoint(params), max_seq_len=64, max_batch_size=1, adapter=tmp_path / "adapter",
                        merge_adapter=merge)
    with torch.no_grad():
        got = llama.model(TOKENS)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_rslora_and_some_targets(make_checkpoint, tmp_path):
    ref = peft_model(TINY_GQA, targets=["q_proj", "down_proj"], r=2, alpha=3.0, rslora=True)
    ref.save_pretrained(tmp_path / "a")
    with torch.no_grad():
        want = ref(TOKENS).logits
    llama = Llama.build(make_checkpoint(TINY_GQA), max_seq_len=64, max_batch_size=1, adapter=tmp_path / "a",
                        merge_adapter=False)
    assert {n.rsplit(".", 1)[1] for n in lora_layers(llama.model)} == {"wq", "w2"}
    with torch.no_grad():
        torch.testing.assert_close(llama.model(TOKENS), want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("params", [TINY_MHA, TINY_GQA], ids=["mha", "gqa"])
def test_nabla_adapter_gives_nabla_logits_in_peft(make_checkpoint, tmp_path, params):
    llama = Llama.build(make_checkpoint(params), max_seq_len=64, max_batch_size=1)
    add_lora(llama.model, LoraSettings(r=4, alpha=8, targets=("wq", "wk", "wv", "wo", "w1", "w2", "w3")))
    torch.manual_seed(5)
    with torch.no_grad():
        for m in lora_layers(llama.model).values():
            m.lora_B.normal_(0, 0.05)
        got = llama.model(TOKENS)
    args = llama.model.args
    files = write_adapter(tmp_path / "mine", adapter_of(llama.model), args)
    assert [f.name for f in files] == ["adapter_config.json", "adapter_model.safetensors"]
    hf = hf_model_from_meta(random_state(args_from_params(params), 0), args_from_params(params))
    ref = peft.PeftModel.from_pretrained(hf, tmp_path / "mine").eval()
    with torch.no_grad():
        want = ref(TOKENS).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    from safetensors import safe_open

    with safe_open(tmp_path / "mine" / "adapter_model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in keys


def test_read_write_round_trip(tmp_path):
    args = args_from_params(TINY_GQA)
    ref = peft_model(TINY_GQA, targets=["k_proj", "up_proj"])
    ref.save_pretrained(tmp_path / "a")
    ad = read_adapter(tmp_path / "a", args)
    write_adapter(tmp_path / "b", ad, args)
    back = read_adapter(tmp_path / "b", args)
    assert back.settings == ad.settings
    for k in ad.tensors:
        torch.testing.assert_close(back.tensors[k], ad.tensors[k], atol=0, rtol=0)


# ----------------------------------------------------------------- bad input
def test_adapter_for_another_base_is_refused(tmp_path):
    ref = peft_model(TINY_MHA)
    ref.save_pretrained(tmp_path / "a")
    other = args_from_params(dict(TINY_MHA, dim=128))
    with pytest.raises(ConfigError, match="another base model"):
        read_adapter(tmp_path / "a", other)
    fewer = args_from_params(dict(TINY_MHA, n_layers=1))
    with pytest.raises(ConfigError, match="layer 1"):
        read_adapter(tmp_path / "a", fewer)


def test_rank_zero_and_missing_files_are_clear(tmp_path):
    ref = peft_model(TINY_MHA, targets=["q_proj"])
    ref.save_pretrained(tmp_path / "a")
    cfg_file = tmp_path / "a" / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps(dict(cfg, r=0)))
    with pytest.raises(ConfigError, match="rank"):
        read_adapter(tmp_path / "a", args_from_params(TINY_MHA))
    cfg_file.write_text(json.dumps(dict(cfg, use_dora=True)))
    with pytest.raises(ConfigError, match="use_dora"):
        read_adapter(tmp_path / "a", args_from_params(TINY_MHA))
    with pytest.raises(CheckpointError, match="adapter_model.safetensors"):
        (tmp_path / "b").mkdir()
        (tmp_path / "b" / "adapter_config.json").write_text("{}")
        read_adapter(tmp_path / "b", args_from_params(TINY_MHA))
    with pytest.raises(CheckpointError, match="not found"):
        read_adapter(tmp_path / "nowhere", args_from_params(TINY_MHA))
    with pytest.raises(ConfigError, match="rank"):
        LoraSettings(r=0)
    with pytest.raises(ConfigError, match="not a projection"):
        LoraSettings(targets=("lm_head",))


def test_unsupported_target_is_refused(tmp_path):
    ref = peft_model(TINY_MHA, targets=["q_proj", "lm_head"])
    ref.save_pretrained(tmp_path / "a")
    with pytest.raises(ConfigError, match="lm_head"):
        read_adapter(tmp_path / "a", args_from_params(TINY_MHA))


def test_adapter_object_holds_meta_names():
    ad = Adapter(LoraSettings(r=2), {"layers.0.attention.wq.lora_A": torch.zeros(2, 64)})
    assert ad.settings.scaling == 8.0
