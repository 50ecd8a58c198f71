"""Pure sampling functions: logits in, probabilities or token ids out.

The one implementation of greedy, temperature and nucleus (top-p) that
`generate`, the server and explain all use. It follows Meta's reference exactly
(same operations, same random draws), so the same seed gives the same
samples: temperature divides the logits before a softmax, top-p keeps the
smallest set of most likely tokens whose mass reaches p, renormalises it and
draws with `torch.multinomial`. Temperature 0 is the argmax.

As the temperature tends to 0 sampling tends to the argmax; below
MIN_TEMPERATURE `logits / temperature` would overflow float32 (and a
temperature of 1e-300 rounds to 0 in it), so there it *is* the argmax; above
it, a row whose logits still overflow is shifted first (see temperature_probs).

Constrained decoding hands `sample` a mask of the tokens the grammar allows
(nabla.generation.constraints); the others' logits become -inf before
anything else, greedy included, and the rest of the sampler is unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MIN_TEMPERATURE = 1e-30
"""Below this (0 included) sampling is greedy: logits up to ~3e8 still divide without overflow above it."""


def is_greedy(temperature: float) -> bool:
    return temperature < MIN_TEMPERATURE


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """The most likely token id of each row of logits (..., V)."""
    return torch.argmax(logits, dim=-1)


def temperature_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """The distribution (..., V) after temperature: softmax(logits / T), one-hot on the argmax when greedy."""
    if is_greedy(temperature):
        return F.one_hot(greedy(logits), logits.shape[-1]).to(logits.dtype)
    scaled = logits / temperature
    # Large logits over a small temperature can still overflow to inf (and softmax to nan): such a
    # row takes the same distribution from its logits shifted so that the largest is 0. Other rows
    # keep Meta's operations, bit for bit.
    top = logits.amax(dim=-1, keepdim=True)
    scaled = torch.where(torch.isposinf(scaled.amax(dim=-1, keepdim=True)), (logits - top) / temperature, scaled)
    return torch.softmax(scaled, dim=-1)


def nucleus(probs: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top-p nucleus of probs (B, V), most likely first: (renormalised probs, their ids, nucleus size)."""
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    # A token stays if the mass before it is still within p (so the first always stays).
    keep = torch.cumsum(probs_sort, dim=-1) - probs_sort <= p
    probs_sort = torch.where(keep, probs_sort, torch.zeros_like(probs_sort))
    probs_sort = probs_sort / probs_sort.sum(dim=-1, keepdim=True)
    return probs_sort, probs_idx, keep.sum(dim=-1)


def sample_top_p(probs: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one token id per row (B, 1) from the top-p nucleus of probs (B, V)."""
    probs_sort, probs_idx, _ = nucleus(probs, p)
    next_token = torch.multinomial(probs_sort, num_samples=1, generator=generator)
    return torch.gather(probs_idx, -1, next_token)


def top_p_filter(probs: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The distribution sample_top_p draws from, in vocabulary order, and the nucleus size per row."""
    probs_sort, probs_idx, size = nucleus(probs, p)
    return torch.zeros_like(probs).scatter_(-1, probs_idx, probs_sort), size


def apply_mask(logits: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    """logits (B, V) with the tokens `allowed` (bool, B x V) forbids set to -inf (a copy; as is when None)."""
    if allowed is None:
        return logits
    return logits.masked_fill(~allowed, float("-inf"))


def sample(logits: torch.Tensor, temperature: float, top_p: float,
           generator: torch.Generator | None = None, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Next token ids (B,) from last-position logits (B, V), only among `allowed` tokens when given."""
    logits = apply_mask(logits, allowed)
    if is_greedy(temperature):
        return greedy(logits).reshape(-1)
    return sample_top_p(temperature_probs(logits, temperature), top_p, generator).reshape(-1)
