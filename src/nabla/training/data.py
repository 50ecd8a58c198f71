"""Training data: read and clean a text corpus, train a tokenizer, write token files, draw batches.

A corpus is one or more files or folders of UTF-8 text. Each file is read as
a stream of lines (so files larger than memory work), cleaned (byte-order
mark dropped, CRLF made LF, trailing spaces cut, Project Gutenberg header and
footer stripped) and cut into documents:

- lines that read `<|endoftext|>` end a document (TinyStories V2);
- in files with one paragraph per line and blank lines between paragraphs
  (TinyStories V1), a line that directly follows another line starts a new
  document;
- any other file (a book, hard-wrapped at ~70 columns) is one document whose
  paragraphs are unwrapped onto one line each.

Each document becomes BOS + tokens + EOS in one long token stream, written
once to `train.bin` / `val.bin` (np.memmap, uint16 or uint32). Whole stories,
or ~16 KB pieces of books, are held out for validation at random (seeded).
A source may be weighted (`DIR*3`): its training tokens are written three
times, its validation tokens once.

Leaves out: the training loop (nabla.training.loop), shuffled epochs (batches
are random windows of the stream).
"""

from __future__ import annotations

import codecs
import json
import math
import random
import re
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nabla.checkpoint.io import atomic_write_bytes, atomic_write_text
from nabla.device import is_accelerator
from nabla.errors import ConfigError

EOT_MARKER = "<|endoftext|>"
TEXT_SUFFIXES = {".txt", ".md", ".text", ""}
PIECE_CHARS = 16_000  # books are split into pieces of about this size for the val split
_GUTENBERG_START = re.compile(r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG", re.I)
_GUTENBERG_END = re.compile(r"^(\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg)", re.I)
_ILLUSTRATION = re.compile(r"^\s*\[Illustration[^\]]*\]\s*$", re.I)


@dataclass
class Source:
    """One --data argument: the files it names and how often its training text is repeated."""
    name: str
    files: list[Path]
    weight: int = 1


# ---------------------------------------------------------------------------- reading


def parse_sources(specs: list[str]) -> list[Source]:
    """Files of each `--data FILE_OR_DIR[*N]`, with unreadable files skipped (warned)."""
    sources = []
    for spec in specs:
        path_str, weight = spec, 1
        m = re.fullmatch(r"(.+)\*(\d+)", spec)
        if m and not Path(spec).exists():
            path_str, weight = m.group(1), int(m.group(2))
            if weight < 1:
                raise ConfigError(f"--data {spec}: the repeat count after '*' must be 1 or more")
        path = Path(path_str).expanduser()
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES
                           and not p.name.startswith("."))
            if not files:
                warnings.warn(f"--data {path}: no .txt files in this folder, skipped", stacklevel=2)
        elif path.is_file():
            files = [path]
        else:
            raise ConfigError(f"--data {path}: no such file or folder; pass text files or folders of .txt files")
        good = [f for f in files if _usable(f)]
        if good:
            sources.append(Source(path_str, good, weight))
    if not sources:
        raise ConfigError("no usable training text: every --data file was empty or not UTF-8 text "
                          "(see the warnings above); pass UTF-8 .txt files")
    return sources


def _usable(path: Path) -> bool:
    """True for a non-empty UTF-8 file; warns and returns False otherwise (streamed check)."""
    decoder = codecs.getincrementaldecoder("utf-8-sig")()
    text_seen = False
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                text_seen = text_seen or bool(decoder.decode(chunk).strip())
            text_seen = text_seen or bool(decoder.decode(b"", final=True).strip())
    except UnicodeDecodeError as e:
        warnings.warn(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}), skipped; "
                      "convert it with `iconv -t utf-8`", stacklevel=3)
        return False
    except OSError as e:
        warnings.warn(f"{path} cannot be read ({e}), skipped", stacklevel=3)
        return False
    if not text_seen:
        warnings.warn(f"{path} is empty, skipped", stacklevel=3)
    return text_seen


def _lines(path: Path) -> Iterator[str]:
    """Lines without line ends or trailing spaces; BOM dropped; Gutenberg boilerplate cut."""
    with open(path, encoding="utf-8-sig", newline=None) as f:
        head = [line.rstrip() for _, line in zip(range(600), f)]
        start = next((i + 1 for i, line in enumerate(head) if _GUTENBERG_START.match(line)), 0)
        gutenberg = start > 0
        for line in _chain(head[start:], (line.rstrip() for line in f)):
            if gutenberg and _GUTENBERG_END.match(line):
                return
            yield "" if gutenberg and _ILLUSTRATION.match(line) else line


def _chain(*its):
    for it in its:
        yield from it


def _layout(path: Path) -> str:
    """'eot' (<|endoftext|> separated), 'lines' (a paragraph per line) or 'wrapped' (a book)."""
    lines = [line for _, line in zip(range(400), _lines(path))]
    if any(line.strip() == EOT_MARKER for line in lines):
        return "eot"
    full = [line for line in lines if line.strip()]
    if full and sum(map(len, full)) / len(full) > 100 and len(full) < len(lines):
        return "lines"
    return "wrapped"


def read_documents(path: Path) -> Iterator[tuple[str, bool]]:
    """(text, ends_document) pieces of a file's documents, in order; see the module docstring."""
    layout = _layout(path)
    doc: list[str] = []  # paragraphs (lines for 'eot') of the current document or piece
    size = 0
    prev_blank = True
    for line in _lines(path):
        blank = not line.strip()
        if layout == "eot":
            if line.strip() == EOT_MARKER:
                if doc:
                    yield "\n".join(doc).strip("\n"), True
                doc = []
            else:
                doc.append(line)
        elif layout == "lines":
            if not blank and not prev_blank and doc:  # a new story starts right after the last
                yield "\n\n".join(doc), True
                doc = []
            if not blank:
                doc.append(line)
        else:  # wrapped: unwrap paragraphs, cut pieces at paragraph ends
            if blank:
                if not prev_blank and size >= PIECE_CHARS:
                    yield "\n\n".join(doc), False
                    doc, size = [], 0
            elif prev_blank or not doc:
                doc.append(line.strip())
            else:
                doc[-1] += " " + line.strip()
            size += len(line)
        prev_blank = blank
    if layout == "eot":
        text = "\n".join(doc).strip("\n")
        if text:
            yield text, True
    elif doc:
        yield "\n\n".join(doc), True
    elif layout == "wrapped":
        yield "", True


# ---------------------------------------------------------------------------- tokenizer


def train_tokenizer(sources: list[Source], out_path: Path, vocab_size: int, seed: int = 0) -> Path:
    """A Llama-style SentencePiece BPE model (byte fallback) trained on the cleaned corpus."""
    import sentencepiece as spm

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    # Named like the other temporaries, so that a run killed meanwhile removes it when it starts again.
    with tempfile.TemporaryDirectory(prefix=f".{out_path.name}.", suffix=".tmp", dir=out_path.parent) as tmp:
        text_file = Path(tmp) / "corpus.txt"
        n_chars = 0
        with open(text_file, "w", encoding="utf-8") as f:
            for src in sources:
                for path in src.files:
                    for text, _ in read_documents(path):
                        for para in text.split("\n"):
                            if para.strip():
                                f.write((para + "\n") * src.weight)
                                n_chars += len(para) * src.weight
        if n_chars == 0:
            raise ConfigError("the training text is empty after cleaning; pass files with some text in them")
        try:
            spm.SentencePieceTrainer.train(
                input=str(text_file), model_prefix=str(Path(tmp) / "tok"), model_type="bpe",
                vocab_size=vocab_size, byte_fallback=True, split_digits=True,
                allow_whitespace_only_pieces=True, normalization_rule_name="identity",
                add_dummy_prefix=True, remove_extra_whitespaces=False, character_coverage=0.9995,
                unk_id=0, bos_id=1, eos_id=2, pad_id=-1, input_sentence_size=2_000_000,
                shuffle_input_sentence=True, max_sentence_length=16384, num_threads=2,
                seed_sentencepiece_size=1_000_000, minloglevel=2,
            )
        except RuntimeError as e:
            msg = str(e)
            hint = re.search(r"value <= (\d+)", msg)
            if hint:
                raise ConfigError(f"the corpus is too small for a vocabulary of {vocab_size} pieces; "
                                  f"pass --vocab-size {hint.group(1)} or less, or more text") from None
            raise ConfigError(f"tokenizer training failed: {msg}") from None
        atomic_write_bytes(out_path, (Path(tmp) / "tok.model").read_bytes())
    return out_path


def token_byte_lengths(tokenizer) -> np.ndarray:
    """UTF-8 bytes each token stands for (0 for BOS/EOS/UNK), for bits per byte."""
    sp = tokenizer.sp
    n = np.zeros(sp.vocab_size(), dtype=np.int64)
    for i in range(sp.vocab_size()):
        if sp.is_control(i) or sp.is_unknown(i):
            continue
        if sp.is_byte(i):
            n[i] = 1
        else:
            n[i] = len(sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
    return n


# ---------------------------------------------------------------------------- token files


def _encode_piece(tokenizer, text: str, continues: bool) -> list[int]:
    """Tokens of a document piece; a piece that continues a document gets no dummy-prefix space."""
    if not continues:
        return tokenizer.sp.encode(text)
    ids = tokenizer.sp.encode("\n\n" + text)  # the dummy prefix lands on the newlines...
    space = tokenizer.sp.piece_to_id("\u2581")
    return ids[1:] if ids and ids[0] == space else ids  # ...as a lone "▁", which is dropped


def build_token_files(sources: list[Source], tokenizer, out_dir: Path, val_fraction: float = 0.05,
                      seed: int = 0) -> dict:
    """Tokenize the corpus once into out_dir/train.bin and val.bin; returns (and saves) meta.json."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = np.uint16 if tokenizer.n_words <= 1 << 16 else np.uint32
    rng = random.Random(seed)
    counts = {"train": 0, "val": 0}
    val_ranges = {}
    files = {split: open(out_dir / f"{split}.bin.tmp", "wb") for split in counts}
    try:
        for src in sources:
            val_start = counts["val"]
            train_start = counts["train"]
            for path in src.files:
                first = True  # next piece starts a document
                for text, ends in read_documents(path):
                    if not text and first:
                        continue
                    ids = [tokenizer.bos_id] if first else []
                    ids += _encode_piece(tokenizer, text, not first) if text else []
                    if ends:
                        ids.append(tokenizer.eos_id)
                    split = "val" if rng.random() < val_fraction else "train"
                    files[split].write(np.asarray(ids, dtype=dtype).tobytes())
                    counts[split] += len(ids)
                    first = ends
            val_ranges[src.name] = [val_start, counts["val"]]
            # Repeat this source's training tokens (weight - 1) more times, copying from disk.
            files["train"].flush()
            n = counts["train"] - train_start
            itemsize = np.dtype(dtype).itemsize
            for _ in range(src.weight - 1):
                with open(out_dir / "train.bin.tmp", "rb") as f:
                    f.seek(train_start * itemsize)
                    left = n * itemsize
                    while left:
                        chunk = f.read(min(left, 1 << 22))
                        files["train"].write(chunk)
                        left -= len(chunk)
                counts["train"] += n
    finally:
        for f in files.values():
            f.close()
    for split in counts:
        (out_dir / f"{split}.bin.tmp").replace(out_dir / f"{split}.bin")
    meta = {"dtype": np.dtype(dtype).name, "train_tokens": counts["train"], "val_tokens": counts["val"],
            "val_ranges": val_ranges, "vocab_size": tokenizer.n_words,
            "sources": [{"name": s.name, "files": [str(p) for p in s.files], "weight": s.weight}
                        for s in sources]}
    atomic_write_text(out_dir / "meta.json", json.dumps(meta, indent=2) + "\n")
    return meta


class TokenData:
    """The memory-mapped train and val token streams of a prepared data folder."""

    def __init__(self, data_dir: Path):
        data_dir = Path(data_dir)
        self.meta = json.loads((data_dir / "meta.json").read_text(encoding="utf-8"))
        dtype = np.dtype(self.meta["dtype"])
        self.train = self._open(data_dir / "train.bin", dtype)
        self.val = self._open(data_dir / "val.bin", dtype)

    @staticmethod
    def _open(path: Path, dtype) -> np.ndarray:
        if path.stat().st_size == 0:
            return np.zeros(0, dtype=dtype)
        return np.memmap(path, dtype=dtype, mode="r")

    def check(self, seq_len: int) -> None:
        """Fail clearly when either split is too short for one sequence."""
        for split, toks in (("training", self.train), ("validation", self.val)):
            if len(toks) < seq_len + 2:
                raise ConfigError(
                    f"the {split} split has {len(toks)} tokens, fewer than one sequence of --seq-len "
                    f"{seq_len} needs; pass more text, a smaller --seq-len, or a larger --val-fraction")


def get_batch(tokens: np.ndarray, batch_size: int, seq_len: int, generator: torch.Generator,
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows x (B, T) of the stream and their next tokens y (B, T)."""
    ix = torch.randint(len(tokens) - seq_len - 1, (batch_size,), generator=generator).tolist()
    xy = torch.from_numpy(np.stack([tokens[i:i + seq_len + 1].astype(np.int64) for i in ix]))
    x, y = xy[:, :-1], xy[:, 1:]
    if is_accelerator(device):
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


def eval_windows(meta: dict, n_val: int, seq_len: int, max_tokens: int | None) -> list[tuple[int, str]]:
    """Start offsets (and source names) of non-overlapping val windows, spread over every source.

    With `max_tokens` the windows are evenly spaced, at most max_tokens // seq_len of them.
    """
    windows = []
    for name, (start, end) in meta["val_ranges"].items():
        windows += [(i, name) for i in range(start, min(end, n_val) - seq_len - 1 + 1, seq_len)]
    if not windows and n_val >= seq_len + 1:
        windows = [(0, next(iter(meta["val_ranges"]), "val"))]
    if max_tokens is not None:
        k = max(1, max_tokens // seq_len)
        if len(windows) > k:
            step = len(windows) / k
            windows = [windows[math.floor(j * step)] for j in range(k)]
    return windows
