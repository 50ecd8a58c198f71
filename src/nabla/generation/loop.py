"""The decoding loop: Meta's `generate`, step by step, as a generator.

`decode_steps` runs the reference algorithm and yields after every step, so
`Llama.generate` (whole batch), `Llama.stream` (one prompt, token by token) and
the CLI share one loop. The reference's semantics, kept exactly:

- the batch is right-padded; decoding starts at the shortest prompt's length
  and positions still inside a prompt are forced to that prompt's tokens, so a
  prompt's greedy result does not depend on the rest of the batch;
- total_len = min(max_seq_len, max_gen_len + longest prompt);
- logprobs are -cross_entropy(logits, next token), 0.0 for the first token and
  where the target is the pad id;
- a row stops at a stop token generated after its prompt; all rows done ends
  the loop.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nabla.generation.constraints import masks
from nabla.generation.sampling import sample


@dataclass
class Batch:
    """The state of one `generate` call, filled in as decoding goes."""

    tokens: torch.Tensor  # (B, total_len) prompt tokens then generated ones
    prompt_lens: list[int]
    token_logprobs: torch.Tensor | None  # (B, total_len) or None
    total_len: int
    cur_pos: int = 0


def new_batch(prompt_tokens: list[list[int]], max_gen_len: int, max_seq_len: int, pad_id: int,
              logprobs: bool, device: torch.device) -> Batch:
    lens = [len(t) for t in prompt_tokens]
    total_len = min(max_seq_len, max_gen_len + max(lens))
    tokens = torch.full((len(lens), total_len), pad_id, dtype=torch.long)
    for k, t in enumerate(prompt_tokens):
        tokens[k, : len(t)] = torch.tensor(t[:total_len], dtype=torch.long)
    tokens = tokens.to(device)
    token_logprobs = torch.zeros(tokens.shape, dtype=torch.float32, device=device) if logprobs else None
    return Batch(tokens, lens, token_logprobs, total_len)


def target_logprobs(logits: torch.Tensor, targets: torch.Tensor, pad_id: int) -> torch.Tensor:
    """log p(target) per position from logits (B, T, V), 0 where the target is pad_id."""
    return -F.cross_entropy(logits.transpose(1, 2), targets, reduction="none", ignore_index=pad_id)


@torch.inference_mode()
def decode_steps(model, batch: Batch, temperature: float, top_p: float, stop_ids: Sequence[int],
                 pad_id: int, generator: torch.Generator | None = None,
                 matchers: Sequence | None = None, cached: int = 0) -> Iterator[int]:
    """Fill `batch` in place, yielding each position just written.

    `matchers`: per row, a nabla.generation.constraints.Matcher (or None) whose
    mask the row's generated tokens are sampled under. `cached`: positions
    0..cached-1 of every row are already in the model's key/value cache (a
    prefix cache put them there), so the prefill starts after them; their
    logprobs are left at 0.
    """
    tokens, logprobs = batch.tokens, batch.token_logprobs
    device = tokens.device
    stop_ids = torch.tensor(stop_ids, dtype=torch.long, device=device)
    lens = torch.tensor(batch.prompt_lens, device=device)
    in_prompt = torch.arange(batch.total_len, device=device)[None, :] < lens[:, None]  # (B, total_len)
    min_len = min(batch.prompt_lens)
    if min_len == batch.total_len:
        # Nothing to generate. (Meta's code scores unshifted tokens here, a bug;
        # this gives the same shifted logprobs as the normal path.)
        if logprobs is not None:
            logits = model(tokens, 0)
            logprobs[:, 1:] = target_logprobs(logits[:, :-1], tokens[:, 1:], pad_id)
        return
    assert cached == 0 or cached < min_len - 1, "a cached prefix leaves the prefill at least two tokens"
    eos_reached = torch.zeros(tokens.shape[0], dtype=torch.bool, device=device)
    prev_pos = cached
    for cur_pos in range(min_len, batch.total_len):
        if cur_pos - prev_pos == 1:  # one new token each: a step that may replay a recorded graph
            logits = model.decode(tokens[:, prev_pos:cur_pos], prev_pos)
        else:
            logits = model(tokens[:, prev_pos:cur_pos], prev_pos, last_only=logprobs is None)
        generating = [not bool(in_prompt[i, cur_pos]) for i in range(tokens.shape[0])] if matchers else []
        allowed = masks([m if g else None for m, g in zip(matchers, generating)], device) if matchers else None
        next_token = sample(logits[:, -1], temperature, top_p, generator, allowed)
        next_token = torch.where(in_prompt[:, cur_pos], tokens[:, cur_pos], next_token)
        tokens[:, cur_pos] = next_token
        for m, g, t in zip(matchers or [], generating, next_token.tolist()):
            if m is not None and g and not m.done:
                m.accept(t)
        if logprobs is not None:
            logprobs[:, prev_pos + 1: cur_pos + 1] = target_logprobs(
                logits, tokens[:, prev_pos + 1: cur_pos + 1], pad_id)
        eos_reached |= ~in_prompt[:, cur_pos] & torch.isin(next_token, stop_ids)
        prev_pos = batch.cur_pos = cur_pos
        yield cur_pos
        if bool(eos_reached.all()):
            break


def collect(batch: Batch, max_gen_len: int, echo: bool, stop_ids: set[int]):
    """Meta's output: cut each row to max_gen_len new tokens, then at the first stop token."""
    out_tokens, out_logprobs = [], []
    rows = batch.tokens.tolist()
    lps = batch.token_logprobs.tolist() if batch.token_logprobs is not None else None
    for i, toks in enumerate(rows):
        n = batch.prompt_lens[i]
        start = 0 if echo else n
        toks = toks[start: n + max_gen_len]
        probs = lps[i][start: n + max_gen_len] if lps is not None else None
        for j, t in enumerate(toks):
            if t in stop_ids:
                toks = toks[:j]
                probs = probs[:j] if probs is not None else None
                break
        out_tokens.append(toks)
        out_logprobs.append(probs)
    return out_tokens, (out_logprobs if lps is not None else None)
