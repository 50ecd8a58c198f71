"""Rank 0 leads, the other ranks follow: a split model driven by one process.

`nabla generate` runs the same loop on every rank. A server cannot: only
rank 0 receives requests, batches them and samples. So on rank 0 `lead(model)`
hooks the model's forward: before each call it broadcasts the call (tokens,
start_pos, rows, flags) to the other ranks, which sit in `follow(model)`
running the same forward on their slices (their collectives meet rank 0's;
the logits they get are dropped). `release()` (returned by `lead`) ends the
followers' loop. Every forward of the model must then come from one thread
of rank 0, as the server's engine thread does.

    llama = Llama.build(..., model_parallel_size=N)
    if is_main_process():
        release = lead(llama.model)
        try:
            serve(llama)            # any code that calls llama.model(...)
        finally:
            release()
    else:
        follow(llama.model)

`only_rank_0_runs(model)` does this for a command: ranks > 0 follow, then exit.

Leaves out: calls that reach into the model other than through forward.
"""

from __future__ import annotations

import atexit
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

_DTYPES = {str(d): d for d in (torch.long, torch.int32, torch.int64, torch.bool)}


def _broadcast_header(header: dict | None) -> dict:
    box = [header]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _tensor_spec(t) -> tuple | None:
    return None if t is None else (tuple(t.shape), str(t.dtype))


def lead(model: nn.Module) -> Callable[[], None]:
    """On rank 0: send every forward call of `model` to the followers. Returns `release`.

    A no-op (and a no-op `release`) when the model is not split across processes.
    """
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return lambda: None
    device = next(model.parameters()).device

    def hook(module, args, kwargs):
        tokens = args[0] if args else kwargs["tokens"]
        start = args[1] if len(args) > 1 else kwargs.get("start_pos")
        rows = kwargs.get("rows")
        header = dict(tokens=_tensor_spec(tokens), rows=_tensor_spec(rows),
                      last_only=bool(kwargs.get("last_only", False)),
                      return_hidden=bool(kwargs.get("return_hidden", False)))
        if isinstance(start, torch.Tensor):
            header["start"] = _tensor_spec(start)
        else:
            header["start_int"] = start  # an int or None
        _broadcast_header(header)
        for t in (tokens, start, rows):
            if isinstance(t, torch.Tensor):
                dist.broadcast(t.to(device).contiguous(), src=0)

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    released = False

    def release() -> None:
        nonlocal released
        if not released:
            released = True
            handle.remove()
            try:
                _broadcast_header({"stop": True})
            except RuntimeError:  # a follower already gone (torchrun stopping): nothing to release
                pass

    return release


def only_rank_0_runs(model: nn.Module) -> None:
    """For a command (chat, serve) that only rank 0 should run when the model is split.

    On ranks > 0: follow rank 0's forward calls until it is done, then exit
    the process (status 0). On rank 0: lead, releasing the followers when
    the process exits. A no-op in a single process.
    """
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    if dist.get_rank() != 0:
        follow(model)
        raise SystemExit(0)
    atexit.register(lead(model))


def follow(model: nn.Module) -> int:
    """On ranks > 0: run each forward rank 0 sends until it releases us. Returns the number of calls."""
    device = next(model.parameters()).device

    def receive(spec):
        if spec is None:
            return None
        shape, dtype = spec
        t = torch.empty(shape, dtype=_DTYPES[dtype], device=device)
        dist.broadcast(t, src=0)
        return t

    calls = 0
    with torch.inference_mode():
        while True:
            header = _broadcast_header(None)
            if header.get("stop"):
                return calls
            tokens = receive(header["tokens"])
            start = receive(header["start"]) if "start" in header else header["start_int"]
            rows = receive(header["rows"])
            try:
                model(tokens, start, rows=rows, last_only=header["last_only"],
                      return_hidden=header["return_hidden"])
            except Exception:  # rank 0 ran the same call on the same inputs, failed alike and goes on
                pass
            calls += 1


__all__ = ["follow", "lead", "only_rank_0_runs"]
