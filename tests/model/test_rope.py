"""Every RoPE scaling kind gives transformers' logits, in prefill and in cached decode, past the original context.

Tiny Llama (and, for longrope, Phi-3) models with an original context of 16
positions, run over 40: the prefill compares with transformers' prefill, the
decode steps with transformers' own cached decode (the length-dependent kinds,
"dynamic" and "longrope", rotate each new key with the frequencies of the
sequence's length at that step, so a cached run differs from a full pass).
"""

import pytest
import torch
from checkpoint.helpers import copy_hf_tokenizer

from nabla import Llama
from nabla.errors import ConfigError
from nabla.model.args import ModelArgs
from nabla.model.rope import rope_frequencies

ORIGINAL = 16
HALF = 8  # head_dim 16: 8 channel pairs
KINDS = {
    "default": ("LlamaConfig", {"rope_type": "default"}),
    "linear": ("LlamaConfig", {"rope_type": "linear", "factor": 4.0}),
    "dynamic": ("LlamaConfig", {"rope_type": "dynamic", "factor": 4.0}),
    "llama3": ("LlamaConfig", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 4}),
    "yarn": ("LlamaConfig", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL,
                             "beta_fast": 8.0, "beta_slow": 1.0}),
    "yarn-mscale": ("LlamaConfig", {"rope_type": "yarn", "factor": 4.0, "mscale": 0.7, "mscale_all_dim": 0.3,
                                    "original_max_position_embeddings": ORIGINAL}),
    "longrope": ("Phi3Config", {"rope_type": "longrope", "short_factor": [1.0 + i / 10 for i in range(HALF)],
                                "long_factor": [2.0 + i for i in range(HALF)]}),
}
IDS = [1] + [(i * 7919) % 31000 + 100 for i in range(39)]  # 40 positions: past the original 16
PREFILL = 10


def save_rope_model(path, kind: str):
    import transformers

    cls, rope = KINDS[kind]
    extra = dict(original_max_position_embeddings=ORIGINAL) if kind == "longrope" else {}
    config = getattr(transformers, cls)(
        vocab_size=32000, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=ORIGINAL if kind == "dynamic" else 4 * ORIGINAL,
        rope_parameters={"rope_theta": 100.0, **rope}, bos_token_id=1, eos_token_id=2, pad_token_id=0, **extra)
    config._attn_implementation = "eager"
    torch.manual_seed(1)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.save_pretrained(path)
    copy_hf_tokenizer(path)
    return model


def hf_cached_logits(model, ids: list[int], prefill: int) -> torch.Tensor:
    with torch.no_grad():
        out = model(torch.tensor([ids[:prefill]]), use_cache=True)
        logits, past = [out.logits[0]], out.past_key_values
        for p in range(prefill, len(ids)):
            out = model(torch.tensor([[ids[p]]]), past_key_values=past, use_cache=True)
            logits.append(out.logits[0])
            past = out.past_key_values
    return torch.cat(logits).float()


@pytest.mark.filterwarnings("ignore:max_seq_len")
@pytest.mark.parametrize("kind", list(KINDS))
def test_rope_kind_equals_transformers(tmp_path, kind):
    hf = save_rope_model(tmp_path, kind)
    llama = Llama.build(tmp_path, None, max_seq_len=64, max_batch_size=1, dtype="fp32", device="cpu")
    with torch.no_grad():
        ref_prefill = hf(torch.tensor([IDS])).logits[0].float()
    ref_cached = hf_cached_logits(hf, IDS, PREFILL)
    model = llama.model
    with torch.inference_mode():
        prefill = model(torch.tensor([IDS]))[0]
        cached = [model(torch.tensor([IDS[:PREFILL]]), 0)[0]]
        cached += [model(torch.tensor([[IDS[p]]]), p)[0] for p in range(PREFILL, len(IDS))]
    cached = torch.cat(cached)
    err_prefill, err_cached = (prefill - ref_prefill).abs().max().item(), (cached - ref_cached).abs().max().item()
    print(f"{kind}: max abs prefill {err_prefill:.2e}, cached decode {err_cached:.2e}")
    assert err_prefill <= 1e-4 and err_cached <= 1e-4
    # greedy decoding through nabla's loop (cached) continues as transformers' own cached decode
    out, _ = llama.generate([IDS[:PREFILL]], max_gen_len=32, temperature=0.0)
    with torch.no_grad():
        ref = hf.generate(torch.tensor([IDS[:PREFILL]]), max_new_tokens=32, do_sample=False,
                          eos_token_id=None)[0, PREFILL:].tolist()
    assert out[0] == ref[:len(out[0])]


def test_scaling_changes_the_frequencies():
    plain = rope_frequencies(ModelArgs(dim=64, n_heads=4, rope_theta=100.0))[0]
    linear = rope_frequencies(ModelArgs(dim=64, n_heads=4, rope_theta=100.0,
                                        rope_scaling={"rope_type": "linear", "factor": 4.0}))[0]
    torch.testing.assert_close(linear, plain / 4)
    dyn = ModelArgs(dim=64, n_heads=4, rope_theta=100.0, rope_scaling={
        "rope_type": "dynamic", "factor": 4.0, "original_max_position_embeddings": 16})
    torch.testing.assert_close(rope_frequencies(dyn, 8)[0], plain)  # within the context: unchanged
    assert (rope_frequencies(dyn, 64)[0][1:] < plain[1:]).all()  # past it: slower


@pytest.mark.parametrize("scaling,match", [
    ({"rope_type": "ntk-by-parts", "factor": 2.0}, "ntk-by-parts"),
    ({"rope_type": "linear"}, "factor"),
    ({"rope_type": "longrope", "short_factor": [1.0], "long_factor": [1.0],
      "original_max_position_embeddings": 16, "attention_factor": 1.0}, "short_factor"),
])
def test_bad_scaling_is_a_config_error(scaling, match):
    with pytest.raises(ConfigError, match=match):
        ModelArgs(dim=64, n_heads=4, rope_scaling=scaling)
