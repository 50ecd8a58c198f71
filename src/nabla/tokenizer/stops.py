"""The stop ids of a model, gathered in one place.

Generation ends at any of:

    the tokenizer's own end tokens, which its class lists in `stop_ids`:
        its EOS, and for Llama 3 (tiktoken) also <|eot_id|>, which ends a chat turn;
    every eos_token_id that a Hugging Face config.json or generation_config.json
        names (an id or a list: Llama 3.1 Instruct lists three), beside the
        tokenizer file and beside the weights.

`load_tokenizer` sets `tokenizer.stop_ids` with `stop_ids`; the checkpoint
reads its own folder's list (`Checkpoint.eos_ids`) with `eos_token_ids`.

Leaves out: stopping itself (nabla.generation.loop) and stop strings (nabla.server).
"""

from __future__ import annotations

from pathlib import Path

from nabla.errors import ConfigError, NablaError, TokenizerError
from nabla.jsonfile import read_json_object, token_ids

CONFIG_FILES = ("config.json", "generation_config.json")


def eos_token_ids(folder: Path, error: type[NablaError] = ConfigError) -> list[int]:
    """Every eos_token_id that config.json, then generation_config.json, in `folder` name, without repeats."""
    ids: list[int] = []
    for name in CONFIG_FILES:
        path = folder / name
        config = read_json_object(path, missing_ok=True, error=error)
        ids += [i for i in token_ids(config.get("eos_token_id"), str(path)) if i not in ids]
    return ids


def stop_ids(tokenizer, *folders: Path | None) -> tuple[int, ...]:
    """The tokenizer's own stop ids, then those the configs in `folders` name that are in its vocabulary."""
    stops = list(tokenizer.stop_ids)
    for folder in dict.fromkeys(f for f in folders if f is not None):
        stops += [i for i in eos_token_ids(folder, TokenizerError) if i not in stops and 0 <= i < tokenizer.n_words]
    return tuple(stops)
