"""LoRA fine-tuning: the layers (merge, quantized bases), what trains, the data, the run, and peft agreeing."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_GQA, TINY_MHA, random_state
from hf_reference import hf_model_from_meta

from nabla import Llama
from nabla.checkpoint.meta import args_from_params
from nabla.errors import ConfigError
from nabla.model.llama import Transformer
from nabla.model.lora import LoRALinear, LoraSettings, add_lora, lora_layers, merge_and_unload, merge_lora, unmerge_lora
from nabla.model.quantize import Int4Linear, Int8Linear, quantize_model
from nabla.training import finetune_data as fd
from nabla.training.finetune import finetune
from nabla.training.loop import configure_optimizer

TOKENS = torch.tensor([[1, 450, 4996, 17354, 1701, 432, 17204, 975, 278, 17366, 11203, 29889]])
FAST = dict(seq_len=16, batch_size=4, steps=6, warmup=1, eval_every=3, eval_tokens=64, save_every=3,
            val_fraction=0.2, progress=False, rank=4, lr=1e-2)
# A text the built-in story model has not seen: invented names, places and trades.
SEA_TEXT = """Captain Marlow sailed the brig Seahorse across the Coral Sea every winter, trading kettles for pearls.
The crew of the Seahorse sang shanties about the lighthouse at Port Ember, where the keeper painted the lamp green.
Every sailor on the Seahorse knew that the compass pointed to the nutmeg islands when the moon was full.

Captain Marlow kept a parrot named Biscuit, who shouted the price of nutmeg whenever a merchant came aboard.
Biscuit the parrot hated the lighthouse at Port Ember, because the green lamp kept him awake all night.
The brig Seahorse carried copper kettles south and brought pearls and nutmeg north again.

When the storm came, Captain Marlow tied the wheel and Biscuit hid in a copper kettle until morning.
At dawn the crew saw the green lamp of Port Ember and sang the shanty of the Coral Sea.
The merchants of Port Ember paid for the nutmeg with pearls, and Biscuit shouted the price twice.
"""


def tiny_model(params=TINY_MHA, seed=0) -> Transformer:
    args = args_from_params(params)
    model = Transformer(args)
    model.load_state_dict(random_state(args, seed), strict=False)
    return model.eval()


def randomize_b(model, seed=3):
    torch.manual_seed(seed)
    with torch.no_grad():
        for m in lora_layers(model).values():
            m.lora_B.normal_(0, 0.05)


# ------------------------------------------------------------------- layers
def test_fresh_adapter_changes_nothing_and_merged_equals_unmerged():
    model = tiny_model(TINY_GQA)
    with torch.no_grad():
        plain = model(TOKENS)
    add_lora(model, LoraSettings(r=4, alpha=8))
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS), plain, atol=0, rtol=0)  # B starts at zero
    randomize_b(model)
    with torch.no_grad():
        unmerged = model(TOKENS)
        merge_lora(model)
        merged = model(TOKENS)
        unmerge_lora(model)
        back = model(TOKENS)
    assert (unmerged - plain).abs().max() > 1e-2
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)
    torch.testing.assert_close(back, unmerged, atol=1e-5, rtol=0)
    merge_and_unload(model)
    assert not lora_layers(model)
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS), unmerged, atol=1e-5, rtol=0)


def test_bf16_base_keeps_fp32_adapters():
    model = tiny_model().to(torch.bfloat16)
    add_lora(model, LoraSettings(r=2))
    m = lora_layers(model)["layers.0.attention.wq"]
    assert m.base.weight.dtype == torch.bfloat16 and m.lora_A.dtype == torch.float32
    model(TOKENS).sum().backward()
    assert m.lora_B.grad is not None and m.base.weight.grad is None


@pytest.mark.parametrize("mode,kind", [("int8", Int8Linear), ("int4", Int4Linear)])
def test_quantized_base_stays_quantized_and_trains(mode, kind):
    model = quantize_model(tiny_model(), mode)
    add_lora(model, LoraSettings(r=4))
    layer = lora_layers(model)["layers.1.feed_forward.w2"]
    assert isinstance(layer.base, kind) and layer.base.weight.dtype in (torch.int8, torch.uint8)
    randomize_b(model)
    with torch.no_grad():
        fast = model(TOKENS)  # the quantized kernels
    loss = model(TOKENS).float().logsumexp(-1).mean()  # with gradients: the dequantized product
    loss.backward()
    assert layer.lora_A.grad is not None and layer.lora_A.grad.abs().sum() > 0
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS), fast, atol=1e-3, rtol=0)
    with pytest.raises(ConfigError, match="int8/int4"):
        merge_lora(model)


def test_only_adapters_train_and_the_optimizer_holds_only_them():
    from nabla.training.finetune import FinetuneConfig

    model = tiny_model()
    add_lora(model, LoraSettings(r=4, targets=("q_proj", "v_proj", "w2")))
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = configure_optimizer(model, FinetuneConfig(lr=1e-2), torch.device("cpu"))
    adapters = {id(p) for m in lora_layers(model).values() for p in (m.lora_A, m.lora_B)}
    assert {id(p) for g in opt.param_groups for p in g["params"]} == adapters
    for _ in range(3):
        logits = model(TOKENS[:, :-1])
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), TOKENS[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad()
    assert len(opt.state) == len(adapters) == 2 * 2 * 3
    after = model.state_dict()
    for k, v in before.items():
        if ".lora_" in k:
            assert not torch.equal(after[k], v) or k.endswith("lora_A"), k  # every B moved off zero
        else:
            assert torch.equal(after[k], v), f"{k} changed"


# --------------------------------------------------------------------- data
def test_chat_targets_are_the_assistant_turns(make_checkpoint):
    from nabla.tokenizer import load_tokenizer
    from nabla.tokenizer.chat import chat_format_for

    tok = load_tokenizer(make_checkpoint(TINY_MHA) / "tokenizer.model")
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello, sailor."}, {"role": "user", "content": "Where to?"},
            {"role": "assistant", "content": "Port Ember."}]
    ex = fd.encode_conversation(chat_format_for(tok), tok, msgs, "test")
    assert len(ex.ids) == len(ex.targets)
    kept = [t for t in ex.targets if t != fd.IGNORE]
    text = tok.decode(kept)
    assert "Hello, sailor." in text and "Port Ember." in text
    assert "Hi there" not in text and "Where to" not in text and "Be brief" not in text
    assert kept.count(tok.eos_id) == 2  # each answer learns to stop


def test_bad_data_fails_before_training(make_checkpoint, tmp_path):
    ckpt = make_checkpoint(TINY_MHA)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
                   "{not json\n")
    with pytest.raises(ConfigError, match=r"bad.jsonl, line 2: not valid JSON"):
        finetune(model=str(ckpt), data=[str(bad)], out=str(tmp_path / "o1"), **FAST)
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    with pytest.raises(ConfigError, match="line 1: the conversation has no assistant turn"):
        finetune(model=str(ckpt), data=[str(bad)], out=str(tmp_path / "o2"), **FAST)
    with pytest.raises(ConfigError, match="rank"):
        finetune(model=str(ckpt), data=[str(bad)], out=str(tmp_path / "o3"), **dict(FAST, rank=0))
    assert not (tmp_path / "o3" / "adapter_model.safetensors").exists()


# ---------------------------------------------------------------------- runs
@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    path = tmp_path_factory.mktemp("chats") / "chats.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"What does the parrot say, number {i}?"},
                          {"role": "assistant", "content": f"Biscuit says the nutmeg costs {i} pearls."}]}
            for i in range(40)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_resume_is_bit_exact(make_checkpoint, chats, tmp_path):
    ckpt = str(make_checkpoint(TINY_MHA))
    straight = finetune(model=ckpt, data=[str(chats)], out=str(tmp_path / "a"), lora_dropout=0.1, **FAST)
    finetune(model=ckpt, data=[str(chats)], out=str(tmp_path / "b"), lora_dropout=0.1, stop_at=3, **FAST)
    resumed = finetune(model=ckpt, data=[str(chats)], out=str(tmp_path / "b"), resume=True, progress=False)
    assert resumed["step"] == straight["step"] == 6 and resumed["val_loss"] == straight["val_loss"]
    from safetensors.torch import load_file

    a, b = (load_file(tmp_path / d / "adapter_model.safetensors") for d in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    state = torch.load(tmp_path / "a" / "finetune_state.pt", weights_only=True)
    assert len(state["optimizer"]["state"]) == 2 * 7 * 2  # A and B of 7 projections in 2 layers, nothing else
    assert (tmp_path / "a" / "loss.png").is_file() and (tmp_path / "a" / "log.csv").is_file()


def test_trained_adapter_gives_nabla_logits_in_peft(make_checkpoint, chats, tmp_path):
    peft = pytest.importorskip("peft")
    ckpt = make_checkpoint(TINY_GQA)
    finetune(model=str(ckpt), data=[str(chats)], out=str(tmp_path / "a"), **FAST)
    llama = Llama.build(ckpt, max_seq_len=64, max_batch_size=1, adapter=tmp_path / "a", merge_adapter=False)
    args = args_from_params(TINY_GQA)
    base = Llama.build(ckpt, max_seq_len=64, max_batch_size=1)
    with torch.no_grad():
        got, plain = llama.model(TOKENS), base.model(TOKENS)
    assert (got - plain).abs().max() > 1e-3  # training moved the adapter
    ref = peft.PeftModel.from_pretrained(hf_model_from_meta(random_state(args, 0), args), tmp_path / "a").eval()
    with torch.no_grad():
        torch.testing.assert_close(got, ref(TOKENS).logits, atol=1e-4, rtol=0)


def test_int4_base_finetunes(make_checkpoint, chats, tmp_path):
    r = finetune(model=str(make_checkpoint(TINY_MHA)), data=[str(chats)], out=str(tmp_path / "q"), quantize="int4",
                 **FAST)
    assert r["step"] == 6 and r["val_loss"] == r["val_loss"]
    llama = Llama.build(make_checkpoint(TINY_MHA), max_seq_len=64, max_batch_size=1, quantize="int4",
                        adapter=tmp_path / "q", merge_adapter=False)
    assert isinstance(lora_layers(llama.model)["layers.0.attention.wq"], LoRALinear)


def test_finetune_lowers_held_out_loss_of_the_builtin_model(tmp_path):
    """The built-in story model, fine-tuned on a text it has not seen, predicts held-out lines of it better."""
    from nabla import default_model_path
    from nabla.tokenizer.chat import chat_format_for

    text = tmp_path / "sea.txt"
    text.write_text(SEA_TEXT)
    settings = dict(seq_len=32, batch_size=8, steps=30, warmup=3, eval_every=10, eval_tokens=512,
                    val_fraction=0.2, lr=3e-3, progress=False)
    r = finetune(model=str(default_model_path()), data=[str(text)], out=str(tmp_path / "a"), **settings)
    base = Llama.build(default_model_path(), max_seq_len=64, max_batch_size=1)
    data = fd.split_examples(fd.read_examples([str(text)], base.tokenizer, chat_format_for(base.tokenizer)),
                             0.2, 1337)
    starts = fd.val_windows(data, 32, None)
    before = fd.masked_loss(base.model, data, starts, 32, torch.device("cpu"), torch.no_grad(), 8,
                            fd.byte_counter(base.tokenizer))["loss"]
    # 30 steps lower the held-out loss by at least 1 nat per token (measured on CPU: 5.49 -> 3.63).
    assert r["val_loss"] < before - 1.0, (before, r["val_loss"])


# ----------------------------------------------------------------- commands
def test_commands_finetune_generate_convert(make_checkpoint, chats, tmp_path, capsys):
    from nabla.cli import main

    ckpt = str(make_checkpoint(TINY_MHA))
    assert main(["finetune", "--model", ckpt, "--data", str(chats), "--out", str(tmp_path / "a"), "--steps", "4",
                 "--seq-len", "16", "--batch-size", "4", "--eval-every", "2", "--eval-tokens", "64",
                 "--val-fraction", "0.2", "--rank", "2", "--targets", "q_proj", "w2", "--lr", "1e-2",
                 "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "nabla finetune: LoRA rank 2" in err and "nabla train:" not in err  # the lines name the command
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["r"] == 2 and cfg["target_modules"] == ["down_proj", "q_proj"]
    assert main(["convert", "--model", ckpt, "--out", str(tmp_path / "m"), "--to", "hf",
                 "--merge-adapter", str(tmp_path / "a")]) == 0
    merged = Llama.build(tmp_path / "m", max_seq_len=64, max_batch_size=1)
    adapted = Llama.build(ckpt, max_seq_len=64, max_batch_size=1, adapter=tmp_path / "a", merge_adapter=False)
    with torch.no_grad():
        torch.testing.assert_close(merged.model(TOKENS), adapted.model(TOKENS), atol=1e-4, rtol=0)
    capsys.readouterr()
    for extra in ([], ["--adapter-unmerged"]):
        assert main(["generate", "Once", "--model", ckpt, "--adapter", str(tmp_path / "a"), "--temperature", "0",
                     "--max-gen-len", "8", "--max-seq-len", "64", "--json"] + extra) == 0
    a, b = (json.loads(line) for line in capsys.readouterr().out.strip().splitlines())
    assert a["tokens"] == b["tokens"]
    assert main(["generate", "Once", "--model", ckpt, "--adapter", str(tmp_path / "nowhere")]) == 1
    assert "adapter folder" in capsys.readouterr().err
