"""The one place that decides device, dtype and distributed backend.

Everything else in nabla asks this module; no other file names "cuda", "mps"
or "nccl". Order of preference: CUDA, then Apple MPS, then CPU.
"""

from __future__ import annotations

import os

import torch

from nabla.errors import ConfigError

# Compute dtype per device type when the caller says nothing. CPUs without
# native bf16 arithmetic run bf16 matrix products dozens of times slower than
# fp32, so a CPU computes in fp32 (bf16 checkpoints are upcast at load).
DEFAULT_DTYPE = {
    "cuda": torch.bfloat16,  # fp16 where the card has no bf16, see default_dtype()
    "mps": torch.float16,
    "cpu": torch.float32,
}

DTYPE_NAMES = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
}


def choose_device(name: str | torch.device | None = None) -> torch.device:
    """The device to compute on: the one named, else CUDA, MPS, CPU in that order."""
    if name is not None:
        try:
            device = torch.device(name)
        except (RuntimeError, TypeError) as e:
            raise ConfigError(f"unknown device {name!r}: use 'cpu', 'cuda', 'cuda:N' or 'mps'") from e
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device {name!r} was asked for but this torch has no CUDA GPU; use device='cpu'")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise ConfigError(f"device {name!r} was asked for but MPS is not available here; use device='cpu'")
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", local_rank() % torch.cuda.device_count())
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank() % torch.cuda.device_count())
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPE_NAMES[dtype.lower()]
    except KeyError:
        raise ConfigError(f"unknown dtype {dtype!r}: use one of fp32, bf16, fp16") from None


def default_dtype(device: torch.device) -> torch.dtype:
    """The compute dtype nabla uses on `device` when none is asked for."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return DEFAULT_DTYPE.get(device.type, torch.float32)


def dist_backend(device: torch.device) -> str:
    """NCCL only where the processes compute on CUDA; gloo everywhere else."""
    return "nccl" if device.type == "cuda" else "gloo"


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def synchronize(device: torch.device) -> None:
    """Wait for queued work on `device` (for timing)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def use_all_cores() -> None:
    """Let torch use every core this process may run on (torch may default to fewer)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    if torch.get_num_threads() < n and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(n)
