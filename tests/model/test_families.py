"""Each family nabla runs gives transformers' logits and tokens, on tiny random models transformers saves.

Per family: prefill logits, KV-cached decode logits at positions past every
sliding window, greedy tokens over 32 steps, and a batch of unequal prompts
equal to each prompt alone. The models are built with the family's own
config class in fp32 and saved with save_pretrained; nabla reads the folder.
"""

import pytest
import torch
from checkpoint.helpers import copy_hf_tokenizer

from nabla import Llama
from nabla.checkpoint import open_checkpoint

VOCAB = 32000  # the test tokenizer's (tests/data/tinyllama-1.1b-chat-v1.0)
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
              pad_token_id=0)
WINDOW = 6  # positions 6.. attend past every window
FAMILIES = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", dict(sliding_window=WINDOW, head_dim=24)),
    "qwen2": ("Qwen2Config", dict(rope_theta=1e6, tie_word_embeddings=True)),
    "qwen2-sliding": ("Qwen2Config", dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)),
    "qwen3": ("Qwen3Config", dict(head_dim=16, rope_theta=1e6, tie_word_embeddings=True)),
    "gemma": ("GemmaConfig", dict(head_dim=24)),
    "gemma2": ("Gemma2Config", dict(head_dim=24, sliding_window=WINDOW, query_pre_attn_scalar=20,
                                    attn_logit_softcapping=0.5, final_logit_softcapping=2.0)),
    "phi3": ("Phi3Config", dict(sliding_window=WINDOW)),
}
PROMPT = [1, 450, 4996, 17354, 1701, 29916, 432, 17204, 975, 278]
MORE = [263, 17366, 11203, 29889, 306, 763, 372, 29892, 541, 451, 1784, 29889, 13, 1576, 1095, 338]


def save_family(path, family: str, seed: int = 0, **extra):
    """(folder, transformers model): a random tiny model of `family` saved by transformers in fp32."""
    import transformers

    cls, kw = FAMILIES[family]
    config = getattr(transformers, cls)(**{**COMMON, **kw, **extra})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # random norms and biases too, so that every switch shows in the logits
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.randn_like(p) * 0.1 + (0.0 if "norm" in name and family.startswith("gemma") else 1.0
                                                     if "norm" in name else 0.0))
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    copy_hf_tokenizer(path)
    return path, model


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
