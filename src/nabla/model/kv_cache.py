"""Static key/value cache: allocated once, written in place, never grown.

Its shape is the run's sizes: max_batch_size rows of max_seq_len positions
(Transformer.setup_cache). Leaves out: paging, prefix sharing and eviction
(a server's business), and the attention mask (nabla.model.llama.Positions).
"""

from __future__ import annotations

import torch
from torch import nn


class KVCache(nn.Module):
    def __init__(self, max_batch_size: int, n_kv_heads: int, max_seq_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        super().__init__()
        shape = (max_batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, pos, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, h, T, hd) at `pos` and return all cached keys and values up to pos.length."""
        assert pos.length <= self.k.shape[2], "position beyond the cache; callers check max_seq_len"
        B = k.shape[0]
        if pos.shared and pos.rows is None:
            # Every sequence at the same positions: contiguous slice writes, view reads.
            self.k[:B, :, pos.start : pos.length] = k
            self.v[:B, :, pos.start : pos.length] = v
            return self.k[:B, :, : pos.length], self.v[:B, :, : pos.length]
        idx = pos.idx if not pos.shared else pos.idx.expand(B, -1)  # (B, T)
        h = torch.arange(k.shape[1], device=k.device)[None, :, None]
        if pos.row_range is not None:  # consecutive rows: write and read through views
            r0, r1 = pos.row_range
            kc, vc = self.k[r0:r1], self.v[r0:r1]
            r = torch.arange(B, device=k.device)[:, None, None]
            kc[r, h, idx[:, None, :]] = k
            vc[r, h, idx[:, None, :]] = v
            return kc[:, :, : pos.length], vc[:, :, : pos.length]
        rows = pos.rows
        r = rows[:, None, None]
        self.k[r, h, idx[:, None, :]] = k
        self.v[r, h, idx[:, None, :]] = v
        return self.k[rows, :, : pos.length], self.v[rows, :, : pos.length]
