"""Running under torchrun: read its environment and start the process group.

`torchrun --nproc_per_node N` (and `--nnodes`, `--rdzv_*` for several
machines) starts N processes and tells each its RANK, LOCAL_RANK, WORLD_SIZE
and the rendezvous address. nabla reads those, never invents its own
launcher: `model_parallel_world` checks the asked-for size against the
environment (with the command to type when it does not fit) and
`init_process_group` starts torch.distributed with the backend and device
nabla.device picks (gloo on CPU, NCCL on CUDA, one device per LOCAL_RANK):
the one place that starts it, for tensor-parallel inference and for
data-parallel training (data_parallel.py) alike.

Leaves out: groups within the world (the whole world is one model, or one
data-parallel group).
"""

from __future__ import annotations

import atexit
import os

import torch
import torch.distributed as dist

from nabla import device as devices
from nabla.errors import ConfigError

LAUNCH_HINT = ("launch one process per slice with torchrun, e.g. `torchrun --nproc_per_node {n} "
               "your_script.py` or `torchrun --nproc_per_node {n} -m nabla generate --model DIR "
               "--model-parallel-size {n} ...` (add --nnodes, --node_rank and --rdzv_endpoint HOST:PORT to "
               "span machines)")


def env_world_size() -> int | None:
    """WORLD_SIZE set by torchrun (or by the caller), else None."""
    value = os.environ.get("WORLD_SIZE")
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"the environment variable WORLD_SIZE={value!r} is not an integer; "
                          "let torchrun set it") from None


def model_parallel_world(model_parallel_size: int | None) -> int:
    """How many processes share the model: checks `model_parallel_size` against torchrun's world.

    None means WORLD_SIZE under torchrun, else 1 (one process holds the model). 1 means each process
    holds the whole model, under torchrun too (data-parallel training: nabla.training.finetune).
    """
    if model_parallel_size is not None and (
            isinstance(model_parallel_size, bool) or not isinstance(model_parallel_size, int)
            or model_parallel_size < 1):
        raise ConfigError(f"model_parallel_size must be a positive integer or None, got {model_parallel_size!r}")
    if model_parallel_size == 1:
        return 1
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else env_world_size()
    if model_parallel_size is None:
        return world or 1
    if world is None or (world == 1 and model_parallel_size > 1):
        if model_parallel_size == 1:
            return 1
        raise ConfigError(
            f"model_parallel_size={model_parallel_size} splits the model across {model_parallel_size} "
            f"processes, but this one was not started by torchrun (no WORLD_SIZE): "
            + LAUNCH_HINT.format(n=model_parallel_size)
            + "; or pass model_parallel_size=None to run the whole model in one process")
    if world != model_parallel_size:
        raise ConfigError(
            f"model_parallel_size={model_parallel_size} but there are {world} processes (WORLD_SIZE); "
            f"each process holds one slice, so start exactly {model_parallel_size} (torchrun "
            f"--nnodes x --nproc_per_node = {model_parallel_size}), or pass model_parallel_size=None to "
            f"use all {world}")
    return world


def init_process_group(device: torch.device) -> None:
    """Start torch.distributed (if the caller has not) with the backend for `device`."""
    if not dist.is_available():
        raise ConfigError("this build of torch has no torch.distributed; install a standard torch wheel "
                          "to run a model across processes")
    if device.type != "cpu" and device.index is not None:
        torch.accelerator.set_device_index(device.index)  # collectives run on this rank's own device
    if dist.is_initialized():
        return
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        n = env_world_size() or 2
        raise ConfigError(f"cannot start the process group: {', '.join(missing)} not set; "
                          + LAUNCH_HINT.format(n=n))
    dist.init_process_group(backend=devices.dist_backend(device))
    atexit.register(_shutdown)


def _shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    """This process's rank (0 when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    """True on rank 0 (and in a plain, single process): the one that prints."""
    return rank() == 0
