"""LoRA: low-rank adapters on the attention and feed-forward projections, the base frozen.

`add_lora(model, LoraSettings(...))` wraps each targeted linear layer
(`wq`, `wk`, `wv`, `wo`, `w1`, `w2`, `w3` under Meta's names) in a
`LoRALinear` that computes

    y = base(x) + scaling * B (A dropout(x)),    scaling = alpha / r

as PEFT does (alpha / sqrt(r) with `rslora`): A (r, in) starts Kaiming-uniform,
B (out, r) at zero, so a fresh adapter changes nothing. The base layer may be
an `nn.Linear` in fp32 or bf16 (or one of nabla's CPU kernel linears) or an
int8 / int4 layer from nabla.model.quantize, which stays quantized while A and
B train in fp32 (QLoRA's idea): with gradients on, a quantized base is
dequantized per call so that the input's gradient flows through it.

`merge` adds scaling * B A into a float base's weight (and `unmerge` takes it
out again); `merge_and_unload` puts the plain base layers back, merged, for
saving or fast inference. `lora_state` / `load_lora_state` read and write the
adapter tensors under Meta names (`layers.0.attention.wq.lora_A`).

Leaves out: files (nabla.checkpoint.peft), training (nabla.training.finetune),
adapters on the embedding or the output head, DoRA, several adapters per layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from nabla.errors import ConfigError

# Meta name -> (module path inside a block, PEFT / Hugging Face name)
TARGETS = {
    "wq": ("attention", "q_proj"), "wk": ("attention", "k_proj"), "wv": ("attention", "v_proj"),
    "wo": ("attention", "o_proj"), "w1": ("feed_forward", "gate_proj"),
    "w2": ("feed_forward", "down_proj"), "w3": ("feed_forward", "up_proj"),
}
HF_TO_META = {hf: meta for meta, (_, hf) in TARGETS.items()}


def meta_target(name: str) -> str:
    """'q_proj' or 'wq' -> 'wq'; a ConfigError for anything else."""
    if name in TARGETS:
        return name
    if name in HF_TO_META:
        return HF_TO_META[name]
    known = ", ".join(f"{m}/{hf}" for m, (_, hf) in TARGETS.items())
    raise ConfigError(f"LoRA target {name!r} is not a projection nabla adapts; use some of {known} "
                      "(the embedding and the output head are not adapted)")


@dataclass
class LoraSettings:
    r: int = 8
    """Rank of the adapter matrices."""
    alpha: float = 16.0
    """Scale numerator: the update is (alpha / r) B A."""
    dropout: float = 0.0
    """Dropout on the adapter's input during training."""
    targets: tuple[str, ...] = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
    """Layers to adapt, Meta names (wq...) or PEFT ones (q_proj...)."""
    rslora: bool = False
    """Scale by alpha / sqrt(r) (rank-stabilised LoRA) instead of alpha / r."""
    layers: tuple[int, ...] | None = field(default=None)
    """Blocks to adapt (None: all)."""

    def __post_init__(self):
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ConfigError(f"LoRA rank must be a positive integer, got {self.r!r}; pass --rank 8 (or 4, 16...)")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise ConfigError("no LoRA targets: name at least one of wq, wk, wv, wo, w1, w2, w3")
        self.targets = tuple(dict.fromkeys(meta_target(t) for t in self.targets))

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)


def is_quantized(layer: nn.Module) -> bool:
    return hasattr(layer, "dequantize")


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update (see the module docstring)."""

    def __init__(self, base: nn.Module, r: int, scaling: float, dropout: float = 0.0):
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        dev = next(iter(base.buffers()), None) if is_quantized(base) else base.weight
        device = dev.device if dev is not None else None
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=device, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as PEFT's (and nn.Linear's) default
        self.r, self.scaling = r, scaling
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def delta(self) -> torch.Tensor:
        """scaling * B A, the update of the base weight, (out, in) float32."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if is_quantized(self.base) and torch.is_grad_enabled():
            # The fast quantized kernels have no backward; a dequantized product does.
            y = F.linear(x, self.base.dequantize().to(x.dtype))
        else:
            y = self.base(x)
        if self.merged:
            return y
        a = self.lora_A
        u = F.linear(F.linear(self.dropout(x).to(a.dtype), a), self.lora_B)
        return y + (u * self.scaling).to(y.dtype)

    def merge(self) -> None:
        """Add the update into the base weight (float bases only)."""
        if self.merged:
            return
        self._add(1.0)
        self.merged = True

    def unmerge(self) -> None:
        """Take a merged update out of the base weight again."""
        if not self.merged:
            return
        self._add(-1.0)
        self.merged = False

    def _add(self, sign: float) -> None:
        if is_quantized(self.base):
            raise ConfigError("cannot merge a LoRA adapter into an int8/int4 layer without losing precision; "
                              "merge into the unquantized model (then quantize), or apply the adapter unmerged")
        w = self.base.weight
        with torch.no_grad():
            w.copy_((w.float() + sign * self.delta().to(w.device)).to(w.dtype))

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}, merged={self.merged}"


class QuantizedPassThrough(nn.Module):
    """A frozen int8/int4 layer the gradient must cross (the output head, untargeted projections): the fast
    kernels have no backward, so with gradients on it computes with the dequantized weight."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return F.linear(x, self.base.dequantize().to(x.dtype))
        return self.base(x)


def target_layers(model: nn.Module, settings: LoraSettings):
    """(block index, Meta name, parent module) of each layer the settings adapt."""
    for i, block in enumerate(model.layers):
        if settings.layers is not None and i not in settings.layers:
            continue
        for name in settings.targets:
            yield i, name, getattr(block, TARGETS[name][0])


def add_lora(model: nn.Module, settings: LoraSettings) -> nn.Module:
    """Freeze every weight of `model` and wrap the target layers in LoRALinear, in place; returns the model."""
    for p in model.parameters():
        p.requires_grad_(False)
    for _, name, parent in target_layers(model, settings):
        layer = getattr(parent, name)
        if isinstance(layer, LoRALinear):
            raise ConfigError("the model already holds a LoRA adapter; merge it (merge_and_unload) first")
        setattr(parent, name, LoRALinear(layer, settings.r, settings.scaling, settings.dropout))
    # Gradients reach the adapters through every later layer, the head included.
    for name, m in list(model.named_modules()):
        if is_quantized(m) and not name.endswith(".base"):
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, QuantizedPassThrough(m))
    model.lora = settings
    return model


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """'layers.0.attention.wq' -> its LoRALinear."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in lora_layers(model).values() for p in (m.lora_A, m.lora_B)]


def lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors under Meta names: 'layers.0.attention.wq.lora_A' (r, in), '...lora_B' (out, r)."""
    out = {}
    for name, m in lora_layers(model).items():
        out[f"{name}.lora_A"] = m.lora_A.detach()
        out[f"{name}.lora_B"] = m.lora_B.detach()
    return out


def load_lora_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy adapter tensors (as `lora_state` names them) into the model's LoRA layers; shapes must fit."""
    layers = lora_layers(model)
    want = {f"{n}.{ab}" for n in layers for ab in ("lora_A", "lora_B")}
    missing, extra = sorted(want - set(state)), sorted(set(state) - want)
    if missing or extra:
        raise ConfigError(f"the adapter does not fit the model's LoRA layers: missing {missing[:3]}, "
                          f"unexpected {extra[:3]}")
    with torch.no_grad():
        for name, m in layers.items():
            for ab in ("lora_A", "lora_B"):
                p, t = getattr(m, ab), state[f"{name}.{ab}"]
                if tuple(p.shape) != tuple(t.shape):
                    raise ConfigError(f"adapter tensor {name}.{ab} has shape {tuple(t.shape)}, the model's layer "
                                      f"needs {tuple(p.shape)}; was the adapter made for another base model?")
                p.copy_(t)


def merge_lora(model: nn.Module) -> None:
    for m in lora_layers(model).values():
        m.merge()


def unmerge_lora(model: nn.Module) -> None:
    for m in lora_layers(model).values():
        m.unmerge()


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge every adapter into its base weight and put the base layers back in place; returns the model."""
    for name, m in list(lora_layers(model).items()):
        m.merge()
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, m.base)
    for name, m in list(model.named_modules()):
        if isinstance(m, QuantizedPassThrough):
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, m.base)
    if hasattr(model, "lora"):
        del model.lora
    return model
