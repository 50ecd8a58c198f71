"""Model hyper-parameters: one dataclass and the one table of named model
shapes (used by `nabla train --preset` and `nabla bench --shape`).

ModelArgs is the architecture only. How many sequences and positions a run
holds (max_batch_size, max_seq_len) are sizes of the key/value cache, given
to `Transformer.setup_cache` (see nabla.model.prepare), not fields here.

Families other than Llama (Mistral, Qwen, Gemma, Phi-3) are the same model
with a few switches set (qkv_bias, qk_norm, norm_unit_offset, hidden_act,
scale_embeddings, sliding_window, soft-capping, post_norms, attn_scale);
each switch is named for what it changes, and its default is Llama's.

Leaves out: reading files (see nabla.checkpoint: Meta's params.json in
meta.py, Hugging Face config.json in hf.py and families.py, all mapped onto
these fields) and the rotary frequencies themselves (nabla.model.rope).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from nabla.errors import ConfigError

# Llama 3.1's "use_scaled_rope": the frequency scaling Meta applies to rope_theta.
LLAMA3_ROPE_SCALING = {
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

DEFAULT_CONTEXT = 2048
"""Context length written into exported configs when the source names none (Meta's default max_seq_len)."""


@dataclass
class ModelArgs:
    dim: int = 4096
    """Width of the residual stream."""
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    """Key/value heads for grouped-query attention; None means n_heads (MHA)."""
    vocab_size: int = -1
    """-1 means: take it from the tokenizer."""
    multiple_of: int = 256
    """The feed-forward width is rounded up to a multiple of this."""
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    """Frequency scaling: Llama 3's (factor, low/high_freq_factor, original_max_position_embeddings; no
    "rope_type" key) or {"rope_type": "linear" | "dynamic" | "yarn" | "longrope", ...} (nabla.model.rope)."""
    head_dim: int | None = None
    """Per-head width; None means dim // n_heads (Hugging Face configs may set it)."""
    hidden_dim: int | None = None
    """Feed-forward width; None means derived from dim, multiple_of and ffn_dim_multiplier."""
    tie_word_embeddings: bool = False
    """Output head shares the token embedding (some Hugging Face models)."""
    model_type: str = "llama"
    """The Hugging Face family the weights are named and exported as (llama, mistral, qwen2, ...)."""
    qkv_bias: bool = False
    """q, k and v projections have biases (Qwen2)."""
    qk_norm: bool = False
    """RMSNorm over each head of q and k before the rotation (Qwen3)."""
    norm_unit_offset: bool = False
    """RMSNorm scales by (1 + w), in float32 before casting back (Gemma)."""
    hidden_act: str = "silu"
    """Gate activation of the feed-forward: "silu" (SwiGLU) or "gelu_tanh" (GeGLU, Gemma)."""
    scale_embeddings: bool = False
    """Multiply token embeddings by sqrt(dim), rounded to the compute dtype (Gemma)."""
    sliding_window: int | None = None
    """Attend to at most this many most recent positions (the query's own included) (Mistral, Gemma 2)."""
    sliding_layers: list[int] | None = None
    """The layers that use sliding_window; None means all of them."""
    attn_logit_softcap: float | None = None
    """Attention scores become cap * tanh(score / cap) before the mask (Gemma 2)."""
    final_logit_softcap: float | None = None
    """Output logits become cap * tanh(logit / cap) (Gemma 2)."""
    post_norms: bool = False
    """RMSNorm on the outputs of attention and feed-forward before each residual add (Gemma 2)."""
    attn_scale: float | None = None
    """Factor on q.k scores; None means head_dim ** -0.5 (Gemma 2: query_pre_attn_scalar ** -0.5)."""

    def __post_init__(self):
        for name in ("dim", "n_layers", "n_heads", "multiple_of"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if not isinstance(self.n_kv_heads, int) or self.n_kv_heads <= 0:
            raise ConfigError(f"n_kv_heads must be a positive integer, got {self.n_kv_heads!r}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ConfigError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
            self.head_dim = self.dim // self.n_heads
        if self.head_dim % 2:
            raise ConfigError(f"the head size ({self.head_dim}) must be even for rotary embeddings")
        if not isinstance(self.vocab_size, int) or (self.vocab_size <= 0 and self.vocab_size != -1):
            raise ConfigError(f"vocab_size must be a positive integer or -1, got {self.vocab_size!r}")
        if not (isinstance(self.norm_eps, (int, float)) and 0 < self.norm_eps < 1):
            raise ConfigError(f"norm_eps must be a small positive number, got {self.norm_eps!r}")
        if not (isinstance(self.rope_theta, (int, float)) and self.rope_theta > 0):
            raise ConfigError(f"rope_theta must be positive, got {self.rope_theta!r}")
        if self.ffn_dim_multiplier is not None and not (
                isinstance(self.ffn_dim_multiplier, (int, float)) and self.ffn_dim_multiplier > 0):
            raise ConfigError(f"ffn_dim_multiplier must be positive, got {self.ffn_dim_multiplier!r}")
        if self.rope_scaling is not None:
            from nabla.model.rope import check_rope_scaling

            self.rope_scaling = check_rope_scaling(self.rope_scaling, self.head_dim)
        if self.hidden_act not in ("silu", "gelu_tanh"):
            raise ConfigError(f"hidden_act must be 'silu' or 'gelu_tanh', got {self.hidden_act!r}")
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int)
                                                or self.sliding_window < 1):
            raise ConfigError(f"sliding_window must be a positive integer or None, got {self.sliding_window!r}")
        for name in ("attn_logit_softcap", "final_logit_softcap", "attn_scale"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and value > 0):
                raise ConfigError(f"{name} must be a positive number or None, got {value!r}")
        if self.hidden_dim is None:
            self.hidden_dim = ffn_hidden_dim(self.dim, self.multiple_of, self.ffn_dim_multiplier)

    def to_params(self) -> dict:
        """The params.json Meta's code (and nabla) reads back into the same model."""
        params = {
            "dim": self.dim, "n_layers": self.n_layers, "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads, "vocab_size": self.vocab_size,
            "multiple_of": self.multiple_of, "ffn_dim_multiplier": self.ffn_dim_multiplier,
            "norm_eps": self.norm_eps, "rope_theta": self.rope_theta,
        }
        if self.ffn_dim_multiplier is None:
            del params["ffn_dim_multiplier"]
        if self.rope_scaling is not None:
            if self.rope_scaling == LLAMA3_ROPE_SCALING:
                params["use_scaled_rope"] = True
            else:
                params["rope_scaling"] = dict(self.rope_scaling)
        if self.head_dim != self.dim // self.n_heads:
            params["head_dim"] = self.head_dim
        if self.hidden_dim != ffn_hidden_dim(self.dim, self.multiple_of, self.ffn_dim_multiplier):
            params["hidden_dim"] = self.hidden_dim
        if self.tie_word_embeddings:
            params["tie_word_embeddings"] = True
        return params

    def window_of(self, layer: int) -> int | None:
        """The sliding window of layer `layer`, or None where it attends to every earlier position."""
        if self.sliding_window is None or (self.sliding_layers is not None and layer not in self.sliding_layers):
            return None
        return self.sliding_window

    @property
    def is_llama(self) -> bool:
        """Whether every family switch is Llama's, so that Meta's params.json can hold the model."""
        return all(getattr(self, k) == v for k, v in LLAMA_SWITCHES.items())

    def as_dict(self) -> dict:
        return asdict(self)


LLAMA_SWITCHES = dict(model_type="llama", qkv_bias=False, qk_norm=False, norm_unit_offset=False,
                      hidden_act="silu", scale_embeddings=False, sliding_window=None, sliding_layers=None,
                      attn_logit_softcap=None, final_logit_softcap=None, post_norms=False, attn_scale=None)


def ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """SwiGLU width as Meta sizes it: 2/3 of 4*dim, scaled, rounded up to multiple_of."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)



# The one table of named model shapes. "tiny" is for tests; the rest match
# published models (stories15M/110M from llama2.c, TinyLlama 1.1B, Llama 2 7B).
SHAPES: dict[str, dict] = {
    "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=32),
    # nabla's built-in story model (src/nabla/assets/stories, see MODEL_CARD.md).
    "stories": dict(dim=192, n_layers=6, n_heads=6, vocab_size=4096, multiple_of=32),
    "stories15m": dict(dim=288, n_layers=6, n_heads=6, vocab_size=32000, multiple_of=32),
    "stories42m": dict(dim=512, n_layers=8, n_heads=8, vocab_size=32000, multiple_of=32),
    "110m": dict(dim=768, n_layers=12, n_heads=12, vocab_size=32000, multiple_of=32),
    "tinyllama-1.1b": dict(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, vocab_size=32000,
                           multiple_of=256, hidden_dim=5632),
    "llama2-7b": dict(dim=4096, n_layers=32, n_heads=32, vocab_size=32000, multiple_of=256),
}


def from_name(name: str, **overrides) -> ModelArgs:
    """ModelArgs for a named shape from SHAPES, with overrides."""
    key = name.lower()
    if key not in SHAPES:
        raise ConfigError(f"unknown model shape {name!r}; known shapes: {', '.join(SHAPES)}")
    return ModelArgs(**{**SHAPES[key], **overrides})


def param_count(args: ModelArgs) -> int:
    """Number of weights in a model of this shape."""
    d, hd = args.dim, args.head_dim
    attn = d * hd * (2 * args.n_heads + 2 * args.n_kv_heads)
    if args.qkv_bias:
        attn += hd * (args.n_heads + 2 * args.n_kv_heads)
    ffn = 3 * d * args.hidden_dim
    per_layer = attn + ffn + 2 * d
    emb = args.vocab_size * d
    return args.n_layers * per_layer + d + emb * (1 if args.tie_word_embeddings else 2)

