"""The Llama transformer as Meta defines it.

RMSNorm, rotary position embeddings (frequencies from nabla.model.rope),
grouped-query attention with a key/value cache, SwiGLU feed-forward, untied
(or tied) output head. Parameter names are Meta's (`wq`, `w1`,
`attention_norm`...) so Meta state dicts load as they are.

The other families are this model with switches of ModelArgs set: q/k/v
biases (Qwen2), per-head q/k norms (Qwen3), (1 + w) norms, GeGLU and scaled
embeddings (Gemma), sliding-window attention (Mistral, Gemma 2, Phi-3),
soft-capped scores and logits and norms after attention and feed-forward
(Gemma 2). A sliding window is a mask over the full cache: exact, not a
memory saving.

The forward pass returns float32 logits; sampling lives in nabla.generation.
Each sequence of a batch may sit at its own position in the cache (`start_pos`
as a tensor), which is what batched decoding and the server need.

The model holds no run sizes: `setup_cache(max_batch_size, max_seq_len)`
allocates the key/value cache and sizes the rotary table; a pass without the
cache grows the table to its length. Leaves out: putting the model on a
device and choosing its kernels (nabla.model.prepare), sampling, tensor
parallelism (nabla.distributed).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nabla.device import complex_ok
from nabla.model import cpu_kernels, cpu_step
from nabla.model.args import ModelArgs
from nabla.model.kv_cache import KVCache
from nabla.model.rope import LENGTH_DEPENDENT, rope_frequencies, rope_kind, rope_table

__all__ = ["Transformer", "RMSNorm", "Attention", "FeedForward", "TransformerBlock", "Positions",
           "apply_rotary", "rope_frequencies", "rope_table"]


class RMSNorm(nn.Module):
    row_kernel = False
    """Set by nabla.model.cpu_kernels on models whose layers run its kernels: decode-sized
    calls on the CPU then normalise in one numba call (torch's reductions cost ~30 us each)."""

    def __init__(self, dim: int, eps: float = 1e-5, unit_offset: bool = False):
        super().__init__()
        self.eps, self.unit_offset = eps, unit_offset
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.unit_offset:  # Gemma: scale by (1 + w) in float32, then round once
            return (F.rms_norm(x.float(), self.weight.shape, eps=self.eps) * (1.0 + self.weight.float())).type_as(x)
        if self.row_kernel and self.weight.dtype == torch.float32 and cpu_kernels.usable(x):
            return cpu_kernels.rms_norm(x, self.weight, self.eps)
        # Normalise in float32 whatever the compute dtype, as Meta does (one
        # fused kernel instead of pow, mean, add, rsqrt, mul).
        return F.rms_norm(x.float(), self.weight.shape, eps=self.eps).type_as(x) * self.weight


def apply_rotary(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate each adjacent channel pair (x0, x1) of x (B, T, H, hd) by its angle.

    Meta pairs channels (0,1), (2,3), ... (as complex numbers); Hugging Face
    checkpoints permute the q/k weights so that pairs are (i, i + hd/2) instead,
    which the HF loader undoes. freqs: complex (B or 1, T, 1, hd/2). One complex
    multiply is one kernel, where cos/sin arithmetic on halves takes eight.
    """
    if not freqs.is_complex():  # devices without complex kernels: (cos, sin) in the last axis
        xf = x.float().unflatten(-1, (-1, 2))
        x0, x1, cos, sin = xf[..., 0], xf[..., 1], freqs[..., 0], freqs[..., 1]
        return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2).type_as(x)
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * freqs).flatten(-2).type_as(x)


def attend(q, k, v, mask, scale: float | None, softcap: float | None) -> torch.Tensor:
    """softmax(q k^T * scale [soft-capped] + mask) v for q (B, h, T, hd) and k, v (B, kv_h, L, hd); mask
    True where a query may attend a key (None: every key). With a soft cap, the scores are computed here
    (as transformers' eager attention does, softmax in float32); without one, by torch's fused kernel."""
    gqa = q.shape[1] != k.shape[1]
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    if gqa:
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    scores = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, window: int | None = None):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        bias = args.qkv_bias
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=bias)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=bias)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=bias)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        if args.qk_norm:  # over each head's channels, before the rotation
            self.q_norm = RMSNorm(args.head_dim, args.norm_eps)
            self.k_norm = RMSNorm(args.head_dim, args.norm_eps)
        self.qk_norm = args.qk_norm
        self.window, self.scale, self.softcap = window, args.attn_scale, args.attn_logit_softcap
        self.cache: KVCache | None = None
        self.dropout = 0.0

    def forward(self, x, freqs, pos: Positions | None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = cpu_kernels.project(x, self.wq, self.wk, self.wv)
        q, k, v = (t.view(B, T, -1, self.head_dim) for t in (q, k, v))
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, freqs), apply_rotary(k, freqs)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, h, T, hd)
        if pos is None and self.window is None and self.softcap is None:
            # training / no cache: plain causal attention
            y = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1], scale=self.scale,
                dropout_p=self.dropout if self.training else 0.0)
        elif pos is None:
            idx = torch.arange(T, device=x.device)
            y = attend(q, k, v, visible(idx, T, self.window), self.scale, self.softcap)
        else:
            k, v = self.cache.update(pos, k, v)
            y = attend(q, k, v, pos.mask_for(self.window), self.scale, self.softcap)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, act: str = "silu"):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = cpu_kernels.project(x, self.w1, self.w3)
        gate = F.silu(gate) if self.act == "silu" else F.gelu(gate, approximate="tanh")
        return self.w2(gate * up)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer: int = 0):
        super().__init__()
        self.attention = Attention(args, args.window_of(layer))
        self.feed_forward = FeedForward(args.dim, args.hidden_dim, args.hidden_act)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps, args.norm_unit_offset)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps, args.norm_unit_offset)
        if args.post_norms:  # Gemma 2: normalise each sub-layer's output too, before adding it
            self.post_attention_norm = RMSNorm(args.dim, args.norm_eps, args.norm_unit_offset)
            self.post_ffn_norm = RMSNorm(args.dim, args.norm_eps, args.norm_unit_offset)
        self.post_norms = args.post_norms
        self.drop = nn.Dropout(0.0)

    def forward(self, x, freqs, pos):
        a = self.attention(self.attention_norm(x), freqs, pos)
        if self.post_norms:
            a = self.post_attention_norm(a)
        h = x + self.drop(a)
        f = self.feed_forward(self.ffn_norm(h))
        if self.post_norms:
            f = self.post_ffn_norm(f)
        return h + self.drop(f)


def visible(idx: torch.Tensor, length: int, window: int | None) -> torch.Tensor:
    """True where a query at position idx[..., t] may attend key position j < length: j <= idx, and with a
    sliding window also j > idx - window (the query and the window - 1 positions before it)."""
    keys = torch.arange(length, device=idx.device)
    mask = keys <= idx[..., None]
    if window is not None:
        mask &= keys > idx[..., None] - window
    return mask


class Positions:
    """Where a forward pass writes into and reads from the key/value cache.

    `start` is an int (every sequence at the same position, as in Meta's
    generate) or a (B,) tensor (each sequence at its own position); `rows`
    picks the cache rows (default: rows 0..B-1). `mask` is True where a query
    may attend a key.
    """

    def __init__(self, start: int | torch.Tensor, T: int, B: int, device, rows: torch.Tensor | None = None,
                 length: int | None = None):
        """`length` (with a tensor `start`): attend over that many cache positions, masked, rather than
        up to the furthest sequence; a shape that does not change with the positions, and no host sync."""
        self.start, self.T, self.rows = start, T, rows
        if isinstance(start, int) and rows is None:
            self.idx = torch.arange(start, start + T, device=device)  # (T,)
            self.length = start + T
            # One query at the end of the filled cache may see every key: no mask.
            self.mask = None if T == 1 else (
                torch.arange(self.length, device=device)[None, :] <= self.idx[:, None])
        else:
            start = torch.as_tensor(start, device=device).reshape(-1).expand(B)
            self.idx = start[:, None] + torch.arange(T, device=device)  # (B, T)
            self.length = length if length is not None else int(self.idx.max()) + 1
            keys = torch.arange(self.length, device=device)
            self.mask = (keys[None, None, :] <= self.idx[:, :, None])[:, None]  # (B, 1, T, L)
        # Rows r0, r0+1, ... in order (always so without `rows`): the cache rows
        # are read as a view; otherwise they are gathered, a copy per layer.
        self.row_range = None
        if rows is None:
            self.row_range = (0, B)
        else:
            r = rows.tolist()
            if r == list(range(r[0], r[0] + len(r))):
                self.row_range = (r[0], r[0] + len(r))
        self.shared = self.idx.dim() == 1
        self._window_masks: dict[int, torch.Tensor] = {}

    def mask_for(self, window: int | None) -> torch.Tensor | None:
        """The mask of a layer attending within `window` positions (None: the causal `mask`), made once
        per pass and shared by the layers with that window."""
        if window is None:
            return self.mask
        if window not in self._window_masks:
            m = visible(self.idx, self.length, window)  # (T, L) or (B, T, L)
            self._window_masks[window] = m if self.shared else m[:, None]
        return self._window_masks[window]


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs, dropout: float = 0.0):
        super().__init__()
        if args.vocab_size <= 0:
            raise ValueError("ModelArgs.vocab_size must be set (from the tokenizer) before building the model")
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps, args.norm_unit_offset)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight
        # (positions, hd/2, 2): empty until setup_cache or a pass without the cache sizes it
        self.register_buffer("rope", torch.empty(0, args.head_dim // 2, 2), persistent=False)
        # longrope: the table with the long factors, for sequences past the original context
        self.register_buffer("rope_long", torch.empty(0, args.head_dim // 2, 2), persistent=False)
        self.rope_kind = rope_kind(args.rope_scaling)
        self.step_graphs = None  # nabla.model.graphs.StepGraphs, made by the first decode()
        self.cpu_step = None  # (key, nabla.model.cpu_step.CpuStep or None), made by the first CPU pass
        self.set_dropout(dropout)

    def init_rope(self, max_seq_len: int | None = None) -> None:
        """(Re)compute the float32 rotary table for `max_seq_len` positions (None: as many as it has) on the
        model's device, after to_empty / to(dtype)."""
        length = self.rope.shape[0] if max_seq_len is None else max_seq_len
        device = self.tok_embeddings.weight.device
        self.rope = rope_table(self.args, length).to(device)
        if self.rope_kind == "longrope":
            beyond = self.args.rope_scaling["original_max_position_embeddings"] + 1
            self.rope_long = rope_table(self.args, length, seq_len=beyond).to(device)

    def set_dropout(self, p: float) -> None:
        for layer in self.layers:
            layer.drop.p = p
            layer.attention.dropout = p

    def setup_cache(self, max_batch_size: int, max_seq_len: int) -> None:
        """Allocate the key/value cache for `max_batch_size` sequences of up to `max_seq_len` positions,
        once, on the model's device and dtype; the rotary table grows to cover them."""
        w = self.tok_embeddings.weight  # the compute dtype (wk may hold int8 once quantized)
        for layer in self.layers:
            a = layer.attention
            a.cache = KVCache(max_batch_size, a.n_kv_heads, max_seq_len, a.head_dim, w.dtype, w.device)
        self.step_graphs = None  # recorded against the old cache
        if self.rope.shape[0] < max_seq_len or self.rope.dtype != torch.float32:
            self.init_rope(max_seq_len)

    def decode(self, tokens: torch.Tensor, start_pos: int) -> torch.Tensor:
        """Logits (B, 1, vocab) for one new token per sequence, all at `start_pos`: the same as
        forward(tokens, start_pos, last_only=True), replayed from a recorded graph of the step where
        the device records them (CUDA), which removes the per-kernel launch cost of small batches."""
        if self.step_graphs is None:
            from nabla.model.graphs import StepGraphs

            self.step_graphs = StepGraphs(self)
        return self.step_graphs(tokens, start_pos)

    def forward(
        self,
        tokens: torch.Tensor,
        start_pos: int | torch.Tensor | None = None,
        *,
        rows: torch.Tensor | None = None,
        last_only: bool = False,
        return_hidden: bool = False,
        cache_len: int | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, vocab) in float32 for tokens (B, T).

        With `start_pos` None the pass is stateless and causal (training,
        scoring); otherwise keys and values are written to the cache at
        start_pos.. and attention reads everything cached before them.
        `last_only` computes logits for the last position only (B, 1, vocab).
        `return_hidden` returns the final normalised hidden states instead.
        `cache_len` (with a tensor `start_pos`) attends over that many cache
        positions, masked, so that every step has the same shapes (graphs).
        """
        B, T = tokens.shape
        if start_pos is not None and tokens.device.type == "cpu" and cache_len is None and not return_hidden:
            logits = cpu_step.run(self, tokens, start_pos, rows, last_only)  # a few compiled calls
            if logits is not None:
                return logits
        h = self.tok_embeddings(tokens)
        if self.args.scale_embeddings:  # Gemma: sqrt(dim), rounded to the compute dtype first
            h = h * torch.tensor(self.args.dim ** 0.5, dtype=h.dtype)
        if self.rope.dtype != torch.float32:  # a .to(dtype) cast the table: rebuild it exact
            self.init_rope()
        if start_pos is None:
            if self.rope.shape[0] < T:  # no cache sized the table: make it as long as this pass
                self.init_rope(T)
            pos = None
        else:
            pos = Positions(start_pos, T, B, tokens.device, rows, cache_len)
        if self.rope_kind in LENGTH_DEPENDENT:
            table = self.length_dependent_rope(pos, T, tokens.device)
        elif pos is None:
            table = self.rope[None, :T]  # a view, no copy
        elif isinstance(start_pos, int) and rows is None:
            table = self.rope[None, start_pos: start_pos + T]
        else:
            table = self.rope[pos.idx if not pos.shared else pos.idx[None]]  # (B or 1, T, hd/2, 2)
        if complex_ok(tokens.device):
            freqs = torch.view_as_complex(table)[:, :, None]  # (B or 1, T, 1, hd/2)
        else:
            freqs = table[:, :, None]  # (B or 1, T, 1, hd/2, 2): cos and sin
        for layer in self.layers:
            h = layer(h, freqs, pos)
        h = self.norm(h)
        if return_hidden:
            return h
        if last_only:
            h = h[:, -1:]
        logits = self.output(h)
        if self.args.final_logit_softcap is not None:
            cap = self.args.final_logit_softcap
            logits = torch.tanh(logits / cap) * cap
        return logits.float()

    def length_dependent_rope(self, pos: Positions | None, T: int, device) -> torch.Tensor:
        """(B or 1, T, hd/2, 2) rotations where they depend on how far each sequence reaches in this pass
        ("dynamic", "longrope"; see nabla.model.rope): from its furthest position + 1, as transformers."""
        idx = torch.arange(T, device=device)[None] if pos is None else (pos.idx[None] if pos.shared else pos.idx)
        seq_len = idx.max(dim=-1).values + 1  # (B or 1,)
        if self.rope_kind == "dynamic":
            return rope_table(self.args, idx, seq_len)
        beyond = seq_len > self.args.rope_scaling["original_max_position_embeddings"]
        return torch.where(beyond[:, None, None, None], self.rope_long[idx], self.rope[idx])
