"""An independent re-statement of Meta's `generate` (llama/generation.py), kept
deliberately naive: no KV cache, a full forward pass over the prefix at every
step. Tests compare nabla's cached, validated implementation against it."""

import torch
import torch.nn.functional as F


def sample_top_p(probs, p):
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    probs_sum = torch.cumsum(probs_sort, dim=-1)
    mask = probs_sum - probs_sort > p
    probs_sort[mask] = 0.0
    probs_sort.div_(probs_sort.sum(dim=-1, keepdim=True))
    next_token = torch.multinomial(probs_sort, num_samples=1)
    return torch.gather(probs_idx, -1, next_token)


@torch.no_grad()
def reference_generate(model, prompt_tokens, max_gen_len, max_seq_len, eos_id, pad_id=-1,
                       temperature=0.6, top_p=0.9, logprobs=False, echo=False):
    bsz = len(prompt_tokens)
    min_prompt_len = min(len(t) for t in prompt_tokens)
    max_prompt_len = max(len(t) for t in prompt_tokens)
    total_len = min(max_seq_len, max_gen_len + max_prompt_len)
    tokens = torch.full((bsz, total_len), pad_id, dtype=torch.long)
    for k, t in enumerate(prompt_tokens):
        tokens[k, : len(t)] = torch.tensor(t, dtype=torch.long)
    token_logprobs = torch.zeros_like(tokens, dtype=torch.float)
    eos_reached = torch.tensor([False] * bsz)
    input_text_mask = tokens != pad_id
    for cur_pos in range(min_prompt_len, total_len):
        logits = model(tokens[:, :cur_pos])  # full recomputation, no cache
        if temperature > 0:
            probs = torch.softmax(logits[:, -1] / temperature, dim=-1)
            next_token = sample_top_p(probs, top_p)
        else:
            next_token = torch.argmax(logits[:, -1], dim=-1)
        next_token = next_token.reshape(-1)
        next_token = torch.where(input_text_mask[:, cur_pos], tokens[:, cur_pos], next_token)
        tokens[:, cur_pos] = next_token
        if logprobs:
            token_logprobs[:, 1: cur_pos + 1] = -F.cross_entropy(
                logits.transpose(1, 2), tokens[:, 1: cur_pos + 1], reduction="none", ignore_index=pad_id)
        eos_reached |= (~input_text_mask[:, cur_pos]) & (next_token == eos_id)
        if all(eos_reached):
            break
    out_tokens, out_logprobs = [], []
    for i, toks in enumerate(tokens.tolist()):
        start = 0 if echo else len(prompt_tokens[i])
        toks = toks[start: len(prompt_tokens[i]) + max_gen_len]
        probs = token_logprobs[i][start: len(prompt_tokens[i]) + max_gen_len].tolist() if logprobs else None
        if eos_id in toks:
            eos_idx = toks.index(eos_id)
            toks = toks[:eos_idx]
            probs = probs[:eos_idx] if logprobs else None
        out_tokens.append(toks)
        out_logprobs.append(probs)
    return out_tokens, (out_logprobs if logprobs else None)
