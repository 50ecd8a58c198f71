"""Rotary position embeddings: the frequencies of every RoPE variant, as one function of the config.

`rope_frequencies(args, seq_len)` returns the rotation speed of each channel
pair and the factor on cos and sin ("attention scaling"), as transformers'
ROPE_INIT_FUNCTIONS define them for: the plain rotation, "linear"
(positions divided by a factor), "dynamic" (NTK: theta grows with the
sequence length once past the original context), "llama3" (Llama 3.1's
per-wavelength blend), "yarn" (ramped blend plus a factor on cos/sin) and
"longrope" (Phi-3: per-channel factors, the long ones once the sequence
passes the original context). The two length-dependent kinds ("dynamic",
"longrope") are evaluated per forward pass at the sequence's furthest
position, which is what transformers does: keys already cached keep the
rotation they were written with.

Leaves out: partial rotary (rotating a fraction of each head; refused when
config.json is read), applying the rotation (nabla.model.llama.apply_rotary).
"""

from __future__ import annotations

import math

import torch

from nabla.errors import ConfigError

LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
LENGTH_DEPENDENT = ("dynamic", "longrope")
"""Kinds whose frequencies depend on how long the sequence is so far."""
KINDS = ("llama3", "linear", "dynamic", "yarn", "longrope")


def rope_kind(scaling: dict | None) -> str:
    """"default" (no scaling) or one of KINDS; a dict without "rope_type" is Llama 3's."""
    if scaling is None:
        return "default"
    return scaling.get("rope_type", scaling.get("type", "llama3"))


def _positive(scaling: dict, key: str) -> float:
    value = scaling.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ConfigError(f"rope scaling {rope_kind(scaling)!r} needs a positive {key}, got {value!r} "
                          f"in {scaling!r}")
    return value


def check_rope_scaling(scaling: dict, head_dim: int) -> dict:
    """The scaling settings checked and completed (defaults filled in), in the form rope_frequencies reads."""
    from nabla.model.args import LLAMA3_ROPE_SCALING

    if not isinstance(scaling, dict):
        raise ConfigError(f"rope_scaling must be a mapping, got {scaling!r}")
    kind = rope_kind(scaling)
    if kind not in KINDS:
        raise ConfigError(f"rope scaling of type {kind!r} is not supported; nabla implements "
                          f"{', '.join(repr(k) for k in KINDS)}")
    if kind == "llama3":
        out = dict(LLAMA3_ROPE_SCALING)
        out.update({k: scaling[k] for k in LLAMA3_KEYS if k in scaling})
        if not (out["factor"] > 0 and out["high_freq_factor"] > out["low_freq_factor"] > 0
                and out["original_max_position_embeddings"] > 0):
            raise ConfigError(f"invalid rope_scaling values: {scaling!r}")
        return out
    out = {"rope_type": kind}
    if kind != "linear":
        out["original_max_position_embeddings"] = int(_positive(scaling, "original_max_position_embeddings"))
    if kind in ("linear", "dynamic", "yarn"):
        out["factor"] = float(_positive(scaling, "factor"))
    if kind == "yarn":
        out["beta_fast"] = float(scaling.get("beta_fast") or 32)
        out["beta_slow"] = float(scaling.get("beta_slow") or 1)
        out["truncate"] = bool(scaling.get("truncate", True))
        factor, attention = out["factor"], scaling.get("attention_factor")
        if attention is None:
            mscale, mscale_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
            attention = _mscale(factor, mscale) / _mscale(factor, mscale_all) if mscale and mscale_all \
                else _mscale(factor)
        out["attention_factor"] = float(attention)
    if kind == "longrope":
        for key in ("short_factor", "long_factor"):
            f = scaling.get(key)
            if not isinstance(f, (list, tuple)) or len(f) != head_dim // 2:
                raise ConfigError(f"rope scaling 'longrope' needs {key}: a list of {head_dim // 2} numbers "
                                  f"(half the head size), got {f!r}")
            out[key] = [float(x) for x in f]
        out["attention_factor"] = float(_positive(scaling, "attention_factor"))
    return out


def _mscale(scale: float, mscale: float = 1) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def longrope_attention_factor(max_position_embeddings: int, original: int) -> float:
    """Phi-3's factor on cos/sin when config.json gives none: from how far the context was stretched."""
    factor = max_position_embeddings / original
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))


def _plain(theta: float | torch.Tensor, dim: int) -> torch.Tensor:
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    return 1.0 / (theta ** exponents)


def rope_frequencies(args, seq_len: int | torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """(inv_freq, attention_factor): float32 rotation speed of each channel pair (head_dim/2,) and the factor
    on cos and sin. `seq_len` matters for "dynamic" (a (B,) tensor gives (B, head_dim/2)) and "longrope"
    (the long factors past the original context); None means a sequence within it."""
    dim, s = args.head_dim, args.rope_scaling
    kind = rope_kind(s)
    if kind == "default":
        return _plain(args.rope_theta, dim), 1.0
    if kind == "linear":
        return _plain(args.rope_theta, dim) / s["factor"], 1.0
    if kind == "dynamic":
        # NTK: grow theta with the length once past the context; computed in float32 tensors, as transformers.
        old, factor = s["original_max_position_embeddings"], s["factor"]
        n = torch.as_tensor(old if seq_len is None else seq_len).clamp(min=old)
        theta = args.rope_theta * ((factor * n / old) - (factor - 1)) ** (dim / (dim - 2))
        exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=n.device).float() / dim
        return 1.0 / (theta[..., None] ** exponents), 1.0
    if kind == "llama3":
        # Slow down low frequencies (long wavelengths) by `factor`, keep high ones, blend in between.
        inv_freq = _plain(args.rope_theta, dim)
        factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old / wavelen - lo) / (hi - lo)
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        scaled = torch.where(wavelen > old / lo, inv_freq / factor, blended)
        return torch.where(wavelen < old / hi, inv_freq, scaled), 1.0
    if kind == "yarn":
        return _yarn(args.rope_theta, dim, s), s["attention_factor"]
    # longrope
    long = seq_len is not None and bool(torch.as_tensor(seq_len).max() > s["original_max_position_embeddings"])
    ext = torch.tensor(s["long_factor" if long else "short_factor"], dtype=torch.float32)
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    return 1.0 / (ext * args.rope_theta ** exponents), s["attention_factor"]


def _yarn(theta: float, dim: int, s: dict) -> torch.Tensor:
    """Interpolate (divide by factor) the slow channels, extrapolate the fast ones, ramp in between."""
    old, factor = s["original_max_position_embeddings"], s["factor"]

    def correction_dim(rotations: float) -> float:  # the channel that turns `rotations` times in `old`
        return dim * math.log(old / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(s["beta_fast"]), correction_dim(s["beta_slow"])
    if s["truncate"]:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = theta ** (torch.arange(0, dim, 2).float() / dim)
    extrapolate = 1 - ramp
    return (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate


def rope_table(args, positions: int | torch.Tensor, seq_len: int | torch.Tensor | None = None) -> torch.Tensor:
    """(cos, sin) of every (position, channel pair) angle, times the attention factor:
    (positions, head_dim/2, 2) float32 for `positions` an int (0..n-1) or a (T,) tensor; (B, T, head_dim/2, 2)
    for (B, T) positions with a (B,) `seq_len` ("dynamic").

    The last axis is a complex number's (real, imaginary) parts, so
    `torch.view_as_complex` reads the table as Meta's `freqs_cis` for free.
    """
    inv_freq, scale = rope_frequencies(args, seq_len)
    t = torch.arange(positions, dtype=torch.float32) if isinstance(positions, int) else positions.float()
    inv_freq = inv_freq.to(t.device)
    angles = t[..., None] * (inv_freq[:, None, :] if inv_freq.dim() == 2 else inv_freq)
    cos, sin = angles.cos(), angles.sin()
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    return torch.stack((cos, sin), dim=-1)
