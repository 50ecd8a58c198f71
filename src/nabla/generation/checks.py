"""The checks every way into generation shares: prompts and sampling settings.

`Llama.generate` and friends, explain and the server all call these, so a
prompt or a setting is accepted or refused with the same message wherever it
comes from. Each failure is an InvalidRequestError (or ContextLengthError)
naming the parameter, never an assert or an error from inside torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from nabla.errors import ContextLengthError, InvalidRequestError


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_temperature(temperature) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or \
            not math.isfinite(temperature) or temperature < 0:
        raise InvalidRequestError(f"temperature must be a number >= 0 (0 is greedy), got {temperature!r}",
                                  "temperature")


def check_top_p(top_p) -> None:
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise InvalidRequestError(f"top_p must be in (0, 1], got {top_p!r}", "top_p")


def check_sampling(temperature, top_p, max_gen_len) -> None:
    """temperature >= 0 and finite, top_p in (0, 1], max_gen_len an integer >= 0."""
    check_temperature(temperature)
    check_top_p(top_p)
    if not _is_int(max_gen_len) or max_gen_len < 0:
        raise InvalidRequestError(f"max_gen_len must be an integer >= 0, got {max_gen_len!r}", "max_gen_len")


def check_prompt(toks, i: int, vocab_size: int, max_seq_len: int) -> list[int]:
    """One prompt of token ids: non-empty, in the vocabulary, within the context."""
    if isinstance(toks, torch.Tensor):
        toks = toks.tolist()
    if not isinstance(toks, (list, tuple)) or not all(_is_int(t) for t in toks):
        raise InvalidRequestError(f"prompt {i} must be a list of integer token ids", "prompt")
    if len(toks) == 0:
        raise InvalidRequestError(f"prompt {i} is empty; give at least one token (e.g. BOS)", "prompt")
    bad = [t for t in toks if not 0 <= t < vocab_size]
    if bad:
        raise InvalidRequestError(f"prompt {i} has token id {bad[0]} outside the vocabulary [0, {vocab_size})",
                                  "prompt")
    if len(toks) > max_seq_len:
        raise ContextLengthError(
            f"prompt {i} is {len(toks)} tokens but the context (max_seq_len) is {max_seq_len}; "
            "shorten the prompt or build with a larger max_seq_len", "prompt")
    return list(toks)


def check_prompts(prompt_tokens: Sequence, max_batch_size: int, vocab_size: int,
                  max_seq_len: int) -> list[list[int]]:
    """A batch of token-id prompts, as `generate` takes them; returns them as lists."""
    if not isinstance(prompt_tokens, (list, tuple)) or len(prompt_tokens) == 0:
        raise InvalidRequestError("no prompts given: pass a non-empty list of prompts", "prompt")
    if len(prompt_tokens) > max_batch_size:
        raise InvalidRequestError(
            f"{len(prompt_tokens)} prompts but max_batch_size is {max_batch_size}; pass fewer "
            f"prompts per call or build with a larger max_batch_size", "prompt")
    return [check_prompt(toks, i, vocab_size, max_seq_len) for i, toks in enumerate(prompt_tokens)]


def check_seed(seed) -> None:
    if seed is not None and not _is_int(seed):
        raise InvalidRequestError(f"seed must be an integer, got {seed!r}", "seed")
