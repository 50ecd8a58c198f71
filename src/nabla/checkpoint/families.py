"""Hugging Face config.json of each model family -> ModelArgs: which switches a model_type sets.

Families: llama, mistral, qwen2, qwen3, gemma, gemma2, phi3. Each is read
the way transformers' own config class reads it (its defaults where a key
is missing, `layer_types` for which layers slide), and every key that would
change the arithmetic in a way nabla does not implement is an error naming
the model type and the feature, never ignored.

Leaves out: weight names (nabla.checkpoint.hf), the model itself
(nabla.model.llama), other families (refused with what they need).
"""

from __future__ import annotations

from nabla.errors import ConfigError
from nabla.model.args import ModelArgs
from nabla.model.rope import longrope_attention_factor

# model_type -> (architecture, switches the family always sets)
FAMILIES: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaForCausalLM", {}),
    "mistral": ("MistralForCausalLM", {}),
    "qwen2": ("Qwen2ForCausalLM", dict(qkv_bias=True)),
    "qwen3": ("Qwen3ForCausalLM", dict(qk_norm=True)),
    "gemma": ("GemmaForCausalLM", dict(norm_unit_offset=True, scale_embeddings=True)),
    "gemma2": ("Gemma2ForCausalLM", dict(norm_unit_offset=True, scale_embeddings=True, post_norms=True)),
    "phi3": ("Phi3ForCausalLM", {}),
}
# Known model types nabla does not run, and what it would need for them.
MISSING_FEATURE = {
    "mixtral": "mixture-of-experts feed-forward layers (num_local_experts)",
    "qwen2_moe": "mixture-of-experts feed-forward layers",
    "qwen3_moe": "mixture-of-experts feed-forward layers",
    "phimoe": "mixture-of-experts feed-forward layers",
    "gemma3": "a vision encoder and per-layer-type rotary settings",
    "gemma3_text": "per-layer-type rotary settings (local and global theta)",
    "phi": "parallel attention and feed-forward with partial rotary (Phi-1/2)",
    "cohere": "parallel attention and feed-forward with LayerNorm",
    "gpt2": "learned positions and LayerNorm",
}
TIED_BY_DEFAULT = ("gemma", "gemma2")
ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}


def family_of(config: dict, source: str) -> str:
    """The config's model_type, checked to be one nabla runs (else a ConfigError naming what is missing)."""
    model_type = config.get("model_type")
    archs = config.get("architectures") or []
    if model_type is None and not archs:
        raise ConfigError(f"{source} has neither model_type nor architectures; it does not look like "
                          "a Hugging Face model config")
    if model_type is None:
        by_arch = {arch: t for t, (arch, _) in FAMILIES.items()}
        model_type = next((by_arch[a] for a in archs if a in by_arch), None)
        if model_type is None:
            raise ConfigError(f"{source} names the architecture {archs[0]!r} and no model_type; nabla runs "
                              f"{', '.join(a for a, _ in FAMILIES.values())}")
    if model_type in MISSING_FEATURE:
        raise ConfigError(f"{source} describes a {model_type!r} model ({', '.join(archs) or 'no architectures'}); "
                          f"nabla does not implement its {MISSING_FEATURE[model_type]}. Supported model types: "
                          f"{', '.join(FAMILIES)}")
    if model_type not in FAMILIES:
        raise ConfigError(f"{source} describes a {model_type!r} model ({', '.join(archs) or 'no architectures'}); "
                          f"nabla runs the model types {', '.join(FAMILIES)}")
    expected = FAMILIES[model_type][0]
    other = [a for a in archs if a != expected]
    if other:
        raise ConfigError(f"{source} names the architecture {other[0]!r} for model_type {model_type!r}; nabla "
                          f"runs {expected} checkpoints for it (heads for other tasks are not supported)")
    return model_type


def _refuse(model_type: str, source: str, feature: str, fix: str = "") -> None:
    raise ConfigError(f"{source}: this {model_type!r} model uses {feature}, which nabla does not implement"
                      + (f"; {fix}" if fix else ""))


def check_arithmetic(config: dict, model_type: str, source: str) -> None:
    """Refuse every key that changes the arithmetic in a way nabla does not implement."""
    act_key = "hidden_activation" if model_type.startswith("gemma") else "hidden_act"
    act = config.get(act_key) or ("gelu_pytorch_tanh" if model_type.startswith("gemma") else "silu")
    wanted = "gelu_tanh" if model_type.startswith("gemma") else "silu"
    if ACTIVATIONS.get(act) != wanted:
        _refuse(model_type, source, f"{act_key} {act!r}", f"this family uses {wanted!r}")
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key):
            _refuse(model_type, source, f"{key}=true (biases on every projection)")
    for key in ("num_local_experts", "num_experts"):
        if config.get(key):
            _refuse(model_type, source, f"mixture-of-experts layers ({key}={config[key]})")
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    partial = config.get("partial_rotary_factor", params.get("partial_rotary_factor", 1.0) if isinstance(
        params, dict) else 1.0)
    if partial not in (None, 1, 1.0):
        _refuse(model_type, source, f"partial rotary embeddings (partial_rotary_factor={partial})")
    if config.get("use_bidirectional_attention"):
        _refuse(model_type, source, "bidirectional attention")
    if model_type != "gemma2":
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            if config.get(key) is not None:
                _refuse(model_type, source, f"{key}", "only Gemma 2 soft-caps in nabla")


def _layer_windows(config: dict, model_type: str, n_layers: int, source: str) -> tuple[int | None, list | None]:
    """(sliding_window, the layers that use it or None for all)."""
    window = config.get("sliding_window")
    if model_type in ("llama", "gemma"):
        return None, None  # their attention ignores the key
    if model_type in ("qwen2", "qwen3") and not config.get("use_sliding_window", False):
        window = None
    if window is None:
        return None, None
    types = config.get("layer_types")
    if types is None:
        if model_type == "gemma2":
            types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n_layers)]
        elif model_type in ("qwen2", "qwen3"):
            start = config.get("max_window_layers", 28)
            types = ["sliding_attention" if i >= start else "full_attention" for i in range(n_layers)]
        else:
            return int(window), None
    if len(types) != n_layers or set(types) - {"sliding_attention", "full_attention"}:
        raise ConfigError(f"{source}: layer_types must list 'sliding_attention' or 'full_attention' for each "
                          f"of the {n_layers} layers, got {types!r}")
    sliding = [i for i, t in enumerate(types) if t == "sliding_attention"]
    if not sliding:
        return None, None
    return int(window), (None if len(sliding) == n_layers else sliding)


def rope_settings(config: dict, source: str) -> tuple[float, dict | None]:
    """rope_theta and the scaling settings (nabla.model.rope's form), from transformers 4
    (`rope_theta`, `rope_scaling`) or 5 (`rope_parameters`, which also holds rope_theta) style configs."""
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or None
    theta = config.get("rope_theta", params.get("rope_theta", 10000.0))
    if scaling is None and params:
        scaling = params
    if scaling is None:
        return float(theta), None
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return float(theta), None
    scaling = {k: v for k, v in scaling.items() if k not in ("rope_theta", "type", "partial_rotary_factor")}
    scaling["rope_type"] = {"su": "longrope"}.get(kind, kind)
    max_pos = config.get("max_position_embeddings")
    original = scaling.get("original_max_position_embeddings", config.get("original_max_position_embeddings"))
    if kind == "dynamic":  # transformers stretches past max_position_embeddings
        original = max_pos
    if scaling["rope_type"] in ("dynamic", "yarn", "longrope"):
        if original is None:
            raise ConfigError(f"{source}: rope scaling {kind!r} needs original_max_position_embeddings "
                              "(or max_position_embeddings); add it to the config")
        scaling["original_max_position_embeddings"] = original
    if scaling["rope_type"] in ("yarn", "longrope") and scaling.get("factor") is None and max_pos:
        scaling["factor"] = max_pos / original
    if scaling["rope_type"] == "longrope" and scaling.get("attention_factor") is None:
        scaling["attention_factor"] = longrope_attention_factor(max_pos or original, original) \
            if scaling.get("factor") is None else longrope_attention_factor(scaling["factor"] * original, original)
    if kind == "llama3":
        del scaling["rope_type"]
    return float(theta), scaling


def config_to_args(config: dict, source: str = "config.json") -> ModelArgs:
    """ModelArgs of a Hugging Face config.json of any supported family."""
    model_type = family_of(config, source)
    check_arithmetic(config, model_type, source)
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
               if k not in config]
    if missing:
        raise ConfigError(f"{source} lacks {', '.join(missing)}; it is not a complete {model_type} config")
    theta, scaling = rope_settings(config, source)
    n_layers = config["num_hidden_layers"]
    window, sliding = _layer_windows(config, model_type, n_layers, source)
    kw = dict(
        dim=config["hidden_size"], n_layers=n_layers,
        n_heads=config["num_attention_heads"], n_kv_heads=config.get("num_key_value_heads"),
        vocab_size=config["vocab_size"], norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope_theta=theta, rope_scaling=scaling, head_dim=config.get("head_dim"),
        hidden_dim=config.get("intermediate_size"),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", model_type in TIED_BY_DEFAULT)),
        model_type=model_type, sliding_window=window, sliding_layers=sliding,
        **FAMILIES[model_type][1],
    )
    if model_type.startswith("gemma"):
        kw["hidden_act"] = "gelu_tanh"
    if model_type == "gemma2":
        kw["attn_logit_softcap"] = config.get("attn_logit_softcapping", 50.0)
        kw["final_logit_softcap"] = config.get("final_logit_softcapping", 30.0)
        kw["attn_scale"] = float(config.get("query_pre_attn_scalar", 256)) ** -0.5
    try:
        return ModelArgs(**kw)
    except TypeError as e:
        raise ConfigError(f"{source}: invalid model settings: {e}") from None
