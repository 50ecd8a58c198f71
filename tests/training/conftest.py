"""A tiny synthetic story corpus and a tokenizer trained on it, shared by the training tests."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

NAMES = ["Lily", "Tom", "Ben", "Mia", "Sam", "Anna"]
THINGS = ["ball", "kite", "cat", "dog", "box", "tree", "cake", "boat"]
FEELINGS = ["happy", "sad", "tired", "excited"]
TINY = dict(preset="tiny", seq_len=32, batch_size=8, warmup=2, eval_every=10, eval_tokens=512,
            save_every=5, progress=False, seed=3)


def story(rng: random.Random) -> str:
    n, t, f = rng.choice(NAMES), rng.choice(THINGS), rng.choice(FEELINGS)
    return (f"Once upon a time, there was a little girl named {n}. {n} had a {t}.\n"
            f"One day, the {t} was lost. {n} was {f}. Then {n} found the {t} and played all day.")


def write_stories(path: Path, n: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    path.write_text("".join(story(rng) + "\n<|endoftext|>\n" for _ in range(n)), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """A folder with one TinyStories-V2-style file of 600 stories (~100 KB)."""
    d = tmp_path_factory.mktemp("corpus")
    write_stories(d / "stories.txt", 600)
    return d


@pytest.fixture(scope="session")
def tokenizer_path(corpus, tmp_path_factory) -> Path:
    from nabla.training.data import parse_sources, train_tokenizer

    out = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    return train_tokenizer(parse_sources([str(corpus)]), out, vocab_size=320)


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """Tiny models train fastest on one thread, and the tests share the machine."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # also stops train() from raising the count
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
