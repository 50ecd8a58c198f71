"""The one sampler, on hand-made distributions: Meta's top-p, greedy, and safety at tiny temperatures."""

import pytest
import torch

from nabla.generation.sampling import (
    MIN_TEMPERATURE,
    greedy,
    nucleus,
    sample,
    sample_top_p,
    temperature_probs,
    top_p_filter,
)


def meta_sample_top_p(probs, p, generator=None):
    """Meta's llama/generation.py `sample_top_p`, restated (the reference this must equal draw for draw)."""
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    probs_sum = torch.cumsum(probs_sort, dim=-1)
    mask = probs_sum - probs_sort > p
    probs_sort[mask] = 0.0
    probs_sort.div_(probs_sort.sum(dim=-1, keepdim=True))
    next_token = torch.multinomial(probs_sort, num_samples=1, generator=generator)
    return torch.gather(probs_idx, -1, next_token)


def test_top_p_draws_what_meta_draws():
    logits = torch.randn(4, 1000, generator=torch.Generator().manual_seed(0)) * 3
    for p in (0.1, 0.5, 0.9, 1.0):
        probs = torch.softmax(logits / 0.7, dim=-1)
        ours = sample_top_p(probs, p, torch.Generator().manual_seed(5))
        ref = meta_sample_top_p(probs.clone(), p, torch.Generator().manual_seed(5))
        assert torch.equal(ours, ref)


def test_nucleus_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.1, 0.5, 0.25, 0.15]])
    kept, ids, size = nucleus(probs, 0.7)  # 0.5, then 0.25 (mass before it 0.5 <= 0.7), then 0.15 (0.75 > 0.7)
    assert ids[0, :2].tolist() == [1, 2] and size.tolist() == [2]
    torch.testing.assert_close(kept[0, :2], torch.tensor([0.5, 0.25]) / 0.75)
    filtered, _ = top_p_filter(probs, 0.7)
    torch.testing.assert_close(filtered, torch.tensor([[0.0, 0.5 / 0.75, 0.25 / 0.75, 0.0]]))


@pytest.mark.parametrize("temperature", [0.0, 1e-300, 1e-40, 1e-31])
def test_tiny_temperatures_are_greedy_not_nan(temperature):
    logits = torch.tensor([[3.0, 9.0, -2.0, 8.5], [1e4, -1e4, 0.0, 1e4 + 1]])
    assert sample(logits, temperature, 0.9).tolist() == greedy(logits).tolist() == [1, 3]
    probs = temperature_probs(logits, temperature)
    assert torch.equal(probs, torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]]))


def test_just_above_the_greedy_limit_is_still_finite():
    logits = torch.tensor([[3.0, 9.0, -2.0, 8.5]])
    probs = temperature_probs(logits, MIN_TEMPERATURE * 10)
    assert torch.isfinite(probs).all() and probs[0, 1] == 1.0
    assert sample(logits, MIN_TEMPERATURE * 10, 0.9).tolist() == [1]
