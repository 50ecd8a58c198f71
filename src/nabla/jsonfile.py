"""The small JSON files beside a model: params.json, config.json, generation_config.json, tokenizer_config.json.

One reader, `read_json_object`, whose errors name the file and the fix, and
one parser for token-id fields, `token_ids` (bos/eos_token_id: an id, a list
of ids, or null).

Leaves out: what the keys mean (nabla.model.args for params.json,
nabla.checkpoint.hf for config.json, nabla.tokenizer for the tokenizer's
files) and writing files (nabla.checkpoint.io).
"""

from __future__ import annotations

import json
from pathlib import Path

from nabla.errors import ConfigError, NablaError


def read_json_object(path: str | Path, what: str = "a JSON object", *, missing_ok: bool = False,
                     error: type[NablaError] = ConfigError) -> dict:
    """The object a JSON file holds; {} for a missing file when `missing_ok`.

    A file that is not JSON, or holds something other than an object, raises
    `error` (ConfigError; the tokenizer's metadata raises TokenizerError).
    """
    path = Path(path)
    if missing_ok and not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path} is not valid JSON ({e}); re-download or fix the file") from None
    if not isinstance(value, dict):
        raise error(f"{path} must hold {what}, got {type(value).__name__}")
    return value


def token_ids(value, source: str = "config.json") -> list[int]:
    """A bos/eos_token_id field as a list: an id, a list of ids, or null ([])."""
    if value is None:
        return []
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return list(value)
    raise ConfigError(f"{source}: a token id must be an integer or a list of integers, got {value!r}")
