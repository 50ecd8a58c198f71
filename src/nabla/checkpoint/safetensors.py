"""safetensors files: memory-mapped reading, streamed atomic writing, and the index of sharded folders.

Reading goes through the `safetensors` package: `safe_open` checks the header,
offsets and size, and its torch tensors are views of one read-only mapping of
the file (`UntypedStorage.from_file(shared=False)`), so nothing is read until
used and a tensor's pages can be released once it is copied into a model.
Writing streams one tensor at a time into an atomic file (nabla.checkpoint.io),
because `safetensors.torch.save_file` wants every tensor in memory at once.

Leaves out: tensor names and layouts (nabla.checkpoint.hf) and pytorch_model.bin files.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from nabla.checkpoint.io import atomic_open
from nabla.errors import CheckpointError

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
"""The safetensors dtype codes nabla reads and writes."""
DTYPE_CODES = {v: k for k, v in DTYPES.items()}


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors file, memory-mapped (nothing is read until used)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                code = f.get_slice(name).get_dtype()
                if code not in DTYPES:
                    raise CheckpointError(f"{path}: {name} has dtype {code}, which nabla cannot load")
            return {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot read {path}: {e}. The file may be truncated or not a "
                              "safetensors file; re-download or re-convert it") from None


def read_index(index: Path) -> list[str]:
    """The weight files a *.index.json names (its "weight_map" values), sorted.

    pytorch_model.bin.index.json has the same layout as model.safetensors.index.json.
    """
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return sorted(set(weight_map.values()))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        raise CheckpointError(f"{index} is not a valid index (expected a JSON object with a "
                              "'weight_map'); re-download it") from None


def write_safetensors(path: Path, tensors: Mapping[str, Callable[[], torch.Tensor] | torch.Tensor],
                      shapes: dict[str, tuple], dtypes: dict[str, torch.dtype]) -> None:
    """Stream tensors (or functions making them) into a .safetensors file atomically, one in memory at a time."""
    header, offset = {}, 0
    for name in tensors:
        nbytes = dtypes[name].itemsize
        for s in shapes[name]:
            nbytes *= s
        header[name] = {"dtype": DTYPE_CODES[dtypes[name]], "shape": list(shapes[name]),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with atomic_open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name in tensors:
            t = tensors[name]
            t = t() if callable(t) else t
            t = t.detach().to("cpu", dtype=dtypes[name]).contiguous()
            assert tuple(t.shape) == tuple(shapes[name]), name
            f.write(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
