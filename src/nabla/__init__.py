"""nabla: run, serve, train and understand Llama-family language models anywhere."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from nabla.errors import (
    CheckpointError,
    ConfigError,
    ContextLengthError,
    InvalidRequestError,
    NablaError,
    TokenizerError,
)

__version__ = "0.1.0"


def default_model_path() -> Path:
    """The built-in story model shipped inside the package (a Meta-format folder)."""
    return Path(str(resources.files("nabla") / "assets" / "stories"))


def __getattr__(name: str):
    # Import the torch-heavy API lazily so `nabla mnist` and `--help` start fast.
    if name == "Llama":
        from nabla.api import Llama

        return Llama
    raise AttributeError(f"module 'nabla' has no attribute {name!r}")


__all__ = ["Llama", "default_model_path", "NablaError", "ConfigError", "CheckpointError",
           "TokenizerError", "InvalidRequestError", "ContextLengthError"]
