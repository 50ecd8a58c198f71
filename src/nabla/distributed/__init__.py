"""Tensor-parallel inference and data-parallel training on torch.distributed (launched by torchrun).

`Llama.build(..., model_parallel_size=N)` in each of N processes started by
`torchrun --nproc_per_node N` calls `model_parallel_world` (checks the
launch) and `shard_model` (starts the process group, swaps in the parallel
layers, slices this rank's weights). See tensor_parallel.py for the split,
follow.py for programs (a server) where only rank 0 decides what to run,
data_parallel.py for training with DDP (nabla.training).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from nabla.distributed.follow import follow, lead, only_rank_0_runs
from nabla.distributed.launch import init_process_group, is_main_process, model_parallel_world, rank
from nabla.distributed.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    check_divisible,
    local_param_bytes,
    parallelize,
    rank_state,
)


def shard_model(model: nn.Module, state: Mapping[str, torch.Tensor], world_size: int, device: torch.device,
                ckpt=None) -> Mapping[str, torch.Tensor]:
    """Make a meta-device Transformer this rank's slice of a `world_size`-way split.

    Checks the shapes divide (before any process waits on another), starts
    the process group for `device` if needed, swaps the layers, and returns
    this rank's lazy slice of the weights: cut from the full `state` (Meta
    MP=1, Hugging Face), or, for a Meta checkpoint `ckpt` of several shards
    (any MP), straight from the pieces of its files.
    """
    check_divisible(model.args, world_size)
    init_process_group(device)
    r = rank()
    parallelize(model, world_size, r)
    if ckpt is not None and ckpt.format == "meta" and len(ckpt.files) > 1:
        from nabla.checkpoint.meta import load_shard  # memory-mapped: read straight from the pieces

        return rank_state([load_shard(f) for f in ckpt.files], r, world_size, dim=model.args.dim, file_backed=True)
    return rank_state([state], r, world_size)


__all__ = ["follow", "lead", "ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding", "check_divisible",
           "init_process_group", "is_main_process", "local_param_bytes", "model_parallel_world", "only_rank_0_runs",
           "parallelize", "rank", "rank_state", "shard_model"]
