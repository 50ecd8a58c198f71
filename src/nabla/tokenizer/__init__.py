"""Tokenizers behind one small interface: encode(s, bos, eos), decode(ids).

`load_tokenizer(path)` tells the kind from the file's contents, never its
name or folder:

    a SentencePiece model (protobuf)      -> SentencePieceTokenizer (Llama 1/2)
    lines of "base64-token rank"          -> TiktokenTokenizer (Llama 3)
    a JSON object                         -> HFTokenizer (Hugging Face tokenizer.json)

Metadata beside the file completes it: a Hugging Face tokenizer_config.json
chat template becomes the chat format, and config.json/generation_config.json
eos_token_id lists, beside it or in the model's folder, add stop tokens
(nabla.tokenizer.stops).
"""

from __future__ import annotations

import json
import re
from functools import partial
from pathlib import Path

from nabla.errors import TokenizerError
from nabla.jsonfile import read_json_object
from nabla.tokenizer.base import Tokenizer
from nabla.tokenizer.sentencepiece import SentencePieceTokenizer
from nabla.tokenizer.stops import stop_ids

_TIKTOKEN_LINE = re.compile(rb"^[A-Za-z0-9+/]+=*[ \t]+\d+\r?$")


def tokenizer_kind(path: str | Path) -> str:
    """'sentencepiece', 'tiktoken' or 'hf', from the first bytes of the file."""
    with open(path, "rb") as f:
        head = f.read(4096)
    if head.lstrip().startswith(b"{"):
        return "hf"
    lines = head.split(b"\n")
    sample = [ln for ln in lines[: max(1, len(lines) - 1)] if ln][:8]
    if sample and all(_TIKTOKEN_LINE.match(ln) for ln in sample):
        return "tiktoken"
    return "sentencepiece"


def chat_template(folder: Path) -> str | None:
    """The Jinja chat template of a Hugging Face folder, if it has one."""
    jinja = folder / "chat_template.jinja"  # transformers 5 writes the template on its own
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    for name in ("tokenizer_config.json", "chat_template.json"):
        template = read_json_object(folder / name, missing_ok=True, error=TokenizerError).get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if isinstance(template, str) and template.strip():
            return template
    return None


def _add_folder_metadata(tok, folder: Path, model_dir: Path | None) -> None:
    from nabla.tokenizer.chat import JinjaChatFormat
    from nabla.tokenizer.hf import token_text

    template = chat_template(folder)
    if template is not None:
        config = read_json_object(folder / "tokenizer_config.json", missing_ok=True, error=TokenizerError)
        bos = token_text(config.get("bos_token")) or getattr(tok, "bos_token", None)
        eos = token_text(config.get("eos_token")) or getattr(tok, "eos_token", None)
        tok.chat_format = partial(JinjaChatFormat, template=template, bos_token=bos or "", eos_token=eos or "")
    tok.stop_ids = stop_ids(tok, folder, model_dir)


def load_tokenizer(path: str | Path, model_dir: str | Path | None = None) -> Tokenizer:
    """Open a tokenizer file, telling its kind from its contents.

    Its stop ids include the eos_token_id lists of the configs beside it and,
    when given, in `model_dir` (the checkpoint folder), as nabla.tokenizer.stops gathers them.
    """
    path = Path(path)
    if not path.exists():
        raise TokenizerError(f"tokenizer file {path} not found; pass --tokenizer FILE "
                             "(a tokenizer.model or tokenizer.json)")
    if path.is_dir():
        for name in ("tokenizer.json", "tokenizer.model"):
            if (path / name).is_file():
                raise TokenizerError(f"{path} is a folder; pass the tokenizer file itself ({path / name})")
        raise TokenizerError(f"{path} is a folder; pass the tokenizer file itself (e.g. {path}/tokenizer.model)")
    kind = tokenizer_kind(path)
    if kind == "hf":
        from nabla.tokenizer.hf import HFTokenizer

        tok = HFTokenizer(path)
    elif kind == "tiktoken":
        from nabla.tokenizer.tiktoken import TiktokenTokenizer

        tok = TiktokenTokenizer(path)
    else:
        try:
            tok = SentencePieceTokenizer(path)
        except TokenizerError:
            raise TokenizerError(
                f"{path} is not a tokenizer nabla knows: not a SentencePiece model, a tiktoken BPE file "
                "(Llama 3) or a Hugging Face tokenizer.json") from None
    try:
        _add_folder_metadata(tok, path.parent, Path(model_dir) if model_dir is not None else None)
    except (OSError, json.JSONDecodeError):  # pragma: no cover - unreadable neighbours are ignored
        pass
    return tok


__all__ = ["Tokenizer", "SentencePieceTokenizer", "load_tokenizer", "tokenizer_kind"]
