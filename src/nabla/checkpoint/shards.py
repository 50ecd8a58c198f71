"""State dicts spread over files: lazy views, model-parallel merge and split.

Meta's reference saves one `consolidated.NN.pth` per model-parallel rank
(fairscale layers), each holding a slice of every big weight:

    split on dim 0 (ColumnParallelLinear): wq, wk, wv, w1, w3, output
    split on dim 1 (RowParallelLinear):    wo, w2
    tok_embeddings: dim 1 in Llama 1/2 (ParallelEmbedding, a slice of each
                    vector), dim 0 in Llama 3 (VocabParallelEmbedding, a
                    slice of the vocabulary): told apart by the shapes
    replicated: the norms and rope.freqs

`merge_shards` joins any number of shards, `split_state` cuts a state dict
into N (to write an MP=N folder), and `shard_for_rank` gives one rank's slice
for any world size, whatever the MP of the files. Results are `LazyState`s:
each tensor is made when it is read, so loading holds one big tensor at a
time, not a second copy of the model.

Leaves out: which files a folder holds (nabla.checkpoint) and renames between
formats (nabla.checkpoint.hf).
"""

from __future__ import annotations

import ctypes
import mmap
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from nabla.errors import CheckpointError

# Split dimension of each weight kind (the module name just before ".weight").
SPLIT_DIM = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1}
EMBEDDING = "tok_embeddings"


def weight_kind(key: str) -> str:
    """'layers.3.attention.wq.weight' -> 'wq'; 'norm.weight' -> 'norm'; 'rope.freqs' -> 'rope'."""
    parts = key.split(".")
    return parts[-2] if len(parts) >= 2 and parts[-1] in ("weight", "bias") else parts[0]


# ------------------------------------------------------------------ lazy state
@dataclass
class Entry:
    make: Callable[[], torch.Tensor]
    shape: tuple[int, ...]
    dtype: torch.dtype
    sources: list[torch.Tensor] = field(default_factory=list)
    """Memory-mapped file tensors the value is read from (their pages can be dropped after use)."""


class LazyState(Mapping):
    """A read-only state dict whose tensors are made on access.

    `shapes` and `dtypes` are known without reading any weights. When the
    tensors come from memory-mapped files, `release(key)` tells the kernel the
    process no longer needs those pages (they stay in the page cache), so
    copying a checkpoint into a model does not keep a second copy resident.
    """

    def __init__(self, entries: dict[str, Entry], file_backed: bool = False):
        self._entries = entries
        self.file_backed = file_backed

    @classmethod
    def of(cls, tensors: Mapping[str, torch.Tensor], file_backed: bool = False) -> LazyState:
        """Wrap ready tensors (e.g. from torch.load(weights_only=True, mmap=True))."""
        return cls({k: Entry(lambda t=t: t, tuple(t.shape), t.dtype, [t])
                    for k, t in tensors.items() if isinstance(t, torch.Tensor)}, file_backed)

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._entries[key].make()

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key) -> bool:
        return key in self._entries

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: e.shape for k, e in self._entries.items()}

    @property
    def dtypes(self) -> dict[str, torch.dtype]:
        return {k: e.dtype for k, e in self._entries.items()}

    def entry(self, key: str) -> Entry:
        return self._entries[key]

    def release(self, key: str) -> None:
        """Drop the resident file pages behind `key` (only for memory-mapped files)."""
        if self.file_backed and key in self._entries:
            for t in self._entries[key].sources:
                drop_pages(t)


def entries_of(state: Mapping[str, torch.Tensor]) -> dict[str, Entry]:
    """The entries of a LazyState, or entries wrapping a plain dict's tensors."""
    if isinstance(state, LazyState):
        return dict(state._entries)
    return {k: Entry(lambda t=t: t, tuple(t.shape), t.dtype, [t])
            for k, t in state.items() if isinstance(t, torch.Tensor)}


_PAGE = mmap.PAGESIZE
_MADV_DONTNEED = 4  # same value on Linux and macOS
_libc = None


def drop_pages(t: torch.Tensor) -> None:
    """madvise(DONTNEED) the whole pages under a tensor of a read-only file mapping.

    Only ever called on tensors of MAP_PRIVATE file mappings that nobody
    wrote to (torch.load(weights_only=True, mmap=True), UntypedStorage.from_file(shared=False)):
    there it only unmaps clean page-cache pages, and reading them again
    faults them back in from the file. A no-op where madvise is unavailable.
    """
    global _libc
    if not sys.platform.startswith("linux"):
        return
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
            _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        start = t.data_ptr()
        end = start + t.numel() * t.element_size()
        a = -(-start // _PAGE) * _PAGE
        b = end // _PAGE * _PAGE
        if b > a:
            _libc.madvise(a, b - a, _MADV_DONTNEED)
    except (OSError, AttributeError):  # pragma: no cover - exotic libc
        pass


# ----------------------------------------------------------------------- merge
def _model_dim(shards: Sequence[Mapping], params: dict | None) -> int | None:
    if params and isinstance(params.get("dim"), int):
        return params["dim"]
    norm = entries_of(shards[0]).get("norm.weight")  # replicated, (dim,)
    return norm.shape[0] if norm is not None else None


def embedding_split_dim(shapes: Sequence[tuple[int, ...]], dim: int | None) -> int:
    """0 (Llama 3, vocabulary split) or 1 (Llama 1/2, vector split), from the shard shapes."""
    n = len(shapes)
    cols = shapes[0][1]
    if dim is not None:
        if cols * n == dim:
            return 1
        if cols == dim:
            return 0
        raise CheckpointError(
            f"the {n} tok_embeddings shards have shape {tuple(shapes[0])} but the model width (dim) is "
            f"{dim}: they fit neither a split of the vectors ({dim // n} columns each) nor of the "
            "vocabulary; are all consolidated.*.pth files from the same checkpoint?")
    # Without a width to compare to, equal row counts can only be a vector split
    # when the shards also agree in rows; a vocabulary split leaves the width whole.
    return 1 if all(s[0] == shapes[0][0] for s in shapes) and cols < shapes[0][0] else 0


def merge_shards(shards: Sequence[Mapping[str, torch.Tensor]], params: dict | None = None,
                 file_backed: bool = False) -> LazyState:
    """One state dict (lazy) from the model-parallel shards of a Meta checkpoint, in rank order."""
    if not shards:
        raise CheckpointError("no shards to merge")
    ents = [entries_of(s) for s in shards]
    if len(ents) == 1:
        return LazyState(ents[0], file_backed)
    keys = list(ents[0])
    for i, e in enumerate(ents[1:], 1):
        if set(e) != set(keys):
            diff = sorted(set(e) ^ set(keys))
            raise CheckpointError(
                f"model-parallel shard {i} holds different weights than shard 0 (e.g. {diff[0]}); "
                "the consolidated.*.pth files do not belong to the same checkpoint")
    dim = _model_dim(shards, params)
    merged: dict[str, Entry] = {}
    for key in keys:
        parts = [e[key] for e in ents]
        kind = weight_kind(key)
        if kind == EMBEDDING:
            d = embedding_split_dim([p.shape for p in parts], dim)
        else:
            d = SPLIT_DIM.get(kind)
        if d is None or len(parts[0].shape) < 2:  # replicated: norms, rope.freqs
            for i, p in enumerate(parts[1:], 1):
                if p.shape != parts[0].shape:
                    raise CheckpointError(
                        f"shards do not fit together: {key} has shape {tuple(parts[0].shape)} in shard 0 "
                        f"but {tuple(p.shape)} in shard {i} (it should be the same in every shard)")
            merged[key] = Entry(parts[0].make, parts[0].shape, parts[0].dtype, parts[0].sources)
            continue
        other = 1 - d
        for i, p in enumerate(parts[1:], 1):
            if len(p.shape) != 2 or p.shape[other] != parts[0].shape[other]:
                raise CheckpointError(
                    f"shards do not fit together: {key} has shape {tuple(parts[0].shape)} in shard 0 but "
                    f"{tuple(p.shape)} in shard {i}; they are joined along dim {d}, so dim {other} must agree")
        shape = list(parts[0].shape)
        shape[d] = sum(p.shape[d] for p in parts)

        def make(parts=parts, d=d):
            merged = torch.cat([p.make() for p in parts], dim=d)
            if file_backed:  # the shards' pages are copied: let them go now, not after load
                for p in parts:
                    for t in p.sources:
                        drop_pages(t)
            return merged

        merged[key] = Entry(make, tuple(shape), parts[0].dtype, [t for p in parts for t in p.sources])
    return LazyState(merged, file_backed)


# ----------------------------------------------------------------------- split
def _split_dims(state: Mapping, vocab_parallel_embedding: bool) -> dict[str, int | None]:
    dims = {}
    for key, e in entries_of(state).items():
        kind = weight_kind(key)
        if kind == EMBEDDING:
            dims[key] = 0 if vocab_parallel_embedding else 1
        elif len(e.shape) == 2:
            dims[key] = SPLIT_DIM.get(kind)
        else:
            dims[key] = None
    return dims


def _check_split(state: Mapping, n: int, dims: dict, args=None) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise CheckpointError(f"the number of shards must be a positive integer, got {n!r}")
    if args is not None:
        for name in ("n_heads", "n_kv_heads"):
            if getattr(args, name) % n:
                raise CheckpointError(f"cannot split a model with {name}={getattr(args, name)} into {n} "
                                      f"shards: each shard must hold whole heads")
    for key, e in entries_of(state).items():
        d = dims[key]
        if d is not None and e.shape[d] % n:
            raise CheckpointError(f"cannot split into {n} shards: {key} has size {e.shape[d]} on dim {d}, "
                                  f"not a multiple of {n}")


def _slice_entry(e: Entry, d: int | None, rank: int, n: int) -> Entry:
    if d is None:
        return e
    size = e.shape[d] // n
    shape = list(e.shape)
    shape[d] = size

    def make():
        return e.make().narrow(d, rank * size, size).clone()  # own memory, contiguous

    return Entry(make, tuple(shape), e.dtype, e.sources)


def shard_for_rank(state: Mapping[str, torch.Tensor], rank: int, world_size: int, *,
                   vocab_parallel_embedding: bool = False, args=None) -> LazyState:
    """The slice of a full state dict that model-parallel rank `rank` of `world_size` holds.

    Pass the merged state of any checkpoint: its files' MP does not matter.
    """
    if not 0 <= rank < world_size:
        raise CheckpointError(f"rank {rank} is outside the world of {world_size} processes")
    dims = _split_dims(state, vocab_parallel_embedding)
    _check_split(state, world_size, dims, args)
    file_backed = getattr(state, "file_backed", False)
    return LazyState({k: _slice_entry(e, dims[k], rank, world_size) for k, e in entries_of(state).items()},
                     file_backed)


def split_state(state: Mapping[str, torch.Tensor], n: int, *, vocab_parallel_embedding: bool = False,
                args=None) -> list[LazyState]:
    """Cut a full state dict into `n` model-parallel shards as Meta's code saves them.

    The embedding is split on its vectors (Llama 1/2) unless
    `vocab_parallel_embedding` (Llama 3).
    """
    return [shard_for_rank(state, r, n, vocab_parallel_embedding=vocab_parallel_embedding, args=args)
            for r in range(n)]
