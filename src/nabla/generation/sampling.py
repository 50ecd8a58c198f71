"""Pure sampling functions: logits in, probabilities or token ids out.

They follow Meta's reference exactly (same operations, same random draws), so
the same seed gives the same samples: temperature divides the logits before a
softmax, top-p keeps the smallest set of most likely tokens whose mass reaches
p, renormalises it and draws with `torch.multinomial`.
"""

from __future__ import annotations

import torch


def sample_top_p(probs: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one token id per row (B, 1) from the top-p nucleus of probs (B, V)."""
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    probs_sum = torch.cumsum(probs_sort, dim=-1)
    # A token stays if the mass before it is still within p (so the first always stays).
    mask = probs_sum - probs_sort > p
    probs_sort[mask] = 0.0
    probs_sort.div_(probs_sort.sum(dim=-1, keepdim=True))
    next_token = torch.multinomial(probs_sort, num_samples=1, generator=generator)
    return torch.gather(probs_idx, -1, next_token)


def sample(logits: torch.Tensor, temperature: float, top_p: float,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids (B,) from last-position logits (B, V): argmax when temperature is 0."""
    if temperature > 0:
        probs = torch.softmax(logits / temperature, dim=-1)
        return sample_top_p(probs, top_p, generator).reshape(-1)
    return torch.argmax(logits, dim=-1).reshape(-1)


def top_p_filter(probs: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The distribution sample_top_p draws from, in vocabulary order, and the nucleus size per row."""
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    keep = (torch.cumsum(probs_sort, dim=-1) - probs_sort) <= p
    kept = torch.where(keep, probs_sort, torch.zeros_like(probs_sort))
    kept = kept / kept.sum(dim=-1, keepdim=True)
    out = torch.zeros_like(probs).scatter_(-1, probs_idx, kept)
    return out, keep.sum(dim=-1)
