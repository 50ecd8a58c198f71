"""Tensor (model) parallelism over torch.distributed: one model split across N processes.

Megatron-style, as Meta's reference does it with fairscale, for inference:

    wq, wk, wv, w1, w3   ColumnParallelLinear: each rank holds a slice of the
                         output features (its heads, its part of the hidden
                         layer); no communication
    wo, w2               RowParallelLinear: each rank holds the matching slice
                         of the input features and computes a partial sum;
                         one all_reduce adds them up
    tok_embeddings       VocabParallelEmbedding: a slice of the vocabulary
                         (rows); ids outside it give zeros; one all_reduce
    output               ColumnParallelLinear over the vocabulary, then one
                         all_gather, so every rank holds the full logits and
                         samples the same token from the same seeded stream
    norms, rope          replicated

`parallelize(model, world_size, rank)` takes a Transformer built at full
shape on the meta device, swaps those modules for the parallel ones and sets
each Attention's `n_heads`/`n_kv_heads` to the local counts (its forward
reshapes with -1 heads and the KV cache is built from `n_kv_heads`, so each
rank caches only its own heads). `rank_state` gives this rank's slice of
the weights as a lazy view, so a rank copies (and, from memory-mapped files,
pages in) only its own slice of every weight.

Leaves out: gradients through the collectives (these layers are for
inference), biases on the split layers (refused: Qwen2), pipeline
parallelism, data-parallel groups (the whole world is one model-parallel
group), replicating key/value heads when there are fewer of them than ranks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from nabla.checkpoint.shards import EMBEDDING, SPLIT_DIM, Entry, LazyState, embedding_split_dim, entries_of, weight_kind
from nabla.errors import ConfigError


class ColumnParallelLinear(nn.Module):
    """y = x W^T for this rank's rows of W (out_features / N of them).

    With `gather_output` every rank ends with the full y (all_gather along
    the last dim, in rank order); otherwise y stays local (the next layer is
    row-parallel and wants exactly this slice).
    """

    def __init__(self, in_features: int, out_features: int, world_size: int, *, gather_output: bool = False,
                 group=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.world_size, self.gather_output, self.group = world_size, gather_output, group
        self.weight = nn.Parameter(torch.empty(out_features // world_size, in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)  # (..., out/N)
        if not self.gather_output or self.world_size == 1:
            return y
        y = y.contiguous()
        parts = [torch.empty_like(y) for _ in range(self.world_size)]
        dist.all_gather(parts, y, group=self.group)
        return torch.cat(parts, dim=-1)  # (..., out)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}/{self.world_size}"
                f"{', gather' if self.gather_output else ''}")


class RowParallelLinear(nn.Module):
    """y = x W^T where x arrives split on its features (in_features / N per rank).

    Each rank multiplies its slice by its columns of W; all_reduce sums the
    partial products, so every rank holds the full y.
    """

    def __init__(self, in_features: int, out_features: int, world_size: int, *, group=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.world_size, self.group = world_size, group
        self.weight = nn.Parameter(torch.empty(out_features, in_features // world_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight).contiguous()  # partial sum, (..., out)
        if self.world_size > 1:
            dist.all_reduce(y, group=self.group)
        return y

    def extra_repr(self) -> str:
        return f"in={self.in_features}/{self.world_size}, out={self.out_features}"


class VocabParallelEmbedding(nn.Module):
    """Embedding rows [rank * V/N, (rank + 1) * V/N) of the vocabulary on each rank.

    A rank looks up the ids it holds and writes zeros for the others; the
    all_reduce then adds exactly one non-zero vector per id, so the result is
    bit-for-bit the unsplit lookup.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, world_size: int, rank: int, *, group=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.world_size, self.group = world_size, group
        per_rank = num_embeddings // world_size
        self.start, self.end = rank * per_rank, (rank + 1) * per_rank
        self.weight = nn.Parameter(torch.empty(per_rank, embedding_dim))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return F.embedding(ids, self.weight)
        outside = (ids < self.start) | (ids >= self.end)
        local = (ids - self.start).masked_fill(outside, 0)
        h = F.embedding(local, self.weight).masked_fill(outside[..., None], 0.0)  # (B, T, dim)
        dist.all_reduce(h, group=self.group)
        return h

    def extra_repr(self) -> str:
        return f"vocab={self.start}..{self.end} of {self.num_embeddings}, dim={self.embedding_dim}"


# ------------------------------------------------------------------- the model
def check_divisible(args, world_size: int) -> None:
    """ConfigError unless every split dimension divides evenly by `world_size` (and the layers can be split)."""
    if world_size > 1 and getattr(args, "qkv_bias", False):
        raise ConfigError(f"cannot split this {args.model_type!r} model across {world_size} processes: tensor "
                          "parallelism does not split the biases of q, k and v yet; run it in one process "
                          "(model_parallel_size=1)")
    sizes = {"n_heads": args.n_heads, "n_kv_heads": args.n_kv_heads, "hidden_dim": args.hidden_dim,
             "vocab_size": args.vocab_size}
    bad = {k: v for k, v in sizes.items() if v % world_size}
    if bad:
        fits = [n for n in range(1, max(sizes.values()) + 1) if all(v % n == 0 for v in sizes.values())]
        fits = [n for n in fits if n <= 64]
        what = ", ".join(f"{k}={v}" for k, v in bad.items())
        raise ConfigError(
            f"cannot split this model across {world_size} processes: {what} "
            f"{'is' if len(bad) == 1 else 'are'} not a multiple of {world_size} (each rank must hold whole "
            f"heads and equal slices). Model-parallel sizes that fit this model: "
            f"{', '.join(map(str, fits))}")


def parallelize(model: nn.Module, world_size: int, rank: int, group=None) -> None:
    """Swap a (meta-device) Transformer's layers for tensor-parallel ones holding rank `rank`'s slices.

    Call before `to_empty` so that only the local slices are ever allocated.
    """
    check_divisible(model.args, world_size)
    with torch.device(model.tok_embeddings.weight.device):  # the new layers where the model is (meta)
        _swap_layers(model, world_size, rank, group)


def _swap_layers(model: nn.Module, n: int, rank: int, group) -> None:
    args = model.args
    for layer in model.layers:
        a, ff = layer.attention, layer.feed_forward
        for name in ("wq", "wk", "wv"):
            lin = getattr(a, name)
            setattr(a, name, ColumnParallelLinear(lin.in_features, lin.out_features, n, group=group))
        a.wo = RowParallelLinear(a.wo.in_features, a.wo.out_features, n, group=group)
        a.n_heads, a.n_kv_heads = args.n_heads // n, args.n_kv_heads // n  # this rank's heads
        for name in ("w1", "w3"):
            lin = getattr(ff, name)
            setattr(ff, name, ColumnParallelLinear(lin.in_features, lin.out_features, n, group=group))
        ff.w2 = RowParallelLinear(ff.w2.in_features, ff.w2.out_features, n, group=group)
    model.tok_embeddings = VocabParallelEmbedding(args.vocab_size, args.dim, n, rank, group=group)
    model.output = ColumnParallelLinear(args.dim, args.vocab_size, n, gather_output=True, group=group)
    if args.tie_word_embeddings:  # both hold the same vocabulary rows, so they can share them
        model.output.weight = model.tok_embeddings.weight


# ------------------------------------------------------------------ the weights
# At run time every split weight is cut as above, and the embedding on the
# vocabulary (rows), whatever the layout of the files it comes from.
def _run_dim(key: str, shape: tuple[int, ...]) -> int | None:
    kind = weight_kind(key)
    if kind == EMBEDDING:
        return 0
    return SPLIT_DIM.get(kind) if len(shape) == 2 else None


def rank_state(shards: Sequence[Mapping[str, torch.Tensor]], rank: int, world_size: int, *,
               dim: int | None = None, file_backed: bool | None = None) -> LazyState:
    """Rank `rank`'s slice of the weights, from one full state dict or a Meta checkpoint's MP shards.

    `shards`: [the full (lazy) state] (Meta MP=1, Hugging Face, merged), or
    the shards of a Meta checkpoint in rank order (any MP; `dim` tells a
    Llama 2 embedding split from a Llama 3 one). Each slice is cut from the
    pieces of the files it overlaps rather than from joined tensors: when
    the files' MP equals `world_size` a rank reads only its own file (the
    embedding aside, when Llama 2 files split it on its vectors: then 1/N of
    each file's). A slice of a single piece is a view, so copying it into the
    model reads (and, memory-mapped, pages in) only that slice, with no
    second copy. `file_backed` (default: what the shards say) lets the
    loader drop each weight's file pages once copied; never set it for
    tensors in ordinary memory.
    """
    if file_backed is None:
        file_backed = all(getattr(s, "file_backed", False) for s in shards)
    ents = [entries_of(s) for s in shards]
    n = world_size
    out: dict[str, Entry] = {}
    for key in ents[0]:
        parts = [e[key] for e in ents]
        kind = weight_kind(key)
        file_d = None
        if len(parts) > 1 and len(parts[0].shape) == 2:
            file_d = embedding_split_dim([p.shape for p in parts], dim) if kind == EMBEDDING else SPLIT_DIM.get(kind)
        full = list(parts[0].shape)
        if file_d is not None:
            full[file_d] = sum(p.shape[file_d] for p in parts)
        d = _run_dim(key, tuple(full))
        if d is None:  # replicated (norms, rope.freqs): any shard's copy
            out[key] = parts[0]
            continue
        if full[d] % n:
            raise ConfigError(f"cannot split {key} of shape {tuple(full)} into {n} slices on dim {d}")
        size = full[d] // n
        lo = rank * size
        shape = list(full)
        shape[d] = size

        def make(parts=parts, file_d=file_d, d=d, lo=lo, size=size) -> torch.Tensor:
            if file_d is None:  # one piece holds it whole
                return parts[0].make().narrow(d, lo, size)
            if file_d != d:  # the files cut the other dim: our range of each, side by side
                return torch.cat([p.make().narrow(d, lo, size) for p in parts], dim=file_d)
            pieces, offset = [], 0
            for p in parts:  # the files cut the same dim: the pieces our range overlaps
                a, b = max(lo, offset), min(lo + size, offset + p.shape[d])
                if a < b:
                    pieces.append(p.make().narrow(d, a - offset, b - a))
                offset += p.shape[d]
            return torch.cat(pieces, dim=d) if len(pieces) > 1 else pieces[0]

        out[key] = Entry(make, tuple(shape), parts[0].dtype, [t for p in parts for t in p.sources])
    return LazyState(out, file_backed)


def local_param_bytes(model: nn.Module) -> int:
    """Bytes of the parameters this process holds (tied weights counted once)."""
    seen, total = set(), 0
    for t in model.parameters():
        if t.data_ptr() in seen or t.device.type == "meta":
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


__all__ = ["ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding", "check_divisible",
           "local_param_bytes", "parallelize", "rank_state"]
