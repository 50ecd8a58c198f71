"""Every family nabla runs takes a PEFT LoRA adapter, and fine-tunes, on tiny random models transformers saves.

Qwen2 (biases on q/k/v, a tied head) and Gemma (unit-offset norms, scaled embeddings, gelu) take an adapter
on all seven projections that peft made, and nabla's logits equal peft's. Phi-3 stores q/k/v and gate/up
fused (qkv_proj, gate_up_proj), so PEFT adapts those fused modules; nabla splits the base weights at load
and the fused adapter with them (each part keeps A and takes its rows of B), and gives peft's logits too.
An adapter nabla makes on Phi-3 is written under those fused names (the parts stacked: rank n r, B
block-diagonal), so peft loads it onto Phi3ForCausalLM and gives nabla's logits; nabla reads it back too.
A short `finetune` on the Qwen2 model trains only the adapter.
"""

from __future__ import annotations

import json

import pytest
import torch
from hf_families import PROMPT, save_family

from nabla import Llama
from nabla.errors import CheckpointError

peft = pytest.importorskip("peft")
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TOKENS = torch.tensor([PROMPT])


def peft_adapter(hf, out, targets=ALL, seed=1):
    """peft's LoRA on `hf` with random (non-zero) A and B, saved to `out`; returns the peft model."""
    cfg = peft.LoraConfig(r=4, lora_alpha=8.0, target_modules=targets, lora_dropout=0.0, init_lora_weights=False)
    torch.manual_seed(seed)
    model = peft.get_peft_model(hf, cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.05)
    model.save_pretrained(out)
    return model


@pytest.mark.parametrize("family", ["qwen2", "gemma"])
@pytest.mark.parametrize("merge", [False, True], ids=["runtime", "merged"])
def test_peft_adapter_gives_peft_logits(tmp_path, family, merge):
    path, hf = save_family(tmp_path / "base", family)
    with torch.no_grad():
        plain = hf(TOKENS).logits
    ref = peft_adapter(hf, tmp_path / "adapter")
    with torch.no_grad():
        want = ref(TOKENS).logits
    assert (want - plain).abs().max() > 1e-2  # the adapter changes the logits
    llama = Llama.build(path, None, max_seq_len=64, max_batch_size=1, dtype="fp32", device="cpu",
                        adapter=tmp_path / "adapter", merge_adapter=merge)
    with torch.no_grad():
        got = llama.model(TOKENS)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


# Phi-3 has no q_proj, k_proj, v_proj, gate_proj or up_proj of its own: PEFT names the fused modules.
@pytest.mark.parametrize("targets", [["qkv_proj", "o_proj", "gate_up_proj", "down_proj"], ["qkv_proj"],
                                     ["gate_up_proj"]], ids=["all", "qkv", "gate_up"])
@pytest.mark.parametrize("merge", [False, True], ids=["runtime", "merged"])
def test_phi3_fused_adapter_gives_peft_logits(tmp_path, targets, merge):
    path, hf = save_family(tmp_path / "base", "phi3")
    with torch.no_grad():
        plain = hf(TOKENS).logits
    ref = peft_adapter(hf, tmp_path / "adapter", targets=targets)
    with torch.no_grad():
        want = ref(TOKENS).logits
    assert (want - plain).abs().max() > 1e-2
    llama = Llama.build(path, None, max_seq_len=64, max_batch_size=1, dtype="fp32", device="cpu",
                        adapter=tmp_path / "adapter", merge_adapter=merge)
    with torch.no_grad():
        torch.testing.assert_close(llama.model(TOKENS), want, atol=1e-4, rtol=0)


def test_fused_adapter_on_an_unfused_family_is_refused(tmp_path):
    _, phi3 = save_family(tmp_path / "phi3", "phi3")
    peft_adapter(phi3, tmp_path / "adapter", targets=["qkv_proj"])
    path, _ = save_family(tmp_path / "base", "llama")
    with pytest.raises(CheckpointError, match="fused module 'self_attn.qkv_proj'"):
        Llama.build(path, None, max_seq_len=64, max_batch_size=1, dtype="fp32", device="cpu",
                    adapter=tmp_path / "adapter")


# nabla's own Phi-3 adapter: all seven projections, a part of q/k/v and gate/up, rank-stabilised scaling.
@pytest.mark.parametrize("targets,rslora", [(("wq", "wk", "wv", "wo", "w1", "w2", "w3"), False),
                                            (("wq", "wv", "w3"), False), (("wk", "w1", "w2"), True)],
                         ids=["all", "some", "rslora"])
def test_nabla_phi3_adapter_loads_in_peft(tmp_path, targets, rslora):
    import transformers

    from nabla.checkpoint.peft import adapter_of, read_adapter, write_adapter
    from nabla.model.lora import LoraSettings, add_lora

    path, _ = save_family(tmp_path / "base", "phi3")
    llama = Llama.build(path, None, max_seq_len=64, max_batch_size=1, dtype="fp32", device="cpu")
    with torch.no_grad():
        plain = llama.model(TOKENS)
    add_lora(llama.model, LoraSettings(r=4, alpha=8.0, targets=targets, rslora=rslora))
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in llama.model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.05)
        mine = llama.model(TOKENS)
    assert (mine - plain).abs().max() > 1e-2
    write_adapter(tmp_path / "adapter", adapter_of(llama.model), llama.model.args)
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert not {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"} & set(cfg["target_modules"])

    hf = transformers.Phi3ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ref = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    ranks = {n.split(".lora_A")[0].rsplit(".", 1)[-1]: w.shape[0] for n, w in ref.named_parameters() if "lora_A" in n}
    assert ranks == {m: {"qkv_proj": 12, "gate_up_proj": 8}.get(m, 4) for m in cfg["target_modules"]}
    with torch.no_grad():
        torch.testing.assert_close(ref(TOKENS).logits, mine, atol=1e-4, rtol=0)

    back = read_adapter(tmp_path / "adapter", llama.model.args)
    assert back.settings.r == 4 and back.settings.scaling == pytest.approx(llama.model.lora.scaling)
    again = Llama.build(path, None, max_seq_len=64, max_batch_size=1, dtype="fp32", device="cpu",
                        adapter=tmp_path / "adapter", merge_adapter=False)
    with torch.no_grad():
        torch.testing.assert_close(again.model(TOKENS), mine, atol=1e-4, rtol=0)


def test_qwen2_finetunes_only_the_adapter(tmp_path):
    from safetensors.torch import load_file

    from nabla.training.finetune import finetune

    path, _ = save_family(tmp_path / "base", "qwen2")
    before = {k: v.clone() for k, v in load_file(path / "model.safetensors").items()}
    chats = tmp_path / "chats.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"What does the parrot say, number {i}?"},
                          {"role": "assistant", "content": f"Biscuit says the nutmeg costs {i} pearls."}]}
            for i in range(40)]
    chats.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = finetune(model=str(path), data=[str(chats)], out=str(tmp_path / "a"), dtype="fp32", device="cpu",
                 rank=4, alpha=8.0, seq_len=32, batch_size=4, steps=6, warmup=1, eval_every=3, eval_tokens=256,
                 save_every=100, lr=1e-2, progress=False, seed=0)
    assert r["step"] == 6 and torch.isfinite(torch.tensor(r["val_loss"]))
    after = load_file(path / "model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    state = torch.load(tmp_path / "a" / "finetune_state.pt", weights_only=True)
    assert len(state["optimizer"]["state"]) == 2 * 7 * 3  # A and B of 7 projections in 3 layers, nothing else
    base = Llama.build(path, None, max_seq_len=64, max_batch_size=1, dtype="fp32", device="cpu")
    tuned = Llama.build(path, None, max_seq_len=64, max_batch_size=1, dtype="fp32", device="cpu",
                        adapter=tmp_path / "a", merge_adapter=False)
    with torch.no_grad():
        assert (tuned.model(TOKENS) - base.model(TOKENS)).abs().max() > 1e-3  # the adapter moved
    base_state = {k: v for k, v in base.model.state_dict().items()}
    tuned_base = {k.replace(".base.", "."): v for k, v in tuned.model.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(base_state[k], tuned_base[k]) for k in base_state)
