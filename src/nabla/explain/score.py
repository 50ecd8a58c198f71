"""How surprised the model is by a given text.

`score` reports per-token surprisal in bits, perplexity and bits per byte,
over windows of the context length that overlap so every token after the
first is predicted with context. Each window is one stateless forward pass at
temperature 1; nothing is sampled. Leaves out: generation (explain.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from nabla.errors import InvalidRequestError
from nabla.explain.explain import LN2, Alternative, TokenExplanation, check_top_k_shown
from nabla.tokenizer.base import IncrementalDecoder


@dataclass
class ScoredText:
    """What `score` returns: how well the model predicts a text."""

    text: str
    steps: list[TokenExplanation]
    """Every token after the first, with its probability in context."""
    n_bytes: int
    window: int
    stride: int

    @property
    def total_nats(self) -> float:
        return -sum(s.logprob for s in self.steps)

    @property
    def mean_nll(self) -> float:
        """Mean negative log-likelihood per predicted token, in nats."""
        return self.total_nats / len(self.steps)

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_nll)

    @property
    def bits_per_token(self) -> float:
        return self.mean_nll / LN2

    @property
    def bits_per_byte(self) -> float:
        """Total information in bits over the UTF-8 bytes of the text."""
        return self.total_nats / LN2 / self.n_bytes

    def summary(self) -> dict:
        return {"tokens": len(self.steps) + 1, "predicted": len(self.steps), "bytes": self.n_bytes,
                "total_nats": self.total_nats, "mean_nll": self.mean_nll, "perplexity": self.perplexity,
                "bits_per_token": self.bits_per_token, "bits_per_byte": self.bits_per_byte,
                "window": self.window, "stride": self.stride}

    def to_dict(self) -> dict:
        return {**self.summary(), "text": self.text, "steps": [s.to_dict() for s in self.steps]}


def score(llama, text: str, window: int | None = None, stride: int | None = None, top_k_shown: int = 5,
          progress: bool = False) -> ScoredText:
    """Per-token surprisal, perplexity and bits per byte of `text` (BOS prepended, no EOS).

    The text is cut into windows of `window` tokens (default: the context
    length) starting every `stride` tokens (default: half a window); each
    window is one stateless forward pass, and scores only the tokens the
    previous windows did not, so every token after the first is predicted from
    at least `window - stride` tokens of context (or all it has).
    """
    if not isinstance(text, str) or not text.strip():
        raise InvalidRequestError("the text to score is empty; give some text", "text")
    check_top_k_shown(top_k_shown)
    window = llama.max_seq_len if window is None else window
    if isinstance(window, bool) or not isinstance(window, int) or not 2 <= window <= llama.max_seq_len:
        raise InvalidRequestError(f"window must be an integer in [2, {llama.max_seq_len}] (the context), "
                                  f"got {window!r}", "window")
    stride = max(1, window // 2) if stride is None else stride
    if isinstance(stride, bool) or not isinstance(stride, int) or not 1 <= stride <= window - 1:
        raise InvalidRequestError(f"stride must be an integer in [1, {window - 1}] (below the window), "
                                  f"got {stride!r}", "stride")
    tok = llama.tokenizer
    ids = tok.encode(text, bos=True, eos=False)
    if len(ids) < 2:
        raise InvalidRequestError("the text encodes to no tokens; give some text", "text")

    starts = [0]
    while starts[-1] + window < len(ids):
        starts.append(starts[-1] + stride)
    pieces = _Pieces(tok, ids[0])
    steps: list[TokenExplanation] = []
    done = 1  # tokens [0, done) are scored (the first has nothing before it)
    bar = _progress(len(starts), progress)
    with torch.inference_mode():
        for begin in starts:
            end = min(begin + window, len(ids))
            tokens = torch.tensor([ids[begin:end]], device=llama.device)
            logits = llama.model(tokens)[0, done - begin - 1: end - begin - 1]  # row j predicts token done + j
            targets = torch.tensor(ids[done:end], device=llama.device)
            steps += _score_rows(logits, targets, done, top_k_shown, pieces)
            done = end
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    rest = pieces.flush()
    if rest:
        steps[-1].text += rest
    return ScoredText(text, steps, len(text.encode("utf-8")), window, stride)


def _score_rows(logits: torch.Tensor, targets: torch.Tensor, first: int, k: int, pieces: _Pieces):
    """TokenExplanations at temperature 1 for targets (T,) predicted by logits (T, V), vectorised."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # (T, V)
    probs = logp.exp()
    entropy = (-torch.special.xlogy(probs, probs).sum(-1) / LN2).tolist()
    lp_target = logp.gather(-1, targets[:, None])  # (T, 1)
    rank = ((logp > lp_target).sum(-1) + 1).tolist()
    top_p, top_i = torch.topk(probs, min(k, probs.shape[-1]), dim=-1)
    steps = []
    for j, (t, lp) in enumerate(zip(targets.tolist(), lp_target[:, 0].tolist())):
        alts = [Alternative(a, pieces.piece(a), p, p, p) for a, p in zip(top_i[j].tolist(), top_p[j].tolist())]
        p = math.exp(lp)
        steps.append(TokenExplanation(first + j, t, pieces.push(t), pieces.piece(t), prob=p, logprob=lp,
                                      prob_temp=p, prob_sample=p, rank=rank[j], entropy=entropy[j],
                                      sample_entropy=entropy[j], alternatives=alts))
    return steps


class _Pieces:
    """Each token's text in context (one incremental decoder) and on its own (cached)."""

    def __init__(self, tokenizer, first: int):
        self.tokenizer = tokenizer
        self.decoder = IncrementalDecoder(tokenizer, [first])
        self._piece: dict[int, str] = {}

    def piece(self, t: int) -> str:
        if t not in self._piece:
            self._piece[t] = self.tokenizer.decode([t])
        return self._piece[t]

    def push(self, t: int) -> str:
        return self.decoder.push(t)

    def flush(self) -> str:
        return self.decoder.flush()


def _progress(total: int, enabled: bool):
    if not enabled or total < 2:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="scoring", unit="window")
