"""The model families in GGUF: which llama.cpp architecture each is, and how its weights are stored there.

nabla keeps every family's weights in Meta's naming and layout (q/k rows in
adjacent-pair rotary order, see nabla.checkpoint.hf). llama.cpp's
convert_hf_to_gguf.py stores them per architecture; this module holds those
conventions, both ways, with names and metadata keys taken from the `gguf`
package's own tables (MODEL_ARCH, MODEL_TENSORS, TENSOR_NAMES, Keys):

    family (model_type)  architecture  what differs from nabla's state
    llama, mistral       llama         nothing (llama.cpp rotates adjacent pairs, as Meta)
    qwen2                qwen2         q/k rows (and q/k biases) in Hugging Face's half-split order
    qwen3                qwen3         same, and the per-head attn_q_norm / attn_k_norm entries
    gemma, gemma2        gemma, gemma2 same order as qwen2; every norm weight stored as 1 + w
    phi3                 phi3          same order; q, k, v fused as attn_qkv, gate and up as ffn_up;
                                       longrope factors as rope_factors_long / rope_factors_short

(The "NEOX" rotary llama.cpp uses for all but `llama` rotates channel i with
i + head_dim/2, which is Hugging Face's order; nabla permutes those rows at
the file boundary exactly as it does for Hugging Face folders.)

Leaves out: the file format (gguf.py writes, gguf_read.py reads) and the
tokenizer (nabla.tokenizer.gguf reads, gguf.py writes).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterator

import numpy as np
import torch

from nabla.checkpoint.hf import permute_qk, qk_heads, unpermute_qk
from nabla.errors import ConfigError
from nabla.model.args import ModelArgs

# nabla's model_type -> llama.cpp architecture (Mistral is written as llama, as convert_hf_to_gguf.py does).
ARCH_OF = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma": "gemma",
           "gemma2": "gemma2", "phi3": "phi3"}
ARCHS = ("llama", "qwen2", "qwen3", "gemma", "gemma2", "phi3")
NEOX = ("qwen2", "qwen3", "gemma", "gemma2", "phi3")
"""Architectures whose q/k rows are in Hugging Face's half-split order (llama.cpp's NEOX rotary)."""
UNIT_OFFSET = ("gemma", "gemma2")
"""Architectures whose norm weights are stored with 1 added (convert_hf_to_gguf.py adds it; llama.cpp scales by w)."""
FUSED = {"phi3": {"ATTN_QKV": ("attention.wq", "attention.wk", "attention.wv"),
                  "FFN_UP": ("feed_forward.w1", "feed_forward.w3")}}
"""Per architecture: fused llama.cpp tensor (gguf.MODEL_TENSOR) -> nabla's parts, in row order (Phi-3: gate
before up)."""
NOT_RUN = {
    "gemma3": "per-layer-type rotary settings (local and global theta)",
    "gemma3n": "per-layer embeddings and altup",
    "qwen2moe": "mixture-of-experts feed-forward layers", "qwen3moe": "mixture-of-experts feed-forward layers",
    "phimoe": "mixture-of-experts feed-forward layers",
    "phi2": "parallel attention and feed-forward with partial rotary (Phi-1/2)",
    "command-r": "parallel attention and feed-forward with LayerNorm", "gpt2": "learned positions and LayerNorm",
}
"""llama.cpp architectures nabla knows and does not run, with what it would need."""

# Meta name (layer as {}) -> (gguf.MODEL_TENSOR member name, suffix)
META_TENSORS = {
    "tok_embeddings.weight": ("TOKEN_EMBD", "weight"),
    "norm.weight": ("OUTPUT_NORM", "weight"),
    "output.weight": ("OUTPUT", "weight"),
    "layers.{}.attention_norm.weight": ("ATTN_NORM", "weight"),
    "layers.{}.attention.wq.weight": ("ATTN_Q", "weight"),
    "layers.{}.attention.wk.weight": ("ATTN_K", "weight"),
    "layers.{}.attention.wv.weight": ("ATTN_V", "weight"),
    "layers.{}.attention.wq.bias": ("ATTN_Q", "bias"),
    "layers.{}.attention.wk.bias": ("ATTN_K", "bias"),
    "layers.{}.attention.wv.bias": ("ATTN_V", "bias"),
    "layers.{}.attention.q_norm.weight": ("ATTN_Q_NORM", "weight"),
    "layers.{}.attention.k_norm.weight": ("ATTN_K_NORM", "weight"),
    "layers.{}.attention.wo.weight": ("ATTN_OUT", "weight"),
    "layers.{}.post_attention_norm.weight": ("ATTN_POST_NORM", "weight"),
    "layers.{}.ffn_norm.weight": ("FFN_NORM", "weight"),
    "layers.{}.feed_forward.w1.weight": ("FFN_GATE", "weight"),
    "layers.{}.feed_forward.w2.weight": ("FFN_DOWN", "weight"),
    "layers.{}.feed_forward.w3.weight": ("FFN_UP", "weight"),
    "layers.{}.post_ffn_norm.weight": ("FFN_POST_NORM", "weight"),
}
EXTRA_TENSORS = ("ROPE_FREQS", "ROPE_FACTORS_LONG", "ROPE_FACTORS_SHORT")
"""Tensors that are rotary settings, not weights (read into ModelArgs.rope_scaling)."""


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ConfigError("GGUF files need the gguf package: `pip install gguf`") from None
    return gguf


@functools.cache
def tensor_names() -> dict[str, str]:
    """Meta name -> llama.cpp name (layer as {}), from gguf.TENSOR_NAMES."""
    gguf = _gguf()
    return {meta: gguf.TENSOR_NAMES[gguf.MODEL_TENSOR[t]].replace("{bid}", "{}") + "." + suffix
            for meta, (t, suffix) in META_TENSORS.items()}


@functools.cache
def arch_tensors(arch: str) -> frozenset[str]:
    """llama.cpp's tensor names (layer as {}, no suffix) an architecture has (gguf.MODEL_TENSORS)."""
    gguf = _gguf()
    member = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == arch)
    return frozenset(gguf.TENSOR_NAMES[t].replace("{bid}", "{}") for t in gguf.MODEL_TENSORS[member])


@functools.cache
def fused_tensors(arch: str) -> dict[str, tuple[str, ...]]:
    """llama.cpp name (layer as {}) of each fused tensor of `arch` -> nabla's parts (layer-relative names)."""
    gguf = _gguf()
    return {gguf.TENSOR_NAMES[gguf.MODEL_TENSOR[t]].replace("{bid}", "{}") + ".weight": parts
            for t, parts in FUSED.get(arch, {}).items()}


@functools.cache
def extra_tensor_names() -> frozenset[str]:
    gguf = _gguf()
    return frozenset(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR[t]] + ".weight" for t in EXTRA_TENSORS)


def _generic(name: str) -> tuple[str, str | None]:
    """('blk.{}.attn_q.weight', '3') for 'blk.3.attn_q.weight'; (name, None) without a layer number."""
    m = re.match(r"(blk|layers)\.(\d+)\.(.*)", name)
    return (f"{m.group(1)}.{{}}.{m.group(3)}", m.group(2)) if m else (name, None)


def gguf_name(meta_name: str) -> str | None:
    """llama.cpp's name for a Meta tensor name (None for tensors llama.cpp does not store)."""
    generic, layer = _generic(meta_name)
    name = tensor_names().get(generic)
    return name.format(layer) if name and layer is not None else name


def meta_name(name: str) -> str | None:
    """Meta's name for a llama.cpp tensor name (None for names the table lacks)."""
    generic, layer = _generic(name)
    meta = _meta_names().get(generic)
    return meta.format(layer) if meta and layer is not None else meta


@functools.cache
def _meta_names() -> dict[str, str]:
    return {v: k for k, v in tensor_names().items()}


def arch_of(args: ModelArgs) -> str:
    if args.model_type not in ARCH_OF:
        raise ConfigError(f"GGUF output knows the families {', '.join(ARCH_OF)}, not {args.model_type!r}")
    return ARCH_OF[args.model_type]


# ------------------------------------------------------------------ writing
def to_gguf(state, args: ModelArgs) -> Iterator[tuple[str, str, torch.Tensor]]:
    """(llama.cpp name, the Meta name it comes from, fp32 tensor) for every weight of `state`, in
    llama.cpp's layout for the model's architecture (fused, permuted and offset as its converter does)."""
    arch = arch_of(args)
    fused_of = {f"layers.{{}}.{part}.weight": (fused, parts)
                for fused, parts in fused_tensors(arch).items() for part in parts}
    held: dict[str, dict[str, torch.Tensor]] = {}
    for key in state:
        if key == "rope.freqs" or (args.tie_word_embeddings and key == "output.weight"):
            continue
        generic, layer = _generic(key)
        t = state[key].detach().to("cpu", torch.float32)
        if generic in fused_of:  # Phi-3: wait for every part, then one tensor with their rows in order
            fused, order = fused_of[generic]
            name = fused.format(layer)
            parts = held.setdefault(name, {})
            parts[generic.removeprefix("layers.{}.").removesuffix(".weight")] = _stored(t, key, "", args, arch)
            if len(parts) == len(order):
                yield name, key, torch.cat([parts[p] for p in order])
                del held[name]
            continue
        name = gguf_name(key)
        if name is None:
            raise ConfigError(f"weight {key} has no llama.cpp name; GGUF output holds the weights of "
                              f"{', '.join(ARCH_OF)} models only")
        yield name, key, _stored(t, key, name, args, arch)
    if held:
        raise ConfigError(f"{', '.join(held)}: some of the parts to fuse are missing from the state")


def _stored(t: torch.Tensor, key: str, name: str, args: ModelArgs, arch: str) -> torch.Tensor:
    if arch in NEOX and (heads := qk_heads(key, args)) is not None:
        t = permute_qk(t, heads)
    if arch in UNIT_OFFSET and name.endswith("norm.weight"):
        t = t + 1
    return t


# ------------------------------------------------------------------ reading
def from_gguf(name: str, shape: tuple[int, ...], args: ModelArgs,
              arch: str) -> list[tuple[str, tuple[int, ...], Callable[[torch.Tensor], torch.Tensor]]] | None:
    """[(Meta name, its shape, what makes it from the stored tensor)] for one llama.cpp tensor, or None for a
    name the architecture's table lacks."""
    generic, layer = _generic(name)
    fused = fused_tensors(arch).get(generic)
    if fused is not None and layer is not None:
        if fused[0] == "attention.wq":
            rows = [args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim, args.n_kv_heads * args.head_dim]
        else:
            rows = [args.hidden_dim, args.hidden_dim]
        if shape[0] != sum(rows):
            raise ConfigError(f"{name} has {shape[0]} rows; the metadata implies "
                              f"{' + '.join(map(str, rows))} = {sum(rows)}")
        out, start = [], 0
        for part, n in zip(fused, rows):
            key = f"layers.{layer}.{part}.weight"
            out.append((key, (n, *shape[1:]), functools.partial(_loaded_part, start=start, rows=n, key=key,
                                                                  name=name, args=args, arch=arch)))
            start += n
        return out
    key = meta_name(name)
    if key is None or generic.removesuffix(".weight").removesuffix(".bias") not in arch_tensors(arch) \
            or (key.endswith(".bias") and not args.qkv_bias):
        return None
    return [(key, shape, functools.partial(_loaded, key=key, name=name, args=args, arch=arch))]


def _loaded(t: torch.Tensor, key: str, name: str, args: ModelArgs, arch: str) -> torch.Tensor:
    if arch in UNIT_OFFSET and name.endswith("norm.weight"):
        t = t.float() - 1
    if arch in NEOX and (heads := qk_heads(key, args)) is not None:
        t = unpermute_qk(t, heads)
    return t


def _loaded_part(t: torch.Tensor, start: int, rows: int, **kw) -> torch.Tensor:
    return _loaded(t.narrow(0, start, rows).clone(), **kw)


# ------------------------------------------------------------------ metadata
ARCH_SWITCHES = {
    "llama": {}, "phi3": {},
    "qwen2": dict(qkv_bias=True),
    "qwen3": dict(qk_norm=True),
    "gemma": dict(norm_unit_offset=True, scale_embeddings=True, hidden_act="gelu_tanh"),
    "gemma2": dict(norm_unit_offset=True, scale_embeddings=True, hidden_act="gelu_tanh", post_norms=True),
}
"""The ModelArgs switches each architecture implies (llama.cpp's graph for it); the rest are Llama's."""
SHAPE_SWITCHES = ("qkv_bias", "qk_norm", "norm_unit_offset", "hidden_act", "scale_embeddings", "post_norms")
GEMMA2_WINDOW = 4096  # llama.cpp's default when a gemma2 file names none


def gemma2_attn_scale(dim: int, n_heads: int, head_dim: int, n_layers: int) -> float:
    """The attention scale llama.cpp gives a gemma2 file (it stores no query_pre_attn_scalar): dim / n_heads
    for the 27B model (46 layers), else the head size, as Google's gemma_pytorch config does."""
    return (dim // n_heads if n_layers == 46 else head_dim) ** -0.5


def llama3_rope_factors(theta: float, head_dim: int, scaling: dict) -> list[float]:
    """The rope_freqs.weight convert_hf_to_gguf.py writes for Llama 3.1's scaling: 1 / Meta's stretch of each
    frequency (1 above the high-frequency wavelength, `factor` below the low one, smooth between)."""
    import math

    factor, old = scaling["factor"], scaling["original_max_position_embeddings"]
    low, high = old / scaling["low_freq_factor"], old / scaling["high_freq_factor"]
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < high:
            out.append(1.0)
        elif wavelen > low:
            out.append(factor)
        else:
            smooth = (old / wavelen - scaling["low_freq_factor"]) / (scaling["high_freq_factor"]
                                                                      - scaling["low_freq_factor"])
            out.append(1 / ((1 - smooth) / factor + smooth))
    return out


def check_writable(args: ModelArgs, arch: str) -> None:
    """Refuse a model llama.cpp's graph for `arch` would compute differently (a clear ConfigError)."""
    from nabla.model.args import LLAMA_SWITCHES
    from nabla.model.rope import rope_kind

    def refuse(what: str, fix: str = "convert it with --to hf instead") -> None:
        raise ConfigError(f"GGUF output ({arch!r} architecture) cannot express this {args.model_type!r} model's "
                          f"{what}: llama.cpp would compute something else; {fix}")

    for k in SHAPE_SWITCHES:
        want = ARCH_SWITCHES[arch].get(k, LLAMA_SWITCHES[k])
        if getattr(args, k) != want:
            refuse(f"{k}={getattr(args, k)!r} (the {arch} architecture has {want!r})")
    kind = rope_kind(args.rope_scaling)
    if kind not in ("default", "linear") and not (kind == "llama3" and arch == "llama") \
            and not (kind == "longrope" and arch == "phi3"):
        refuse(f"{kind!r} rope scaling")
    if arch == "gemma2":
        if args.attn_logit_softcap is None or args.final_logit_softcap is None:
            refuse("missing soft-capping (llama.cpp's gemma2 always soft-caps)")
        want = gemma2_attn_scale(args.dim, args.n_heads, args.head_dim, args.n_layers)
        if args.attn_scale is None or abs(args.attn_scale - want) > 1e-6 * want:
            refuse(f"attention scale {args.attn_scale} (query_pre_attn_scalar {args.attn_scale ** -2:g}; llama.cpp "
                   f"uses {want ** -2:g}: the head size, or dim / n_heads with 46 layers)")
        sliding = [i for i in range(args.n_layers) if args.window_of(i) is not None]
        if args.sliding_window is None or sliding != list(range(0, args.n_layers, 2)):
            refuse(f"sliding layers {sliding} (llama.cpp slides on the even layers of a gemma2 model)")
    else:
        if args.attn_logit_softcap is not None or args.final_logit_softcap is not None:
            refuse("soft-capping (llama.cpp soft-caps gemma2 only)")
        if args.attn_scale is not None and abs(args.attn_scale - args.head_dim ** -0.5) > 1e-9:
            refuse(f"attention scale {args.attn_scale}")
        if args.sliding_window is not None and (arch not in ("llama", "phi3") or args.sliding_layers is not None):
            refuse("sliding window" + (" on some layers only" if args.sliding_layers is not None else ""))


def write_hparams(w, args: ModelArgs, context_length: int) -> list[tuple[str, list[float]]]:
    """Write the architecture's metadata with the GGUFWriter `w` (keys as convert_hf_to_gguf.py writes them);
    returns the rotary tensors to store as well ([(llama.cpp name, values)])."""
    gguf = _gguf()
    from nabla.model.rope import rope_kind

    arch = arch_of(args)
    check_writable(args, arch)
    w.add_context_length(context_length)
    w.add_embedding_length(args.dim)
    w.add_block_count(args.n_layers)
    w.add_feed_forward_length(args.hidden_dim)
    w.add_head_count(args.n_heads)
    w.add_head_count_kv(args.n_kv_heads)
    w.add_key_length(args.head_dim)
    w.add_value_length(args.head_dim)
    w.add_rope_dimension_count(args.head_dim)
    w.add_layer_norm_rms_eps(args.norm_eps)
    w.add_rope_freq_base(args.rope_theta)
    if arch == "llama":
        w.add_vocab_size(args.vocab_size)
    if args.sliding_window is not None:  # llama.cpp ignores it for llama and (for now) phi3; nabla reads it
        w.add_sliding_window(args.sliding_window)
    elif arch == "phi3":
        w.add_sliding_window(0)
    if arch == "gemma2":
        w.add_attn_logit_softcapping(args.attn_logit_softcap)
        w.add_final_logit_softcapping(args.final_logit_softcap)
    s, kind, tensors = args.rope_scaling, rope_kind(args.rope_scaling), []

    def name(t: str) -> str:
        return gguf.TENSOR_NAMES[gguf.MODEL_TENSOR[t]] + ".weight"

    if kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(s["factor"])
    elif kind == "llama3":
        tensors.append((name("ROPE_FREQS"), llama3_rope_factors(args.rope_theta, args.head_dim, s)))
    elif kind == "longrope":
        w.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)
        w.add_rope_scaling_attn_factors(s["attention_factor"])
        tensors += [(name("ROPE_FACTORS_LONG"), s["long_factor"]), (name("ROPE_FACTORS_SHORT"), s["short_factor"])]
    if arch == "phi3":
        w.add_rope_scaling_orig_ctx_len(s["original_max_position_embeddings"] if kind == "longrope"
                                        else context_length)
    return tensors


REFUSED_KEYS = {  # Keys member (formatted with the architecture) -> what nabla would need for it
    ("LLM", "EXPERT_COUNT"): "mixture-of-experts feed-forward layers",
    ("LLM", "LOGIT_SCALE"): "a scale on the output logits",
    ("LLM", "EMBEDDING_SCALE"): "a scale on the embeddings",
    ("LLM", "RESIDUAL_SCALE"): "a scale on the residual branches",
    ("LLM", "USE_PARALLEL_RESIDUAL"): "parallel attention and feed-forward",
    ("Attention", "SCALE"): "a fixed attention scale",
    ("Attention", "CLAMP_KQV"): "clamped q/k/v",
    ("Attention", "SLIDING_WINDOW_PATTERN"): "a per-layer sliding-window pattern",
    ("Attention", "LAYERNORM_EPS"): "LayerNorm (nabla runs RMSNorm)",
    ("Rope", "DIMENSION_SECTIONS"): "multi-section (M-RoPE) rotary embeddings",
}


def args_from_metadata(meta: dict, values: Callable[[str], list[float] | None], has_output: bool,
                       vocab: int, path) -> tuple[ModelArgs, int | None]:
    """(ModelArgs, trained context) from a GGUF file's metadata; `values(name)` reads a rotary-factor tensor
    (None when the file lacks it). Every key that changes the arithmetic in a way nabla does not run is a
    ConfigError naming the file and the key; a missing required key is a CheckpointError."""
    from nabla.errors import CheckpointError

    gguf = _gguf()
    K = gguf.Keys
    arch = meta.get(K.General.ARCHITECTURE)
    if arch not in ARCHS:
        if arch in NOT_RUN:
            raise ConfigError(f"{path} is a {arch!r} model (general.architecture); nabla does not implement its "
                              f"{NOT_RUN[arch]}: use llama.cpp for this file. nabla runs the GGUF architectures "
                              f"{', '.join(ARCHS)}")
        raise ConfigError(f"{path} is a {arch!r} model (general.architecture); nabla runs the GGUF architectures "
                          f"{', '.join(ARCHS)}: use llama.cpp for this file, or run the model's Hugging Face folder")

    def get(key: str, default=...):
        key = key.format(arch=arch)
        value = meta.get(key, default)
        if isinstance(value, float):  # stored as float32: the shortest decimal that is that float32 (1e-05)
            value = float(str(np.float32(value)))
        if value is ...:
            raise CheckpointError(f"{path} has no {key} in its metadata; the file is incomplete: convert "
                                  "the model again with llama.cpp's convert_hf_to_gguf.py")
        if isinstance(value, list):
            raise ConfigError(f"{path}: {key} differs between layers ({value[:4]}...); nabla runs "
                              "models whose layers all have the same shape")
        return value

    for (group, member), what in REFUSED_KEYS.items():
        key = getattr(getattr(K, group), member).format(arch=arch)
        value = meta.get(key)
        if member == "LAYERNORM_EPS":
            bad = value is not None and K.Attention.LAYERNORM_RMS_EPS.format(arch=arch) not in meta
        elif member == "SCALE":  # fine where it is the usual 1 / sqrt(head size)
            head = meta.get(K.Attention.KEY_LENGTH.format(arch=arch)) or (
                meta.get(K.LLM.EMBEDDING_LENGTH.format(arch=arch), 0) // max(1, meta.get(
                    K.Attention.HEAD_COUNT.format(arch=arch), 1)))
            bad = value is not None and not (head and abs(value - head ** -0.5) <= 1e-6 * head ** -0.5)
        else:
            bad = value not in (None, 0, False, [], 1.0)
        if bad:
            raise ConfigError(f"{path}: {key} = {meta[key]!r} asks for {what}, which nabla does not implement; "
                              "use llama.cpp for this file")
    for key in (K.LLM.ATTN_LOGIT_SOFTCAPPING, K.LLM.FINAL_LOGIT_SOFTCAPPING):
        key = key.format(arch=arch)
        if arch != "gemma2" and meta.get(key):
            raise ConfigError(f"{path}: {key} asks for soft-capping, which nabla runs for gemma2 only; use "
                              "llama.cpp for this file")
    n_heads = get(K.Attention.HEAD_COUNT)
    dim = get(K.LLM.EMBEDDING_LENGTH)
    n_layers = get(K.LLM.BLOCK_COUNT)
    head_dim = get(K.Attention.KEY_LENGTH, dim // n_heads if n_heads else 0)
    if get(K.Attention.VALUE_LENGTH, head_dim) != head_dim:
        raise ConfigError(f"{path}: {K.Attention.VALUE_LENGTH.format(arch=arch)} differs from the key length "
                          f"({head_dim}); nabla runs equal key and value heads")
    rot = get(K.Rope.DIMENSION_COUNT, head_dim)
    if rot != head_dim:
        raise ConfigError(f"{path} rotates {rot} of each head's {head_dim} channels "
                          f"({K.Rope.DIMENSION_COUNT.format(arch=arch)}); nabla rotates them all (no partial rotary)")
    theta = float(get(K.Rope.FREQ_BASE, 10000.0))
    context = get(K.LLM.CONTEXT_LENGTH, None)
    scaling = _rope_scaling(arch, get, values, theta, head_dim, context, path)
    window = get(K.Attention.SLIDING_WINDOW, None) or None
    kw = dict(ARCH_SWITCHES[arch])
    if arch == "gemma2":
        window = window or GEMMA2_WINDOW
        kw.update(attn_logit_softcap=float(get(K.LLM.ATTN_LOGIT_SOFTCAPPING, 50.0)),
                  final_logit_softcap=float(get(K.LLM.FINAL_LOGIT_SOFTCAPPING, 30.0)),
                  attn_scale=gemma2_attn_scale(dim, n_heads, head_dim, n_layers),
                  sliding_layers=list(range(0, n_layers, 2)) if n_layers > 1 else None)
    elif arch not in ("llama", "phi3"):
        window = None  # llama.cpp's qwen2/qwen3/gemma graphs have no sliding window
    model_type = {"llama": "mistral" if window else "llama"}.get(arch, arch)
    try:
        args = ModelArgs(dim=dim, n_layers=n_layers, n_heads=n_heads,
                         n_kv_heads=get(K.Attention.HEAD_COUNT_KV, n_heads), vocab_size=vocab,
                         norm_eps=float(get(K.Attention.LAYERNORM_RMS_EPS, 1e-5)), rope_theta=theta,
                         rope_scaling=scaling, head_dim=head_dim if head_dim != dim // n_heads else None,
                         hidden_dim=get(K.LLM.FEED_FORWARD_LENGTH), tie_word_embeddings=not has_output,
                         model_type=model_type, sliding_window=int(window) if window else None, **kw)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return args, context


def _rope_scaling(arch, get, values, theta, head_dim, context, path) -> dict | None:
    import math

    from nabla.model.args import LLAMA3_ROPE_SCALING

    gguf = _gguf()
    K = gguf.Keys
    kind = get(K.Rope.SCALING_TYPE, "none") or "none"
    freqs = values(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight")
    long = values(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FACTORS_LONG] + ".weight")
    short = values(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT] + ".weight")
    if freqs is not None:  # Llama 3.1-style: match the factors against Meta's scaling
        for factor in (8.0, 16.0, 32.0, 4.0, 2.0):  # Llama 3.1 and 3.2 use 8 and 32
            s = dict(LLAMA3_ROPE_SCALING, factor=factor)
            got = llama3_rope_factors(theta, head_dim, s)
            if len(got) == len(freqs) and all(math.isclose(a, b, rel_tol=1e-3) for a, b in zip(got, freqs)):
                return s
        raise ConfigError(f"{path}: its rope_freqs.weight factors are not Llama 3's rope scaling (factor 2 to 32, "
                          "original context 8192); nabla cannot run this rope yet")
    if long is not None or short is not None:
        if arch != "phi3" or long is None or short is None:
            raise ConfigError(f"{path}: rope_factors_long/short on a {arch!r} model; nabla runs them for phi3 "
                              "(both present) only")
        original = get(K.Rope.SCALING_ORIG_CTX_LEN, context)
        if not original or not context:
            raise ConfigError(f"{path}: longrope factors need {K.Rope.SCALING_ORIG_CTX_LEN.format(arch=arch)} and "
                              f"{K.LLM.CONTEXT_LENGTH.format(arch=arch)}; convert the model again")
        factor = context / original
        attn = get(K.Rope.SCALING_ATTN_FACTOR, None)
        if attn is None:
            attn = math.sqrt(1 + math.log(factor) / math.log(original)) if factor > 1 else 1.0
        return {"rope_type": "longrope", "long_factor": list(long), "short_factor": list(short),
                "original_max_position_embeddings": int(original), "factor": factor, "attention_factor": float(attn)}
    if kind == "none":
        return None
    if kind == "linear":
        factor = float(get(K.Rope.SCALING_FACTOR, 1.0))
        return None if factor == 1.0 else {"rope_type": "linear", "factor": factor}
    raise ConfigError(f"{path}: {K.Rope.SCALING_TYPE.format(arch=arch)} is {kind!r}, rope scaling nabla does not "
                      "read from GGUF yet (it reads linear, Llama 3's rope_freqs and Phi-3's longrope); run the "
                      "model's Hugging Face folder, or use llama.cpp for this file")
