"""LoRA adapters in PEFT's layout: `adapter_config.json` + `adapter_model.safetensors`.

PEFT names each tensor after the Hugging Face module it adapts, under the
wrapper's prefix, without the adapter's name:

    base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight   (r, in)
    base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight   (out, r)

(huggingface/peft src/peft/utils/save_and_load.py). nabla keeps Meta's names
and rotary channel order, so the module names go through nabla.checkpoint.hf's
one renamer, and so does the q/k row permutation: B's rows are the adapted
weight's rows, so lora_B of q_proj / k_proj is permuted exactly as q_proj's
weight is, while lora_A (which acts on the input) is not.

`read_adapter(dir, args)` checks the config and every tensor against the
model's shape and returns an `Adapter` (settings + tensors under Meta names);
`write_adapter` writes one that `peft.PeftModel.from_pretrained` loads onto
the same base; `apply_adapter` wraps a model's layers with it (run-time
LoRA), `merge_adapter` adds it into the weights once.

Phi-3 fuses q/k/v (qkv_proj) and gate/up (gate_up_proj): a PEFT adapter on a fused module is split into
its parts on reading, and `write_adapter` stacks nabla's parts back into the fused module PEFT names (rank
n r, block-diagonal B, rank_pattern / alpha_pattern keeping the scaling), which nabla reads back too.

Leaves out: DoRA, other per-module rank/alpha patterns, biases and
`modules_to_save` (refused with a message), adapters of other PEFT types.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from nabla.checkpoint.hf import FUSED_FAMILIES, rename_weight
from nabla.checkpoint.io import atomic_write_text
from nabla.checkpoint.safetensors import read_safetensors, write_safetensors
from nabla.errors import CheckpointError, ConfigError
from nabla.model.args import ModelArgs
from nabla.model.lora import TARGETS, LoraSettings, add_lora, load_lora_state, lora_state

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."


@dataclass
class Adapter:
    """A LoRA adapter in nabla's terms: its settings and tensors named as nabla.model.lora.lora_state names them."""

    settings: LoraSettings
    tensors: dict[str, torch.Tensor]
    path: Path | None = None


def layer_shape(args: ModelArgs, name: str) -> tuple[int, int]:
    """(out, in) of a target layer of the model `args` describes."""
    q, kv = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    return {"wq": (q, args.dim), "wk": (kv, args.dim), "wv": (kv, args.dim), "wo": (args.dim, q),
            "w1": (args.hidden_dim, args.dim), "w3": (args.hidden_dim, args.dim),
            "w2": (args.dim, args.hidden_dim)}[name]


# ------------------------------------------------------------------- reading
def read_adapter_config(path: Path) -> dict:
    """adapter_config.json of a PEFT LoRA folder, checked for what nabla supports."""
    path = Path(path)
    cfg_file = path / CONFIG_NAME
    if not path.is_dir():
        raise CheckpointError(f"adapter folder {path} not found; pass the folder holding {CONFIG_NAME} "
                              f"and {WEIGHTS_NAME} (what `nabla finetune` or PEFT's save_pretrained writes)")
    missing = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if not (path / n).is_file()]
    if missing:
        hint = " (adapter_model.bin, PEFT's old format, is not read: re-save with safetensors)" \
            if (path / "adapter_model.bin").is_file() else ""
        raise CheckpointError(f"{path} is not a PEFT adapter folder: {', '.join(missing)} missing{hint}")
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_file} is not valid JSON ({e}); re-save the adapter") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{cfg_file} must hold a JSON object")
    kind = cfg.get("peft_type", "LORA")
    if str(kind).upper() != "LORA":
        raise ConfigError(f"{cfg_file}: peft_type {kind!r} is not supported; nabla reads LoRA adapters only")
    r = cfg.get("r")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ConfigError(f"{cfg_file}: rank r={r!r}; a LoRA adapter needs a rank of 1 or more")
    refused = {"use_dora": cfg.get("use_dora"), "fan_in_fan_out": cfg.get("fan_in_fan_out"),
               "modules_to_save": cfg.get("modules_to_save")}
    refused.update(_odd_patterns(cfg))
    refused = {k: v for k, v in refused.items() if v}
    if cfg.get("bias", "none") != "none":
        refused["bias"] = cfg["bias"]
    if refused:
        raise ConfigError(f"{cfg_file} uses PEFT features nabla does not apply: {refused}; "
                          "merge the adapter with peft (merge_and_unload) and load the merged model instead")
    return cfg


def _fused_parts() -> dict[str, list[str]]:
    """{'qkv_proj': ['self_attn.q_proj', ...], 'gate_up_proj': [...]}: each fused module's parts, in row order."""
    from nabla.checkpoint.hf import FUSED

    return {fused.split(".")[-2]: [p[:-len(".weight")] for p in split] for fused, split in FUSED.items()}


def _fused_alpha(alpha: float, r: int, n: int, rslora: bool) -> float:
    """lora_alpha of a fused module stacking `n` rank-`r` parts (rank n r) that keeps each part's scaling."""
    return alpha * (math.sqrt(n) if rslora else n)


def _odd_patterns(cfg: dict) -> dict:
    """rank_pattern / alpha_pattern entries nabla cannot apply: all but the stacked fused modules it writes.

    A fused module (Phi-3's qkv_proj, gate_up_proj) stacking n rank-r parts has rank n r and the lora_alpha
    that keeps scaling; `_unfuse` checks its B is block-diagonal.
    """
    ranks, alphas = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    if not isinstance(ranks, dict) or not isinstance(alphas, dict):
        return {"rank_pattern": ranks, "alpha_pattern": alphas}
    parts, r = _fused_parts(), cfg.get("r")
    alpha, rslora = float(cfg.get("lora_alpha", 8)), bool(cfg.get("use_rslora", False))
    odd = {}
    for key in set(ranks) | set(alphas):
        n = len(parts.get(key, ()))
        if not n or ranks.get(key) != n * r or key not in alphas or \
                not math.isclose(float(alphas[key]), _fused_alpha(alpha, r, n, rslora), rel_tol=1e-6):
            odd[f"rank_pattern/alpha_pattern[{key!r}]"] = (ranks.get(key), alphas.get(key))
    return odd


def read_adapter(path: str | Path, args: ModelArgs) -> Adapter:
    """The PEFT LoRA adapter in `path`, checked against the model `args` describes."""
    path = Path(path)
    cfg = read_adapter_config(path)
    try:
        raw = read_safetensors(path / WEIGHTS_NAME)
    except Exception as e:  # noqa: BLE001 - a damaged file fails in many ways: say which file
        raise CheckpointError(f"cannot read {path / WEIGHTS_NAME} ({str(e).splitlines()[0]}); "
                              "re-save the adapter") from None
    tensors: dict[str, torch.Tensor] = {}
    targets, layers = set(), set()
    for key, t in _unfuse(raw, args, cfg["r"], path, stacked=set(cfg.get("rank_pattern") or {})):
        hf_module, ab = _split_key(key, path)
        try:
            meta_weight, reorder = rename_weight(hf_module + ".weight", args, to="meta")
        except CheckpointError:
            meta_weight, reorder = None, None
        kind = meta_weight.split(".")[-2] if meta_weight else None
        if kind not in TARGETS:
            raise ConfigError(f"{path}: the adapter adapts {hf_module!r}, which nabla does not adapt; nabla "
                              "applies LoRA to q/k/v/o_proj and gate/up/down_proj only")
        layer = int(meta_weight.split(".")[1])
        if layer >= args.n_layers:
            raise ConfigError(f"{path}: the adapter has weights for layer {layer}, the model has only "
                              f"{args.n_layers} layers; it was made for another base model")
        out_f, in_f = layer_shape(args, kind)
        want = (cfg["r"], in_f) if ab == "lora_A" else (out_f, cfg["r"])
        if tuple(t.shape) != want:
            raise ConfigError(f"{path}: {key} has shape {tuple(t.shape)}, this model needs {want} (rank "
                              f"{cfg['r']}); the adapter was made for another base model or rank")
        t = t.float()
        if ab == "lora_B" and reorder is not None:
            t = reorder(t)  # B's rows are q/k rows: into Meta's rotary order
        tensors[f"{meta_weight[:-len('.weight')]}.{ab}"] = t
        targets.add(kind)
        layers.add(layer)
    if not tensors:
        raise CheckpointError(f"{path / WEIGHTS_NAME} holds no LoRA tensors")
    names = {k.rsplit(".", 1)[0] for k in tensors}
    unpaired = sorted(n for n in names if f"{n}.lora_A" not in tensors or f"{n}.lora_B" not in tensors)
    if unpaired:
        raise CheckpointError(f"{path}: {unpaired[0]} has lora_A or lora_B but not both; the file is incomplete")
    settings = LoraSettings(r=cfg["r"], alpha=float(cfg.get("lora_alpha", 8)), dropout=float(cfg.get(
        "lora_dropout", 0.0) or 0.0), targets=tuple(t for t in TARGETS if t in targets),
        rslora=bool(cfg.get("use_rslora", False)),
        layers=None if len(layers) == args.n_layers else tuple(sorted(layers)))
    expected = {f"layers.{i}.{TARGETS[k][0]}.{k}" for i in sorted(layers) for k in settings.targets}
    if expected != names:
        raise ConfigError(f"{path}: the adapter adapts different modules in different layers "
                          f"(e.g. {sorted(expected ^ names)[0]}); nabla needs the same targets in each layer")
    return Adapter(settings, tensors, path)


def _unfuse(raw: dict[str, torch.Tensor], args: ModelArgs, r: int, path: Path, stacked: set[str] = frozenset()):
    """(key, tensor) of the adapter, a fused module's (Phi-3's qkv_proj, gate_up_proj) split into its parts.

    The fused update B A splits exactly: each part keeps A and takes its rows of B (q, k, v or gate, up, in
    the order the fused weight stacks them), so y_q = W_q x + s B_q (A x) as in the fused layer. A fused
    module in `stacked` (rank n r, what `write_adapter` writes) stacks the parts' adapters: part i takes
    A's i-th block of r rows and B's i-th diagonal block, and B must be zero off its diagonal blocks.
    """
    fused_parts = _fused_parts()
    parts = {f".{names[0].rsplit('.', 1)[0]}.{name}.": names for name, names in fused_parts.items()}
    meta_of = {"self_attn.q_proj": "wq", "self_attn.k_proj": "wk", "self_attn.v_proj": "wv",
               "mlp.gate_proj": "w1", "mlp.up_proj": "w3"}
    for key, t in raw.items():
        fused = next((f for f in parts if f in key), None)
        if fused is None:
            yield key, t
            continue
        if args.model_type not in ("phi3",):
            raise CheckpointError(f"{path}: the adapter adapts the fused module {fused.strip('.')!r} "
                                  f"({key}), which a {args.model_type!r} model does not have")
        names = parts[fused]
        n = len(names) if fused.strip(".").rsplit(".", 1)[-1] in stacked else 1
        if ".lora_A." in key:
            if t.dim() != 2 or t.shape[0] != n * r:
                raise ConfigError(f"{path}: {key} has shape {tuple(t.shape)}, rank {n * r} expected")
            for i, name in enumerate(names):
                part = t[i * r:(i + 1) * r] if n > 1 else t
                yield key.replace(fused, f".{name}."), part.contiguous()
            continue
        sizes = [layer_shape(args, meta_of[n_])[0] for n_ in names]
        if t.dim() != 2 or t.shape[0] != sum(sizes) or t.shape[1] != n * r:
            raise ConfigError(f"{path}: {key} has shape {tuple(t.shape)}, this model's fused "
                              f"{fused.strip('.')} needs ({sum(sizes)}, {n * r}); the adapter was made for another "
                              "base model or rank")
        for i, (name, rows) in enumerate(zip(names, torch.split(t, sizes))):
            if n > 1:
                block = rows[:, i * r:(i + 1) * r]
                if torch.cat([rows[:, :i * r], rows[:, (i + 1) * r:]], 1).any():
                    raise ConfigError(f"{path}: {key} stacks {n} rank-{r} parts but is not block-diagonal; "
                                      "nabla cannot split it: merge it with peft (merge_and_unload) instead")
                rows = block
            yield key.replace(fused, f".{name}."), rows.contiguous()


def _split_key(key: str, path: Path) -> tuple[str, str]:
    """'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight' -> ('model.layers.0...q_proj', 'lora_A')."""
    name = key[len(PREFIX):] if key.startswith(PREFIX) else key
    parts = name.split(".")
    if len(parts) >= 3 and parts[-1] == "weight" and parts[-2] not in ("lora_A", "lora_B"):
        parts = parts[:-2] + parts[-1:]  # 'lora_A.default.weight': an adapter name left in
    if len(parts) < 3 or parts[-1] != "weight" or parts[-2] not in ("lora_A", "lora_B"):
        raise ConfigError(f"{path}: tensor {key!r} is not a LoRA weight (lora_A / lora_B); nabla reads plain "
                          "LoRA adapters only (no DoRA magnitudes, embeddings or saved modules)")
    return ".".join(parts[:-2]), parts[-2]


# ------------------------------------------------------------------- writing
def write_adapter(out: str | Path, adapter: Adapter, args: ModelArgs, base_model: str | None = None) -> list[Path]:
    """Write `adapter` in PEFT's layout into `out`; returns the two files."""
    out = Path(out)
    s = adapter.settings
    tensors: dict[str, torch.Tensor] = {}
    for name in sorted(adapter.tensors, key=_layer_order):
        module, ab = name.rsplit(".", 1)
        hf_weight, reorder = rename_weight(module + ".weight", args, to="hf")
        t = adapter.tensors[name].detach().float().cpu()
        if ab == "lora_B" and reorder is not None:
            t = reorder(t)  # Meta's rotary order -> Hugging Face's
        tensors[f"{PREFIX}{hf_weight[:-len('.weight')]}.{ab}.weight"] = t.contiguous()
    targets = sorted(TARGETS[t][1] for t in s.targets)
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    if args.model_type in FUSED_FAMILIES:
        tensors, targets = _fuse(tensors, args, s.r)
        for name, parts in _fused_parts().items():
            if name in targets:
                ranks[name] = len(parts) * s.r
                alphas[name] = _fused_alpha(s.alpha, s.r, len(parts), s.rslora)
    write_safetensors(out / WEIGHTS_NAME, tensors, {k: tuple(v.shape) for k, v in tensors.items()},
                      {k: torch.float32 for k in tensors})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": s.r, "lora_alpha": s.alpha, "lora_dropout": s.dropout,
        "target_modules": targets, "bias": "none",
        "use_rslora": s.rslora, "use_dora": False, "fan_in_fan_out": False, "modules_to_save": None,
        "layers_to_transform": list(s.layers) if s.layers is not None else None,
        "init_lora_weights": True, "inference_mode": True, "rank_pattern": ranks, "alpha_pattern": alphas,
    }
    atomic_write_text(out / CONFIG_NAME, json.dumps(config, indent=2) + "\n")
    return [out / CONFIG_NAME, out / WEIGHTS_NAME]


def _fuse(tensors: dict[str, torch.Tensor], args: ModelArgs, r: int) -> tuple[dict[str, torch.Tensor], list[str]]:
    """PEFT's tensors for a family with fused modules (Phi-3): q/k/v and gate/up parts stacked into one.

    The fused module of n parts gets rank n r: A = the parts' A one after another, B = their B block-diagonal,
    so B A = the parts' B_i A_i stacked by rows, exactly; a part not adapted gets zero A and B (it stays the
    base). Its lora_alpha (alpha_pattern) keeps the parts' scaling. Returns the tensors and target_modules.
    """
    fused_parts = _fused_parts()
    meta_of = {"self_attn.q_proj": "wq", "self_attn.k_proj": "wk", "self_attn.v_proj": "wv",
               "mlp.gate_proj": "w1", "mlp.up_proj": "w3"}
    out = dict(tensors)
    prefixes = sorted({k.split("self_attn.")[0].split("mlp.")[0] for k in tensors})
    for prefix in prefixes:
        for name, parts in fused_parts.items():
            keys = [f"{prefix}{p}" for p in parts]
            if not any(f"{k}.lora_A.weight" in out for k in keys):
                continue
            in_f = next(out[f"{k}.lora_A.weight"].shape[1] for k in keys if f"{k}.lora_A.weight" in out)
            sizes = [layer_shape(args, meta_of[p])[0] for p in parts]
            a = torch.zeros(len(parts) * r, in_f)
            b = torch.zeros(sum(sizes), len(parts) * r)
            row = 0
            for i, (k, size) in enumerate(zip(keys, sizes)):
                if f"{k}.lora_A.weight" in out:
                    a[i * r:(i + 1) * r] = out.pop(f"{k}.lora_A.weight")
                    b[row:row + size, i * r:(i + 1) * r] = out.pop(f"{k}.lora_B.weight")
                row += size
            fused = f"{prefix}{parts[0].rsplit('.', 1)[0]}.{name}"
            out[f"{fused}.lora_A.weight"], out[f"{fused}.lora_B.weight"] = a, b
    modules = {k[len(PREFIX):].rsplit(".", 2)[0].rsplit(".", 1)[-1] for k in out}
    return dict(sorted(out.items(), key=lambda kv: _layer_order(kv[0][len(PREFIX):]))), sorted(modules)


def _layer_order(name: str):
    parts = name.split(".")
    return (int(parts[1]), name) if len(parts) > 1 and parts[1].isdigit() else (-1, name)


def adapter_of(model: nn.Module) -> Adapter:
    """The LoRA adapter a model holds (after nabla.model.lora.add_lora)."""
    return Adapter(model.lora, {k: v.detach().clone() for k, v in lora_state(model).items()})


# ------------------------------------------------------------------ applying
def apply_adapter(model: nn.Module, adapter: Adapter) -> nn.Module:
    """Wrap the model's target layers with the adapter (run-time LoRA, unmerged)."""
    settings = LoraSettings(adapter.settings.r, adapter.settings.alpha, 0.0, adapter.settings.targets,
                            adapter.settings.rslora, adapter.settings.layers)
    add_lora(model, settings)
    load_lora_state(model, adapter.tensors)
    return model


def merge_adapter(model: nn.Module, adapter: Adapter) -> None:
    """Add scaling * B A into the weights of a model whose layers are plain float linears."""
    scaling = adapter.settings.scaling
    with torch.no_grad():
        for name in {k.rsplit(".", 1)[0] for k in adapter.tensors}:
            lin = model.get_submodule(name)
            w = getattr(lin, "weight", None)
            if w is None or not w.is_floating_point():
                raise ConfigError(f"cannot merge the adapter into {name}: its weight is not a float tensor "
                                  "(quantized?); merge before quantizing")
            a, b = adapter.tensors[f"{name}.lora_A"], adapter.tensors[f"{name}.lora_B"]
            delta = (b.to(w.device, torch.float32) @ a.to(w.device, torch.float32)) * scaling
            w.copy_((w.float() + delta).to(w.dtype))


def merged_state(state, adapter: Adapter):
    """`state` (Meta names) with the adapter merged into its weights, each tensor made when read."""
    from nabla.checkpoint.shards import Entry, LazyState

    lazy = state if isinstance(state, LazyState) else LazyState.of(state)
    shapes, dtypes = lazy.shapes, lazy.dtypes
    scaling = adapter.settings.scaling
    modules = {k.rsplit(".", 1)[0] for k in adapter.tensors}
    missing = sorted(f"{m}.weight" for m in modules if f"{m}.weight" not in shapes)
    if missing:
        raise ConfigError(f"the adapter adapts {missing[0]}, which the checkpoint does not hold")

    def make(key: str) -> torch.Tensor:
        w = lazy[key]
        module = key[:-len(".weight")]
        if module not in modules:
            return w
        a, b = adapter.tensors[f"{module}.lora_A"], adapter.tensors[f"{module}.lora_B"]
        return (w.float() + (b.float() @ a.float()) * scaling).to(w.dtype)

    return LazyState({k: Entry(lambda k=k: make(k), tuple(shapes[k]), dtypes[k]) for k in lazy},
                     file_backed=lazy.file_backed)
