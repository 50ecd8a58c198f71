"""Make a model ready to run on a device: the one preparation `Llama.build` and `nabla bench` share.

`prepare_model` takes a Transformer built on the meta device (shapes, no
memory) and gives it storage on the device in the compute dtype, fills its
weights, swaps in the layers that compute fastest there (quantized ones, bf16
weights with fp32 products, CPU row kernels) and allocates the key/value
cache. Which dtype and which kernels suit a device is asked of nabla.device;
this module only applies the answers, in the one order that works (the
quantized layout before storage, kernels after the weights, the cache last).

Leaves out: choosing the device and the requested dtype (nabla.device),
reading checkpoints (nabla.checkpoint), splitting the model across processes
(nabla.distributed, done on the meta model before this), CUDA graphs
(nabla.model.graphs, recorded on the first decode).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from nabla import device as devices
from nabla.errors import ConfigError
from nabla.model.llama import Transformer


def check_cache_size(max_batch_size: int, max_seq_len: int) -> None:
    """Refuse cache sizes that are not positive integers (the one check of them)."""
    for name, value in (("max_seq_len", max_seq_len), ("max_batch_size", max_batch_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def materialize(model: Transformer, device: torch.device, dtype: torch.dtype,
                load_weights: Callable[[Transformer], None], quantized: dict | None = None) -> Transformer:
    """Storage for a meta-device `model` on `device` in `dtype`, filled by `load_weights(model)`; in eval mode.

    `quantized` ({"mode", "group_size"}, and "head": "int4" where the output head is 4-bit too)
    lays out quantized layers first, for weights stored quantized (a folder `nabla convert
    --quantize` wrote, a GGUF file's blocks).
    """
    model = model.to(dtype=dtype)
    if quantized is not None:
        from nabla.model.quantize import quantize_model

        quantize_model(model, quantized["mode"], group_size=quantized["group_size"], device=device,
                       head=quantized.get("head", "int8"), int8_layers=quantized.get("int8_layers", ()),
                       int4_formats=quantized.get("int4_formats"))
    model = model.to_empty(device=device)
    model.init_rope()  # to_empty left the table's memory uninitialised
    load_weights(model)
    return model.eval()


def prepare_model(
    model: Transformer,
    device: torch.device,
    dtype: torch.dtype,
    load_weights: Callable[[Transformer], None],
    *,
    max_batch_size: int,
    max_seq_len: int,
    quantize: str | None = None,
    quantized: dict | None = None,
    sharded: bool = False,
) -> Transformer:
    """`model` (on the meta device) with its weights on `device`, its kernels chosen and its cache allocated.

    `dtype` is the requested compute dtype; where the device has no bf16
    arithmetic, bf16 means bf16 weights with fp32 products
    (nabla.device.bf16_weights_only). `load_weights(model)` fills the weights
    once the model has storage, before any layer is swapped. `quantize`
    ("int8", "int4") quantizes them after loading; `quantized` says they are
    stored quantized already (see `materialize`). `sharded`: the model holds
    one process's slice (tensor parallel), whose layers keep their dtype and
    torch's kernels. The cache holds `max_batch_size` sequences of
    `max_seq_len` positions.
    """
    check_cache_size(max_batch_size, max_seq_len)
    bf16_weights = devices.bf16_weights_only(device, dtype) and quantize is None and quantized is None \
        and not sharded
    if bf16_weights:
        dtype = torch.float32  # compute in fp32; the linear weights go back to bf16 below
    model = materialize(model, device, dtype, load_weights, quantized)
    if quantize is not None:
        from nabla.model.quantize import quantize_model

        quantize_model(model, quantize)
    elif quantized is not None:
        pass  # its layers are the quantized ones already
    elif bf16_weights:
        from nabla.model.cpu_kernels import use_bf16_weights

        use_bf16_weights(model)  # half the bytes to read; products stay fp32
    elif not sharded and devices.row_kernels(device):
        from nabla.model.cpu_kernels import use_row_kernels

        use_row_kernels(model)  # decode steps read fp32 weights at the memory's speed
    model.setup_cache(max_batch_size, max_seq_len)
    return model
