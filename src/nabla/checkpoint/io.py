"""Atomic file writes: a crash or Ctrl-C never leaves a half-written file behind.

Everything nabla saves goes through here: write to a temporary file in the
same folder, flush it to disk, then rename over the target (atomic on POSIX
and Windows). A write that fails (a full disk, a read-only folder) is a
CheckpointError naming the file; the file as it was is left intact.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import torch

from nabla.errors import CheckpointError


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise _cannot_write(path, e) from None
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        with os.fdopen(fd, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise _cannot_write(path, e) from None
        raise


def _cannot_write(path: Path, e: OSError) -> CheckpointError:
    return CheckpointError(f"cannot write {path} ({e.strerror or e}); the file as it was before is intact "
                           "(free some space or fix the folder's permissions, then run again)")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_torch_save(obj, path: str | Path) -> None:
    with atomic_open(path, "wb") as f:
        torch.save(obj, f)
