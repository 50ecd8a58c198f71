"""Data-parallel training on torch.distributed (launched by torchrun).

Every process holds the whole model and computes its share of each batch;
DDP averages the gradients. `run` calls a run's body in this process, or
in torchrun's group when there is one. `process_group` starts the group through
launch.init_process_group (the one place that starts one) for the length of
a run and takes it down after; `wrap` puts a model in DDP on this rank's
device; `barrier` and `any_process` keep the processes in step (process 0
writes a file, the others wait for it; every process stops at the same step).

Leaves out: sharded optimizers and weights (FSDP/ZeRO), groups within the
world (data x tensor parallel), how a batch is split (the training loop).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist

from nabla import device as devices
from nabla.device import ddp_device_ids
from nabla.distributed.launch import init_process_group


def run(device_name: str | None, body: Callable[[torch.device, int, int], dict]) -> dict:
    """body(device, rank, world): under torchrun (WORLD_SIZE > 1) inside the process group, else alone
    with every CPU core."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = devices.choose_device(device_name)
    if world > 1:
        with process_group(device):
            return body(device, rank, world)
    if device.type == "cpu":
        devices.use_all_cores()
    return body(device, rank, world)


@contextmanager
def process_group(device: torch.device) -> Iterator[None]:
    """torch.distributed for `device` (gloo on CPU, NCCL on CUDA) inside the block, destroyed after it."""
    started = not (dist.is_available() and dist.is_initialized())
    init_process_group(device)
    try:
        yield
    finally:
        if started and dist.is_initialized():
            dist.destroy_process_group()


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """`model` in DistributedDataParallel, which averages its gradients over the processes."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=ddp_device_ids(device))


def barrier() -> None:
    """Wait until every process gets here."""
    dist.barrier()


def any_process(flag: bool, device: torch.device) -> bool:
    """True on every process when `flag` is True on any of them."""
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
