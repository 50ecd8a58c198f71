"""`--lora-modules`: LoRA adapters served next to the base model, each under its own `model` name.

vLLM's syntax: `NAME=DIR` or the JSON object `{"name": ..., "path": ...,
"base_model_name": ...}`. `parse_lora_modules` checks the names (unique, not
empty) and that each folder holds a PEFT adapter, before the base model
loads; `load_lora_modules` checks each adapter against the base model's shape
and puts them all on it (nabla.model.multi_lora), adapter i being the i-th
module. Every error names `--lora-modules` and the module, in one line.

Leaves out: loading or unloading adapters while serving (vLLM's
/v1/load_lora_adapter), serving (nabla.server.serving picks a request's
adapter by its `model`), the decode step (nabla.server.batching).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from nabla.checkpoint.peft import read_adapter, read_adapter_config
from nabla.errors import ConfigError, NablaError
from nabla.model.multi_lora import add_adapters

FLAG = "--lora-modules"


@dataclass
class LoraModule:
    name: str
    """The `model` name clients ask for."""
    path: str
    """The adapter folder, as given."""
    base_model_name: str | None = None
    """The `parent` /v1/models shows (default: the served base model's name)."""


def parse_one(value: str) -> LoraModule:
    value = value.strip()
    if value.startswith("{"):
        try:
            obj = json.loads(value)
        except ValueError as e:
            raise ConfigError(f"{FLAG} {value}: not valid JSON ({e})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not isinstance(obj.get("path"), str):
            raise ConfigError(f"{FLAG} {value}: the JSON form needs string fields \"name\" and \"path\"")
        extra = sorted(set(obj) - {"name", "path", "base_model_name"})
        if extra:
            raise ConfigError(f"{FLAG} {value}: unknown field {extra[0]!r} (name, path and base_model_name are read)")
        base = obj.get("base_model_name")
        if base is not None and not isinstance(base, str):
            raise ConfigError(f"{FLAG} {value}: base_model_name must be a string")
        name, path = obj["name"].strip(), obj["path"].strip()
    else:
        name, sep, path = value.partition("=")
        name, path, base = name.strip(), path.strip(), None
        if not sep:
            raise ConfigError(f"{FLAG} {value}: expected NAME=DIR (or a JSON object with name and path)")
    if not name or not path:
        raise ConfigError(f"{FLAG} {value}: both the name and the adapter folder must be given (NAME=DIR)")
    return LoraModule(name, path, base)


def parse_lora_modules(values: list[str], base_name: str | None = None) -> list[LoraModule]:
    """The modules `values` names, checked (check_modules)."""
    return check_modules([parse_one(v) for v in values], base_name)


def check_modules(modules: list[LoraModule], base_name: str | None = None) -> list[LoraModule]:
    """`modules`, once checked: unique names, none the base's, each folder a PEFT adapter."""
    seen: set[str] = set()
    for m in modules:
        if m.name in seen:
            raise ConfigError(f"{FLAG}: the name {m.name!r} is given twice; each adapter needs its own name")
        if base_name is not None and m.name == base_name:
            raise ConfigError(f"{FLAG}: the name {m.name!r} is the base model's own; pick another "
                              "(or set the base's with --model-name)")
        seen.add(m.name)
        try:
            read_adapter_config(Path(m.path))
        except NablaError as e:
            raise type(e)(f"{FLAG} {m.name}={m.path}: {e}") from None
    return modules


def load_lora_modules(model, modules: list[LoraModule], base_name: str) -> list[LoraModule]:
    """Check each module's adapter against `model` and put them all on it (adapter i = modules[i])."""
    check_modules(modules, base_name)
    adapters = []
    for m in modules:
        try:
            adapters.append(read_adapter(Path(m.path), model.args))
        except NablaError as e:
            raise type(e)(f"{FLAG} {m.name}={m.path}: {e}") from None
    if adapters:
        add_adapters(model, adapters)
    return modules
