"""Fine-tuning data: plain text and JSONL chat conversations, tokenized with the model's own tokenizer.

Every example becomes token ids and targets, one target per id, where
IGNORE (-100) marks ids the loss skips:

- a text file (.txt, .md, no suffix) is cut into documents as `nabla train`
  cuts them (nabla.training.data.read_documents); each is BOS + text + EOS
  and every token is a target;
- a .jsonl file holds one example per line: `{"messages": [{"role", "content"}, ...]}`
  (OpenAI's chat layout) or `{"text": "..."}`. Conversations are rendered
  through the model's chat format (nabla.tokenizer.chat: Llama 2, Llama 3 or
  the checkpoint's Jinja template), and only the assistant turns (their text
  and the token that ends them) are targets.

A conversation is encoded as the prompt its last assistant turn answers,
then that answer: the tokens the model sees and writes at inference time.
The earlier answers sit inside that prompt; each is located after the prompt
it answers (the longest common prefix) and marked as targets for as many
tokens as the answer encodes to, up to and with the token closing it.

Examples are held out whole for validation (seeded); when none is (a single
short text), the last `val_fraction` of the tokens is. Batches are random
windows of the concatenated train stream (`draw`); validation windows tile
the val stream.

Leaves out: packing without cross-example attention, tool calls and images
in messages, prompt/completion pairs.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nabla.errors import ConfigError, InvalidRequestError
from nabla.training.data import parse_sources, read_documents

IGNORE = -100


@dataclass
class Example:
    ids: list[int]
    targets: list[int]  # same length; IGNORE where no loss is taken


@dataclass
class FinetuneData:
    train: np.ndarray  # token ids of the train stream (int64)
    train_targets: np.ndarray
    val: np.ndarray
    val_targets: np.ndarray

    def check(self, seq_len: int) -> None:
        for split, toks, tg in (("training", self.train, self.train_targets),
                                ("validation", self.val, self.val_targets)):
            if len(toks) < seq_len + 2:
                raise ConfigError(f"the {split} split has {len(toks)} tokens, fewer than one sequence of "
                                  f"--seq-len {seq_len} needs; pass more text, a smaller --seq-len, or a "
                                  "larger --val-fraction")
            if not (tg != IGNORE).any():
                raise ConfigError(f"the {split} split has no tokens to learn (no assistant turns)")


# ------------------------------------------------------------------ reading
def read_jsonl(path: Path) -> list[dict]:
    """The examples of a .jsonl file; a line that is not a JSON object is an error naming it."""
    rows = []
    with open(path, encoding="utf-8-sig") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise ConfigError(f"{path}, line {n}: not valid JSON ({e.msg} at column {e.colno}); each line of "
                                  'a .jsonl file must be one object like {"messages": [...]} or {"text": "..."}'
                                  ) from None
            if not isinstance(row, dict) or not ("messages" in row or "text" in row):
                raise ConfigError(f'{path}, line {n}: expected an object with "messages" or "text", got '
                                  f"{type(row).__name__} {str(row)[:60]}")
            rows.append({**row, "_where": f"{path}, line {n}"})
    return rows


def check_conversation(messages, where: str) -> list[dict]:
    """Messages as [system?] user assistant (user assistant)*, ending with an assistant turn."""
    if not isinstance(messages, list) or not messages:
        raise ConfigError(f'{where}: "messages" must be a non-empty list of {{"role", "content"}} objects')
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                or not isinstance(m.get("content"), str):
            raise ConfigError(f"{where}: message {j} must be an object with role system/user/assistant and a "
                              "string content")
    if not any(m["role"] == "assistant" for m in messages):
        raise ConfigError(f"{where}: the conversation has no assistant turn, so there is nothing to learn; "
                          "add the assistant's answers (fine-tuning trains on them)")
    msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
    if msgs[-1]["role"] != "assistant":
        msgs = msgs[:max(i for i, m in enumerate(msgs) if m["role"] == "assistant") + 1]
    return msgs


def encode_conversation(fmt, tokenizer, messages: list[dict], where: str) -> Example:
    """Ids and targets of a conversation in the model's chat format (see the module docstring)."""
    try:
        prompt = fmt.encode_dialog(messages[:-1])
    except InvalidRequestError as e:
        raise ConfigError(f"{where}: {e}") from None
    closing = _closing_id(fmt, tokenizer)
    ids = prompt + _answer_ids(tokenizer, messages[-1]["content"]) + [closing]
    targets = [IGNORE] * len(ids)
    for j, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(prompt) if j == len(messages) - 1 else _common_prefix(ids, fmt.encode_dialog(messages[:j]))
        end = start + len(_answer_ids(tokenizer, m["content"]))
        # up to the token that closes the answer (Llama 2 puts a space piece before its EOS)
        end = next((k + 1 for k in range(end, min(end + 4, len(ids))) if ids[k] == closing), end + 1)
        for i in range(start, min(end, len(ids))):
            targets[i] = ids[i]
    return Example(ids, targets)


def _answer_ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text.strip(), bos=False, eos=False)


def _closing_id(fmt, tokenizer) -> int:
    """The token that ends an assistant turn: Llama 3's <|eot_id|>, else the tokenizer's EOS."""
    special = getattr(fmt, "special", None) or {}
    return special.get("<|eot_id|>", tokenizer.eos_id)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def read_examples(specs: list[str], tokenizer, fmt) -> list[Example]:
    """Every example of the --data files: text documents and JSONL rows, in order."""
    examples: list[Example] = []
    jsonl = [s for s in specs if Path(s).suffix.lower() == ".jsonl"]
    text = [s for s in specs if s not in jsonl]
    for spec in jsonl:
        path = Path(spec)
        if not path.is_file():
            raise ConfigError(f"--data {path}: no such file")
        rows = read_jsonl(path)
        if not rows:
            raise ConfigError(f"--data {path}: no examples in the file")
        for row in rows:
            if "messages" in row:
                msgs = check_conversation(row["messages"], row["_where"])
                examples.append(encode_conversation(fmt, tokenizer, msgs, row["_where"]))
            else:
                if not isinstance(row["text"], str) or not row["text"].strip():
                    raise ConfigError(f'{row["_where"]}: "text" must be a non-empty string')
                ids = tokenizer.encode(row["text"], bos=True, eos=True)
                examples.append(Example(ids, list(ids)))
    if text:
        for src in parse_sources(text):
            for path in src.files:
                first = True
                for piece, ends in read_documents(path):
                    if piece:
                        ids = tokenizer.encode(piece, bos=first, eos=ends)
                        examples += [Example(ids, list(ids))] * src.weight
                    first = ends
    if not examples:
        raise ConfigError("no training examples in --data; pass text files or .jsonl conversations")
    return examples


# ------------------------------------------------------------------ streams
def split_examples(examples: list[Example], val_fraction: float, seed: int) -> FinetuneData:
    """Hold out whole examples at random (seeded); with none held out, the stream's tail."""
    rng = random.Random(seed)
    held = [rng.random() < val_fraction for _ in examples]
    if all(held) or not any(held):
        ids = np.concatenate([np.asarray(e.ids, np.int64) for e in examples])
        tg = np.concatenate([np.asarray(e.targets, np.int64) for e in examples])
        cut = len(ids) - max(1, math.ceil(val_fraction * len(ids)))
        return FinetuneData(ids[:cut], tg[:cut], ids[cut:], tg[cut:])

    def stream(keep: bool, attr: str) -> np.ndarray:
        return np.concatenate([np.asarray(getattr(e, attr), np.int64) for e, h in zip(examples, held) if h == keep])

    return FinetuneData(stream(False, "ids"), stream(False, "targets"), stream(True, "ids"), stream(True, "targets"))


def draw(data: FinetuneData, batch_size: int, seq_len: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows x (B, T) of the train stream and their targets y (B, T): y[t] is the target after x[t]."""
    ix = torch.randint(len(data.train) - seq_len - 1, (batch_size,), generator=gen).tolist()
    x = np.stack([data.train[i:i + seq_len] for i in ix])
    y = np.stack([data.train_targets[i + 1:i + seq_len + 1] for i in ix])
    return torch.from_numpy(x), torch.from_numpy(y)


def val_windows(data: FinetuneData, seq_len: int, max_tokens: int | None) -> list[int]:
    """Start offsets of non-overlapping val windows, evenly spread, at most max_tokens // seq_len."""
    starts = list(range(0, len(data.val) - seq_len - 1 + 1, seq_len)) or [0]
    if max_tokens is not None:
        k = max(1, max_tokens // seq_len)
        if len(starts) > k:
            step = len(starts) / k
            starts = [starts[math.floor(j * step)] for j in range(k)]
    return starts


def masked_loss(model, data: FinetuneData, starts: list[int], seq_len: int, device, ctx, batch_size: int,
                token_bytes) -> dict:
    """Mean loss (nats) over the validation targets in the windows, and bits per byte of their text."""
    model.eval()
    nats, count, nbytes = 0.0, 0, 0
    with torch.no_grad():
        for b in range(0, len(starts), batch_size):
            chunk = starts[b:b + batch_size]
            x = torch.from_numpy(np.stack([data.val[i:i + seq_len] for i in chunk])).to(device)
            y = torch.from_numpy(np.stack([data.val_targets[i + 1:i + seq_len + 1] for i in chunk]))
            with ctx:
                logits = model(x)
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten(),
                                                     ignore_index=IGNORE, reduction="sum")
            nats += loss.item()
            kept = y[y != IGNORE].tolist()
            count += len(kept)
            nbytes += sum(token_bytes(t) for t in kept)
    model.train()
    return {"loss": nats / max(1, count), "bpb": nats / math.log(2) / max(1, nbytes), "tokens": count,
            "sources": {}}


def byte_counter(tokenizer):
    """token id -> UTF-8 bytes it stands for (0 for special tokens), cached."""
    cache: dict[int, int] = {}
    specials = {getattr(tokenizer, "bos_id", None), getattr(tokenizer, "eos_id", None),
                *getattr(tokenizer, "stop_ids", ())}

    def count(t: int) -> int:
        if t not in cache:
            cache[t] = 0 if t in specials else len(tokenizer.decode([t]).encode("utf-8"))
        return cache[t]

    return count
