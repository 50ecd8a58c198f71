"""Several LoRA adapters on one base model at once, each row of a batch with its own adapter or none.

`add_adapters(model, adapters)` wraps every layer that some adapter targets
in a `MultiLoRALinear`, which holds each adapter's A and B for that layer
(float32, as `LoRALinear` keeps them) next to the untouched base layer. Which
rows of the next forward passes use which adapter is set for the whole model
at once:

    with use_adapters(model, [0, None, 1]):   # row 0: adapter 0, row 1: base, row 2: adapter 1
        logits = model(tokens, start_pos, rows=slots)

Each layer computes the base product once for the whole batch, then, for each
adapter present in the batch, adds scaling * B (A x) to that adapter's rows
only: rows are grouped by adapter (S-LoRA / punica's batched LoRA, in plain
torch: one pair of small products per adapter in the batch, not one per row).
The adapter's products are the ones `LoRALinear` computes, in the same order
and dtype, so a row gives what that adapter alone gives. Rows with None add
nothing; the base weights are never merged.

Leaves out: reading adapter files (nabla.checkpoint.peft; an adapter here is
anything with `settings` (r, scaling) and `tensors` under `lora_state`'s
names), choosing each row's adapter (nabla.server.batching), training and
dropout, fused gather-matmul kernels, adding or removing adapters while serving.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from nabla.errors import ConfigError


class AdapterRows:
    """Which batch rows the model's next passes give to which adapter: [(adapter, rows)], shared by every layer.

    `rows` is a (n,) index tensor, or None for every row of the batch; an empty list means the base alone.
    """

    def __init__(self):
        self.groups: list[tuple[int, torch.Tensor | None]] = []


class MultiLoRALinear(nn.Module):
    """A frozen linear layer plus the low-rank updates of several adapters, applied per batch row."""

    def __init__(self, base: nn.Module, rows: AdapterRows):
        super().__init__()
        self.base = base
        self.rows = rows
        self.in_features, self.out_features = base.in_features, base.out_features
        self.scaling: dict[int, float] = {}

    def add(self, index: int, a: torch.Tensor, b: torch.Tensor, scaling: float) -> None:
        """Hold adapter `index`'s A (r, in) and B (out, r) for this layer."""
        if a.shape[1] != self.in_features or b.shape[0] != self.out_features or a.shape[0] != b.shape[1]:
            raise ConfigError(f"adapter {index}: A {tuple(a.shape)} and B {tuple(b.shape)} do not fit a layer of "
                              f"{self.in_features} inputs and {self.out_features} outputs")
        device = _device_of(self.base)
        self.register_buffer(f"lora_A_{index}", a.detach().to(device, torch.float32).contiguous(), persistent=False)
        self.register_buffer(f"lora_B_{index}", b.detach().to(device, torch.float32).contiguous(), persistent=False)
        self.scaling[index] = float(scaling)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        for index, rows in self.rows.groups:
            scaling = self.scaling.get(index)
            if scaling is None:  # this adapter leaves this layer alone
                continue
            a, b = getattr(self, f"lora_A_{index}"), getattr(self, f"lora_B_{index}")
            xs = x if rows is None else x.index_select(0, rows)
            u = (F.linear(F.linear(xs.to(a.dtype), a), b) * scaling).to(y.dtype)
            y = y + u if rows is None else y.index_add(0, rows, u)
        return y

    def extra_repr(self) -> str:
        return f"adapters={sorted(self.scaling)}"


def _device_of(layer: nn.Module) -> torch.device:
    t = next(iter(layer.parameters()), None)
    if t is None:
        t = next(iter(layer.buffers()), None)
    return t.device if t is not None else torch.device("cpu")


def add_adapters(model: nn.Module, adapters: list) -> nn.Module:
    """Wrap the layers the adapters target in MultiLoRALinear, in place; adapter i is index i. Returns the model."""
    if getattr(model, "adapter_rows", None) is not None:
        raise ConfigError("the model already holds a set of adapters; add them all in one call")
    rows = AdapterRows()
    for index, adapter in enumerate(adapters):
        modules = sorted({k.rsplit(".", 1)[0] for k in adapter.tensors})
        for name in modules:
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            layer = getattr(parent, attr, None)
            if layer is None:
                raise ConfigError(f"adapter {index} adapts {name}, which the model does not have")
            if not isinstance(layer, MultiLoRALinear):
                layer = MultiLoRALinear(layer, rows)
                setattr(parent, attr, layer)
            layer.add(index, adapter.tensors[f"{name}.lora_A"], adapter.tensors[f"{name}.lora_B"],
                      adapter.settings.scaling)
    model.adapter_rows = rows
    model.adapter_count = len(adapters)
    return model


def row_groups(per_row: list[int | None], device) -> list[tuple[int, torch.Tensor | None]]:
    """[(adapter, rows)] for a batch whose row i uses adapter per_row[i] (None: the base alone)."""
    used = [k for k in dict.fromkeys(per_row) if k is not None]
    if len(used) == 1 and all(k == used[0] for k in per_row):
        return [(used[0], None)]  # the whole batch on one adapter: no gather
    return [(k, torch.tensor([i for i, r in enumerate(per_row) if r == k], dtype=torch.long, device=device))
            for k in used]


@contextmanager
def use_adapters(model: nn.Module, per_row: list[int | None]):
    """Run the block's passes with row i on adapter per_row[i] (None: the base alone)."""
    rows: AdapterRows | None = getattr(model, "adapter_rows", None)
    if rows is None:
        if any(k is not None for k in per_row):
            raise ConfigError("this model holds no adapters (nabla.model.multi_lora.add_adapters)")
        yield
        return
    count = model.adapter_count
    bad = [k for k in per_row if k is not None and not 0 <= k < count]
    if bad:
        raise ConfigError(f"adapter index {bad[0]} is out of range: the model holds {count} adapters")
    rows.groups = row_groups(per_row, _device_of(model))
    try:
        yield
    finally:
        rows.groups = []
