"""A prefix cache: the keys and values of prompt prefixes, kept to be copied back into a cache row.

Prompts are cut into blocks of `block_size` tokens; a full block is known by a
hash of its tokens and of every block before it (as vLLM's automatic prefix
caching does), so that a block stands for the whole prefix up to its end. A
prompt's cached prefix is its longest run of known blocks from the start.

Exactness: the cached keys and values are exactly what a prefill computes,
and the pass over the rest rounds as the whole prompt's would, so logits are
bit-identical with and without the cache; the last token's logits always come
from a real forward pass. Three things round differently, measured on the CPU
(tests/model/test_prefix_cache.py): decode-sized passes run other kernels
(nabla.model.cpu_kernels), so at least MIN_PASS tokens are recomputed; torch's
CPU attention sums keys in blocks of 512, or all of them in one block when
fewer, so a position's keys and values depend on the pass's length below
KV_BLOCK: only prompts of KV_BLOCK tokens or more are kept and reused; and a
last block of 1 to 3 queries takes another product kernel, so the cut is moved
back a block when the rest would end in such a block and the whole would not.

Blocks are evicted least recently used first within a memory budget; a
prefix's later blocks are older than its earlier ones, so a prefix shrinks
from its end. Leaves out: sharing blocks between cache rows without a copy
(paged attention), and which tokens a caller may store (its decoded tokens
are not prefill's: callers store only what a prefill pass computed).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence

import torch

from nabla.model.cpu_kernels import MAX_ROWS

MIN_PASS = MAX_ROWS + 1
"""Tokens a pass must hold to run a whole prompt's kernels; the fewest a cached prompt recomputes."""
KV_BLOCK = 512
"""The shortest prompt whose keys and values do not depend on its length (torch's CPU attention's key block)."""


def _odd_tail(T: int) -> bool:
    """Whether a pass of T queries ends in a block of 1 to 3 (torch's CPU attention splits queries in 32,
    64 or 256 by length), which takes another matrix-product kernel than larger blocks."""
    split = 256 if T >= 768 else 64 if T >= 192 else 32
    return 0 < T % split < 4


def caches(model) -> list:
    """The model's per-layer KVCache modules."""
    return [layer.attention.cache for layer in model.layers]


class PrefixCache:
    def __init__(self, budget_bytes: int, block_size: int = 16):
        if budget_bytes < 0 or block_size < 1:
            raise ValueError(f"a prefix cache needs budget_bytes >= 0 and block_size >= 1 "
                             f"(got {budget_bytes}, {block_size})")
        self.budget, self.block_size = budget_bytes, block_size
        self._blocks: OrderedDict[bytes, torch.Tensor] = OrderedDict()  # key -> (layers, 2, h, block, hd)
        self.bytes = 0
        # Counters for /metrics.
        self.hits = self.misses = self.tokens_saved = self.evicted = 0

    @staticmethod
    def of_megabytes(mb: float) -> PrefixCache | None:
        """A cache of `mb` megabytes, or None for 0 (off)."""
        if mb < 0:
            raise ValueError(f"a prefix cache's size must be >= 0 MB, got {mb}")
        return PrefixCache(int(mb * 2**20)) if mb > 0 else None

    def __len__(self) -> int:
        return len(self._blocks)

    def keys(self, tokens: Sequence[int], n_blocks: int) -> list[bytes]:
        """The chained hash of each of the first n_blocks full blocks of tokens."""
        out, h, bs = [], b"", self.block_size
        for i in range(n_blocks):
            block = torch.tensor(tokens[i * bs:(i + 1) * bs], dtype=torch.int64).numpy().tobytes()
            h = hashlib.sha256(h + block).digest()
            out.append(h)
        return out

    def usable(self, n_tokens: int) -> int:
        """The longest prefix a prompt of n_tokens may take from the cache (block-aligned) and keep its
        logits bit for bit."""
        if n_tokens < KV_BLOCK:
            return 0
        bs = self.block_size
        n = max(0, (n_tokens - MIN_PASS) // bs) * bs
        while n > 0 and _odd_tail(n_tokens - n) != _odd_tail(n_tokens):
            n -= bs
        return n

    def match(self, tokens: Sequence[int], count: bool = True) -> list[bytes]:
        """Keys of the cached blocks that start `tokens`, at most usable(len(tokens)) tokens of them.

        Marks them recently used (the first block most recently); `count` adds a hit or a miss."""
        found = []
        for key in self.keys(tokens, self.usable(len(tokens)) // self.block_size):
            if key not in self._blocks:
                break
            found.append(key)
        for key in reversed(found):
            self._blocks.move_to_end(key)
        if count and len(tokens) >= KV_BLOCK:
            self.hits += bool(found)
            self.misses += not found
            self.tokens_saved += len(found) * self.block_size
        return found

    def load(self, model, row: int, found: list[bytes]) -> int:
        """Copy the blocks `found` into cache row `row` at positions 0..; the number of positions."""
        if not found:
            return 0
        kv = torch.cat([self._blocks[k] for k in found], dim=3)  # (layers, 2, h, n, hd)
        n = kv.shape[3]
        for layer, c in enumerate(caches(model)):
            c.k[row, :, :n] = kv[layer, 0]
            c.v[row, :, :n] = kv[layer, 1]
        return n

    def store(self, model, row: int, tokens: Sequence[int], n: int) -> None:
        """Keep the full blocks of tokens[:n], whose keys and values cache row `row` holds from a prefill
        (a pass of at least MIN_PASS tokens ending at n); nothing when n < KV_BLOCK."""
        if n < KV_BLOCK:
            return
        n_blocks = n // self.block_size
        keys = self.keys(tokens, n_blocks)
        first = next((i for i, k in enumerate(keys) if k not in self._blocks), n_blocks)
        if first == n_blocks:
            return
        bs = self.block_size
        kv = torch.stack([torch.stack((c.k[row, :, first * bs:n_blocks * bs], c.v[row, :, first * bs:n_blocks * bs]))
                          for c in caches(model)])  # (layers, 2, h, new blocks * bs, hd)
        per_block = kv[:, :, :, :bs].numel() * kv.element_size()
        if per_block > self.budget:
            return
        for i, key in enumerate(keys[first:]):
            block = kv[:, :, :, i * bs:(i + 1) * bs].clone()
            self._blocks[key] = block
            self.bytes += per_block
        for key in reversed(keys):  # the first block most recent: a prefix is evicted from its end
            self._blocks.move_to_end(key)
        self._evict()

    def _evict(self) -> None:
        while self.bytes > self.budget and self._blocks:
            _, block = self._blocks.popitem(last=False)
            self.bytes -= block.numel() * block.element_size()
            self.evicted += 1

    def clear(self) -> None:
        self._blocks.clear()
        self.bytes = 0
