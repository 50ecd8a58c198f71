"""Tiny random models of each family nabla runs, built and saved by transformers itself (fp32)."""

import torch
from checkpoint.helpers import copy_hf_tokenizer

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


def set_chat_template(path, template: str, **config):
    """Put `template` (and further tokenizer_config.json keys) in a saved family's tokenizer_config.json;
    returns transformers' tokenizer of the folder, the reference for its chat prompts."""
    import json

    import transformers

    file = path / "tokenizer_config.json"
    config = {**json.loads(file.read_text()), "chat_template": template, **config}
    file.write_text(json.dumps(config))
    # The class tokenizer_config.json names (TinyLlama's LlamaTokenizer): transformers 5's AutoTokenizer would
    # take Qwen2's byte-level class from a qwen2 config.json and split the SentencePiece vocabulary wrongly
    cls = getattr(transformers, config.get("tokenizer_class") or "AutoTokenizer")
    return cls.from_pretrained(str(path), local_files_only=True)


def template_ids(ref, dialog, **kw) -> list[int]:
    """transformers' prompt ids of a dialog (add_generation_prompt, as nabla's chat prompts)."""
    ids = ref.apply_chat_template(dialog, add_generation_prompt=True, tokenize=True, **kw)
    return list(ids["input_ids"] if not isinstance(ids, list) else ids)
