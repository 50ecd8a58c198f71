"""Why the model chose each token: the distribution behind every step.

`explain` runs the very decoding loop `Llama.generate` runs (same forward
passes with the key/value cache, same `sample` calls, same random draws), so
the tokens it explains are the tokens `generate` returns with the same seed
and settings. At every position it reports the chosen token, its probability
and logprob, the top-k alternatives with their probabilities at temperature 1,
after temperature and after top-p filtering (what the sampler actually draws
from), the size of the top-p nucleus and the entropy of the distribution.

Scoring a given text lives in score.py; rendering (terminal table, HTML page)
in the CLI and html.py.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch

from nabla.errors import InvalidRequestError
from nabla.generation.checks import check_sampling, check_seed
from nabla.generation.loop import decode_steps, new_batch
from nabla.generation.sampling import is_greedy, temperature_probs, top_p_filter
from nabla.tokenizer.base import IncrementalDecoder

LN2 = math.log(2.0)


@dataclass
class Alternative:
    """One candidate token at a position."""

    token: int
    piece: str
    """`decode([token])`: the token's text on its own."""
    prob: float
    """Model probability (softmax of the logits, temperature 1)."""
    prob_temp: float
    """After temperature (one-hot on the argmax when temperature is 0)."""
    prob_sample: float
    """After temperature and top-p: the distribution the sampler draws from."""


@dataclass
class TokenExplanation:
    """One position: the token there and the distribution it came from."""

    position: int
    token: int
    text: str
    """The text this token adds, as it reads in context ("" while a UTF-8 character is unfinished)."""
    piece: str
    """`decode([token])`, as `text_completion(logprobs=True)` lists tokens."""
    prompt: bool = False
    """A prompt token (shown with echo): forced, not chosen."""
    stop: bool = False
    """A stop token: generation ends here (`generate` leaves it out)."""
    prob: float | None = None
    """Model probability of the token; None for the first token, which nothing predicts."""
    logprob: float | None = None
    """Natural log of `prob`, the value `generate(logprobs=True)` returns."""
    prob_temp: float | None = None
    prob_sample: float | None = None
    rank: int | None = None
    """1 + the number of tokens the model found more likely."""
    nucleus: int | None = None
    """How many tokens the top-p nucleus keeps (1 when greedy)."""
    entropy: float | None = None
    """Entropy of the model distribution (temperature 1), in bits."""
    sample_entropy: float | None = None
    """Entropy of the distribution actually sampled from, in bits (0 when greedy)."""
    alternatives: list[Alternative] = field(default_factory=list)
    """The top-k tokens by model probability, most likely first."""

    @property
    def surprisal(self) -> float | None:
        """-log2 prob, in bits."""
        return None if self.logprob is None else -self.logprob / LN2

    def to_dict(self) -> dict:
        d = asdict(self)
        d["surprisal"] = self.surprisal
        return d


@dataclass
class Explanation:
    """What `Llama.explain` returns."""

    prompt_tokens: list[int]
    temperature: float
    top_p: float
    seed: int | None
    echo: bool
    steps: list[TokenExplanation]
    prompt: str | None = None
    """The prompt text, when the prompt was given as text."""

    @property
    def tokens(self) -> list[int]:
        """The generated ids, exactly what `generate([prompt_tokens], ...)` returns."""
        return [s.token for s in self.steps if not s.prompt and not s.stop]

    @property
    def text(self) -> str:
        """The generated text (the stop token left out)."""
        return "".join(s.text for s in self.steps if not s.prompt and not s.stop)

    def to_dict(self) -> dict:
        return {"prompt": self.prompt, "prompt_tokens": self.prompt_tokens, "temperature": self.temperature,
                "top_p": self.top_p, "seed": self.seed, "echo": self.echo, "generation": self.text,
                "tokens": self.tokens, "steps": [s.to_dict() for s in self.steps]}


# ------------------------------------------------------------------ the maths
def _entropy_bits(probs: torch.Tensor) -> float:
    return float(-torch.special.xlogy(probs, probs).sum() / LN2)  # 0 log 0 = 0


def token_stats(logits: torch.Tensor, token: int, temperature: float, top_p: float, k: int,
                piece=lambda t: "") -> dict:
    """Explain one position from its logits (V,): the fields of TokenExplanation after `text`.

    The probabilities after temperature are computed as `sample` computes them
    (softmax of logits / temperature, in float32), and the sampled
    distribution is `top_p_filter` of those, so they are what the sampler used.
    """
    logits = logits.float()
    logp = torch.log_softmax(logits, dim=-1)
    probs = logp.exp()
    probs_temp = temperature_probs(logits, temperature)  # one-hot on the argmax when greedy
    if is_greedy(temperature):
        probs_sample, nucleus = probs_temp, 1
    else:
        probs_sample, nucleus = top_p_filter(probs_temp[None], top_p)
        probs_sample, nucleus = probs_sample[0], int(nucleus[0])
    k = min(k, probs.shape[-1])
    top = torch.topk(probs, k).indices.tolist()
    alternatives = [Alternative(t, piece(t), float(probs[t]), float(probs_temp[t]), float(probs_sample[t]))
                    for t in top]
    return dict(prob=float(probs[token]), logprob=float(logp[token]), prob_temp=float(probs_temp[token]),
                prob_sample=float(probs_sample[token]), rank=int((probs > probs[token]).sum()) + 1,
                nucleus=nucleus, entropy=_entropy_bits(probs), sample_entropy=_entropy_bits(probs_sample),
                alternatives=alternatives)


# ------------------------------------------------------------------- explain
class _Tap:
    """Calls the model exactly as given and keeps the last position's logits."""

    def __init__(self, model):
        self.model = model
        self.last: torch.Tensor | None = None

    def __call__(self, *args, **kwargs):
        logits = self.model(*args, **kwargs)
        self.last = logits[0, -1]
        return logits

    def decode(self, tokens, start_pos):
        logits = self.model.decode(tokens, start_pos)
        self.last = logits[0, -1].clone()  # a replayed graph rewrites its logits at the next step
        return logits


def check_top_k_shown(top_k_shown) -> None:
    if isinstance(top_k_shown, bool) or not isinstance(top_k_shown, int) or top_k_shown < 1:
        raise InvalidRequestError(f"top_k_shown must be an integer >= 1, got {top_k_shown!r}", "top_k_shown")


def explain(llama, prompt: str | Sequence[int], max_gen_len: int | None = None, temperature: float = 0.6,
            top_p: float = 0.9, top_k_shown: int = 5, echo: bool = False,
            seed: int | None = None) -> Explanation:
    """Generate from one prompt and explain every generated (with echo, every prompt) token.

    With `seed`, sampling draws from a generator seeded with it, the same
    stream `generate` draws from after `torch.manual_seed(seed)`; without it,
    from torch's global generator, as `generate` does.
    """
    tok = llama.tokenizer
    text_prompt = prompt if isinstance(prompt, str) else None
    if isinstance(prompt, str):
        if not prompt.strip():
            raise InvalidRequestError("the prompt is empty; give some text to continue", "prompt")
        prompt = tok.encode(prompt, bos=True, eos=False)
    (ids,) = llama.check_prompts([prompt])
    if max_gen_len is None:
        max_gen_len = llama.max_seq_len - len(ids)
    check_sampling(temperature, top_p, max_gen_len)
    check_top_k_shown(top_k_shown)
    check_seed(seed)

    def piece(t: int) -> str:
        return tok.decode([t])

    steps: list[TokenExplanation] = []
    stop_ids = set(llama.stop_ids)
    if echo:
        steps += _explain_prompt(llama, ids, temperature, top_p, top_k_shown, piece)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=llama.device)
        generator.manual_seed(seed)
    batch = new_batch([ids], max_gen_len, llama.max_seq_len, tok.pad_id, False, llama.device)
    tap = _Tap(llama.model)
    text = IncrementalDecoder(tok, ids)
    for pos in decode_steps(tap, batch, temperature, top_p, llama.stop_ids, tok.pad_id, generator):
        if pos - len(ids) >= max_gen_len:  # pragma: no cover - total_len already bounds the loop
            break
        token = int(batch.tokens[0, pos])
        stop = token in stop_ids
        stats = token_stats(tap.last, token, temperature, top_p, top_k_shown, piece)
        steps.append(TokenExplanation(pos, token, "" if stop else text.push(token), piece(token),
                                      stop=stop, **stats))
        if stop:
            break
    _flush(text, steps)
    return Explanation(ids, float(temperature), float(top_p), seed, bool(echo), steps, text_prompt)


def _flush(text: IncrementalDecoder, steps: list[TokenExplanation]) -> None:
    """Give the held-back end of an unfinished character to the last non-stop token."""
    rest = text.flush()
    if rest:
        last = next(s for s in reversed(steps) if not s.stop)
        last.text += rest


@torch.inference_mode()
def _explain_prompt(llama, ids, temperature, top_p, k, piece) -> list[TokenExplanation]:
    """The prompt's tokens, each with the distribution the model predicted for it (stateless pass)."""
    tokens = torch.tensor([ids], device=llama.device)
    logits = llama.model(tokens)[0]  # (T, V): row i predicts token i + 1
    text = IncrementalDecoder(llama.tokenizer)
    steps = [TokenExplanation(0, ids[0], text.push(ids[0]), piece(ids[0]), prompt=True)]
    for i in range(1, len(ids)):
        stats = token_stats(logits[i - 1], ids[i], temperature, top_p, k, piece)
        steps.append(TokenExplanation(i, ids[i], text.push(ids[i]), piece(ids[i]), prompt=True, **stats))
    _flush(text, steps)
    return steps
