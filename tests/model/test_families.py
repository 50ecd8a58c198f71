"""Each family nabla runs gives transformers' logits and tokens, on tiny random models transformers saves.

Per family: prefill logits, KV-cached decode logits at positions past every
sliding window, greedy tokens over 32 steps, and a batch of unequal prompts
equal to each prompt alone. The models are built with the family's own
config class in fp32 and saved with save_pretrained; nabla reads the folder.
"""

import pytest
import torch
from hf_families import FAMILIES, MORE, PROMPT, save_family

from nabla import Llama
from nabla.checkpoint import open_checkpoint


def build(path, max_seq_len=64, max_batch_size=2) -> Llama:
    return Llama.build(path, None, max_seq_len=max_seq_len, max_batch_size=max_batch_size, dtype="fp32",
                       device="cpu")


def cached_logits(llama: Llama, ids: list[int], prefill: int) -> torch.Tensor:
    """(len(ids), vocab): a prefill of the first `prefill` ids, then one cached decode step per id."""
    model = llama.model
    with torch.inference_mode():
        out = [model(torch.tensor([ids[:prefill]]), 0)[0]]
        for p in range(prefill, len(ids)):
            out.append(model(torch.tensor([[ids[p]]]), p)[0])
    return torch.cat(out)


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    ids = list(ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[-n:]


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    path, hf = save_family(tmp_path_factory.mktemp(request.param), request.param)
    return request.param, build(path), hf


def test_config_sets_the_switches(family):
    name, llama, hf = family
    a = llama.model.args
    assert a.model_type == hf.config.model_type
    assert a.qkv_bias == name.startswith("qwen2") and a.qk_norm == (name == "qwen3")
    assert a.norm_unit_offset == a.scale_embeddings == (a.hidden_act == "gelu_tanh") == name.startswith("gemma")
    assert (a.sliding_window is not None) == (name in ("mistral", "qwen2-sliding", "gemma2", "phi3"))
    if name == "gemma2":
        assert a.sliding_layers == [0, 2] and a.attn_logit_softcap == 0.5 and a.final_logit_softcap == 2.0
        assert a.attn_scale == 20 ** -0.5
    if name == "qwen2-sliding":
        assert a.sliding_layers == [1, 2]


def test_prefill_and_cached_decode_equal_transformers(family):
    name, llama, hf = family
    ids = PROMPT + MORE  # 26 positions: past every window of 6
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].float()
    with torch.inference_mode():
        prefill = llama.model(torch.tensor([ids]))[0]
    cached = cached_logits(llama, ids, len(PROMPT))
    err_prefill, err_cached = (prefill - ref).abs().max().item(), (cached - ref).abs().max().item()
    print(f"{name}: max abs prefill {err_prefill:.2e}, cached decode {err_cached:.2e}")
    assert err_prefill <= 1e-4 and err_cached <= 1e-4


def test_greedy_tokens_equal_transformers(family):
    name, llama, hf = family
    out, _ = llama.generate([PROMPT], max_gen_len=32, temperature=0.0)
    ref = hf_greedy(hf, PROMPT, 32)
    assert out[0] == ref[:len(out[0])]
    assert len(out[0]) == 32 or ref[len(out[0])] in llama.stop_ids


def test_batch_of_unequal_prompts_equals_each_alone(family):
    name, llama, hf = family
    prompts = [PROMPT, PROMPT[:3] + MORE[:9]]
    together, _ = llama.generate(prompts, max_gen_len=16, temperature=0.0)
    alone = [llama.generate([p], max_gen_len=16, temperature=0.0)[0][0] for p in prompts]
    assert together == alone


def test_checkpoint_reports_the_family(family, tmp_path):
    name, llama, hf = family
    hf.save_pretrained(tmp_path)
    ckpt = open_checkpoint(tmp_path)
    assert ckpt.format == "hf" and ckpt.args.model_type == hf.config.model_type
