"""Hugging Face Llama folders: config.json + model.safetensors (or shards, or pytorch_model*.bin).

Reads the config leniently (known keys, clear errors for what nabla cannot
run) and renames the weights between Hugging Face's and Meta's names through
one table and one function (`rename_weight`, both ways, with the rotary
permutation of the q/k projections). Writes the same format back
(`save_hf_checkpoint`) for `nabla convert --to hf`; nabla.bench.peers uses
the same renamer to hand nabla's weights to transformers.

Leaves out: the safetensors format itself (nabla.checkpoint.safetensors),
tokenizers (nabla.tokenizer.hf) and non-Llama architectures.
"""

from __future__ import annotations

import functools
import json
import pickle
import re
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from nabla.checkpoint.io import atomic_write_text
from nabla.checkpoint.safetensors import read_index, read_safetensors, write_safetensors
from nabla.checkpoint.shards import Entry, LazyState, drop_pages, entries_of, weight_kind
from nabla.errors import CheckpointError, ConfigError
from nabla.model.args import DEFAULT_CONTEXT, ModelArgs

# Hugging Face name -> Meta name; "{}" is the layer number; None means "not a weight, skip".
WEIGHT_MAP: dict[str, str | None] = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.layers.{}.self_attn.q_proj.weight": "layers.{}.attention.wq.weight",
    "model.layers.{}.self_attn.k_proj.weight": "layers.{}.attention.wk.weight",
    "model.layers.{}.self_attn.v_proj.weight": "layers.{}.attention.wv.weight",
    "model.layers.{}.self_attn.o_proj.weight": "layers.{}.attention.wo.weight",
    "model.layers.{}.self_attn.rotary_emb.inv_freq": None,
    "model.layers.{}.mlp.gate_proj.weight": "layers.{}.feed_forward.w1.weight",
    "model.layers.{}.mlp.down_proj.weight": "layers.{}.feed_forward.w2.weight",
    "model.layers.{}.mlp.up_proj.weight": "layers.{}.feed_forward.w3.weight",
    "model.layers.{}.input_layernorm.weight": "layers.{}.attention_norm.weight",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.ffn_norm.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
META_TO_HF = {v: k for k, v in WEIGHT_MAP.items() if v is not None}

DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


# --------------------------------------------------------------- the permute
# Meta's rotary embedding rotates adjacent channel pairs (0,1), (2,3), ... of
# each head. Hugging Face's `rotate_half` rotates channel i with channel
# i + head_dim/2 instead. Its conversion script therefore reorders the rows of
# wq and wk inside each head: it takes the even rows (first of each Meta pair)
# first, then the odd rows, so that HF's half-split pairs are Meta's pairs.
# Loading an HF checkpoint into Meta's layout puts each row back: view the rows
# as (heads, 2, head_dim/2) -- "which half", "which pair" -- and swap the last
# two axes, giving (heads, head_dim/2, 2). Without this the model still runs
# but rotates the wrong channels: text goes wrong after a few tokens.
def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF q_proj/k_proj rows -> Meta rows (the inverse of `permute_qk`)."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def permute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta wq/wk rows -> HF rows."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


# ---------------------------------------------------------------- the renamer
def qk_heads(meta_name: str, args: ModelArgs) -> int | None:
    """The heads whose rows the rotary permute reorders: n_heads for wq, n_kv_heads for wk, else None."""
    return {"wq": args.n_heads, "wk": args.n_kv_heads}.get(weight_kind(meta_name))


def rename_weight(key: str, args: ModelArgs,
                  to: str) -> tuple[str | None, Callable[[torch.Tensor], torch.Tensor] | None]:
    """`key` in the other naming (`to` is "meta" or "hf") through WEIGHT_MAP, and what reorders its rows.

    The name is None for Hugging Face entries that are not weights (skip them);
    the function is the q/k permute towards `to` for wq/wk, else None. A name
    missing from the table is an error: nabla runs plain Llama models.
    """
    table = WEIGHT_MAP if to == "meta" else META_TO_HF
    m = re.search(r"\.(\d+)\.", key)  # the layer number, put back after the lookup
    generic = key[:m.start()] + ".{}." + key[m.end():] if m else key
    if generic not in table:
        if to == "meta":
            raise CheckpointError(f"unexpected weight {key!r} in the Hugging Face checkpoint; nabla reads plain "
                                  "Llama models (no biases, adapters or extra heads)")
        raise CheckpointError(f"weight {key!r} has no Hugging Face name; is this a Llama checkpoint?")
    new = table[generic]
    if new is None:
        return None, None
    new = new.format(m.group(1)) if m else new
    heads = qk_heads(new if to == "meta" else key, args)
    if heads is None:
        return new, None
    return new, functools.partial(unpermute_qk if to == "meta" else permute_qk, n_heads=heads)


# ------------------------------------------------------------------- config
def check_llama(config: dict, source: str = "config.json") -> None:
    """Raise ConfigError unless the config describes a Llama model nabla can run."""
    model_type = config.get("model_type")
    archs = config.get("architectures") or []
    if model_type is not None and model_type != "llama":
        raise ConfigError(f"{source} describes a {model_type!r} model ({', '.join(archs) or 'no architectures'}); "
                          "nabla runs Llama models (model_type 'llama') only")
    not_llama = [a for a in archs if a != "LlamaForCausalLM"]
    if not_llama:
        raise ConfigError(f"{source} names the architecture {not_llama[0]!r}; nabla runs "
                          "LlamaForCausalLM checkpoints only")
    if model_type is None and not archs:
        raise ConfigError(f"{source} has neither model_type nor architectures; it does not look like "
                          "a Hugging Face Llama config")
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"{source}: hidden_act {act!r} is not supported; Llama uses 'silu'")
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key):
            raise ConfigError(f"{source}: {key}=true is not supported; Llama has no biases")


def _rope(config: dict) -> tuple[float, dict | None]:
    """rope_theta and Llama 3 scaling, from transformers 4 (`rope_theta`, `rope_scaling`)
    or 5 (`rope_parameters`, which also holds rope_theta) style configs."""
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or None
    theta = config.get("rope_theta", params.get("rope_theta", 10000.0))
    if scaling is None and params:
        scaling = params
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind == "default":
            scaling = None
        elif kind != "llama3":
            raise ConfigError(f"rope scaling of type {kind!r} is not supported; nabla implements "
                              "Llama 3's ('llama3') only")
        else:
            scaling = {k: v for k, v in scaling.items() if k in (
                "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
    return float(theta), scaling


def config_to_args(config: dict, source: str = "config.json") -> ModelArgs:
    """ModelArgs of a Hugging Face Llama config.json."""
    check_llama(config, source)
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
               if k not in config]
    if missing:
        raise ConfigError(f"{source} lacks {', '.join(missing)}; it is not a complete Llama config")
    theta, scaling = _rope(config)
    kw = dict(
        dim=config["hidden_size"], n_layers=config["num_hidden_layers"],
        n_heads=config["num_attention_heads"], n_kv_heads=config.get("num_key_value_heads"),
        vocab_size=config["vocab_size"], norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope_theta=theta, rope_scaling=scaling, head_dim=config.get("head_dim"),
        hidden_dim=config.get("intermediate_size"),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
    )
    try:
        return ModelArgs(**kw)
    except TypeError as e:
        raise ConfigError(f"{source}: invalid model settings: {e}") from None


def args_to_config(args: ModelArgs, *, dtype: torch.dtype | None = None, bos_id: int | None = None,
                   eos_ids: list[int] | None = None, context_length: int | None = None) -> dict:
    """A config.json that transformers (4 and 5) and nabla read back into the same model."""
    ctx = context_length or DEFAULT_CONTEXT
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": args.dim, "intermediate_size": args.hidden_dim,
        "num_hidden_layers": args.n_layers, "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads, "head_dim": args.head_dim,
        "vocab_size": args.vocab_size, "rms_norm_eps": args.norm_eps, "rope_theta": args.rope_theta,
        "rope_scaling": None, "max_position_embeddings": ctx,
        "tie_word_embeddings": args.tie_word_embeddings, "hidden_act": "silu",
        "attention_bias": False, "mlp_bias": False,
    }
    if args.rope_scaling:
        config["rope_scaling"] = {"rope_type": "llama3", **args.rope_scaling}
        config["max_position_embeddings"] = max(ctx, int(args.rope_scaling["original_max_position_embeddings"]))
    if bos_id is not None:
        config["bos_token_id"] = bos_id
    if eos_ids:
        config["eos_token_id"] = eos_ids[0] if len(eos_ids) == 1 else eos_ids
    if dtype in DTYPE_NAMES:
        config["torch_dtype"] = config["dtype"] = DTYPE_NAMES[dtype]
    return config


# -------------------------------------------------------------- weight files
def weight_files(path: Path) -> list[Path]:
    """The weight files of an HF folder, in order; [] if there are none."""
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = path / index_name
        if index.is_file():
            names = read_index(index)
            missing = [n for n in names if not (path / n).is_file()]
            if missing:
                raise CheckpointError(f"{index} names weight files that are not in {path}: "
                                      f"{', '.join(missing[:3])}; download the missing shards")
            return [path / n for n in names]
        if (path / single).is_file():
            return [path / single]
    found = sorted(path.glob("model-*.safetensors")) or sorted(path.glob("pytorch_model-*.bin"))
    return found


def read_bin(path: Path) -> tuple[dict[str, torch.Tensor], bool]:
    """A pytorch_model*.bin state dict (weights_only=True) and whether it is memory-mapped."""
    errors = (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, OSError)
    mapped = True
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except errors:
        mapped = False
        try:  # the legacy (non-zip) format cannot be memory-mapped
            state = torch.load(path, map_location="cpu", weights_only=True)
        except errors as e:
            raise CheckpointError(f"cannot read {path}: {str(e).splitlines()[0]}. The file may be "
                                  "truncated or not a PyTorch checkpoint; re-download it") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} does not hold a state dict (got {type(state).__name__})")
    return state, mapped


def read_weight_file(path: Path) -> dict[str, Entry]:
    """Entries of one weight file; only memory-mapped tensors are listed as droppable sources."""
    if path.suffix == ".safetensors":
        return entries_of(read_safetensors(path))
    state, mapped = read_bin(path)
    entries = entries_of(state)
    if not mapped:  # ordinary memory: never madvise it
        for e in entries.values():
            e.sources = []
    return entries


def load_hf_state(path: Path, args: ModelArgs, files: list[Path] | None = None) -> LazyState:
    """The weights of an HF Llama folder as a lazy state dict in Meta's naming."""
    files = files if files is not None else weight_files(path)
    if not files:
        raise CheckpointError(f"{path} has config.json but no weights: expected model.safetensors, "
                              "model.safetensors.index.json or pytorch_model.bin")
    entries: dict[str, Entry] = {}
    seen: dict[str, Path] = {}
    for file in files:
        for hf_name, e in read_weight_file(file).items():
            name, unpermute = rename_weight(hf_name, args, to="meta")
            if name is None:
                continue
            if name in seen:
                raise CheckpointError(f"{hf_name} is in both {seen[name].name} and {file.name}")
            seen[name] = file
            if unpermute is not None:
                heads = qk_heads(name, args)
                if len(e.shape) != 2 or e.shape[0] != heads * args.head_dim:
                    raise CheckpointError(
                        f"{file.name}: {hf_name} has shape {tuple(e.shape)}, config.json implies "
                        f"({heads * args.head_dim}, {args.dim}); the config does not fit the weights")

                def make(make=e.make, unpermute=unpermute, sources=e.sources):
                    w = unpermute(make())  # a copy: the file's pages can go now
                    for t in sources:
                        drop_pages(t)
                    return w

                e = Entry(make, e.shape, e.dtype, e.sources)
            entries[name] = e
    if args.tie_word_embeddings:
        entries.pop("output.weight", None)  # some exports also store the tied copy
    return LazyState(entries, file_backed=True)


def state_dtype(state: Mapping) -> torch.dtype | None:
    """The dtype most weights are stored in (the embedding's when it exists)."""
    dtypes = state.dtypes if isinstance(state, LazyState) else {k: v.dtype for k, v in state.items()}
    if "tok_embeddings.weight" in dtypes:
        return dtypes["tok_embeddings.weight"]
    floats = [d for d in dtypes.values() if d.is_floating_point]
    return max(set(floats), key=floats.count) if floats else None


# ------------------------------------------------------------------- writing
def save_hf_checkpoint(out: Path, state: Mapping[str, torch.Tensor], args: ModelArgs, *,
                       dtype: torch.dtype | None = None, bos_id: int | None = None,
                       eos_ids: list[int] | None = None, context_length: int | None = None) -> list[Path]:
    """Write config.json + model.safetensors from a Meta-named state dict (q/k permuted back)."""
    ents = entries_of(state)
    tensors, shapes, dtypes = {}, {}, {}
    for name, e in ents.items():
        if name == "rope.freqs" or (args.tie_word_embeddings and name == "output.weight"):
            continue
        hf, permute = rename_weight(name, args, to="hf")
        make = e.make
        if permute is not None:
            def make(make=e.make, permute=permute):
                return permute(make())
        tensors[hf], shapes[hf] = make, e.shape
        dtypes[hf] = dtype if (dtype is not None and e.dtype.is_floating_point) else e.dtype
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(out / "model.safetensors", tensors, shapes, dtypes)
    main = dtype or state_dtype(state)
    config = args_to_config(args, dtype=main, bos_id=bos_id, eos_ids=eos_ids, context_length=context_length)
    atomic_write_text(out / "config.json", json.dumps(config, indent=2) + "\n")
    return [out / "model.safetensors", out / "config.json"]
