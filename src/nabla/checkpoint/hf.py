"""Hugging Face folders: config.json + model.safetensors (or shards, or pytorch_model*.bin).

Reads the config leniently (nabla.checkpoint.families: known keys, clear
errors for what nabla cannot run) and renames the weights between Hugging
Face's and Meta's names through one table and one function (`rename_weight`,
both ways, with the rotary permutation of the q/k projections, their biases
and norms). Phi-3's fused qkv_proj and gate_up_proj are split at load and
joined again on export. Writes the same format back
(`save_hf_checkpoint`) for `nabla convert --to hf`; nabla.bench.peers uses
the same renamer to hand nabla's weights to transformers.

Leaves out: the safetensors format itself (nabla.checkpoint.safetensors),
tokenizers (nabla.tokenizer.hf).
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
# Present only where a switch of ModelArgs asks for them.
BIAS_MAP = {f"model.layers.{{}}.self_attn.{x}_proj.bias": f"layers.{{}}.attention.w{x}.bias" for x in "qkv"}
QK_NORM_MAP = {"model.layers.{}.self_attn.q_norm.weight": "layers.{}.attention.q_norm.weight",
               "model.layers.{}.self_attn.k_norm.weight": "layers.{}.attention.k_norm.weight"}
# Gemma 2 names its four norms differently: post_attention_layernorm normalises the attention's output.
POST_NORM_MAP = {
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.post_attention_norm.weight",
    "model.layers.{}.pre_feedforward_layernorm.weight": "layers.{}.ffn_norm.weight",
    "model.layers.{}.post_feedforward_layernorm.weight": "layers.{}.post_ffn_norm.weight",
}
META_TO_HF = {v: k for k, v in WEIGHT_MAP.items() if v is not None}
# Phi-3 stores q, k, v as one matrix (rows in that order) and gate, up as another.
FUSED = {"self_attn.qkv_proj.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                       "self_attn.v_proj.weight"),
         "mlp.gate_up_proj.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight")}
FUSED_FAMILIES = ("phi3",)


@functools.lru_cache(maxsize=64)
def _weight_map(qkv_bias: bool, qk_norm: bool, post_norms: bool) -> dict[str, str | None]:
    table = dict(WEIGHT_MAP)
    if qkv_bias:
        table.update(BIAS_MAP)
    if qk_norm:
        table.update(QK_NORM_MAP)
    if post_norms:
        table.update(POST_NORM_MAP)
    return table


def weight_map(args: ModelArgs) -> dict[str, str | None]:
    """Hugging Face name -> Meta name for a model of these args (WEIGHT_MAP with the family's extras)."""
    return _weight_map(args.qkv_bias, args.qk_norm, args.post_norms)


def fused_parts(hf_name: str, args: ModelArgs) -> list[tuple[str, int, int]] | None:
    """For a fused Phi-3 weight: [(the unfused HF name, first row, rows)], else None."""
    if args.model_type not in FUSED_FAMILIES:
        return None
    for fused, names in FUSED.items():
        if hf_name.endswith(fused):
            prefix = hf_name[: -len(fused)]
            hd = args.head_dim
            rows = [args.n_heads * hd, args.n_kv_heads * hd, args.n_kv_heads * hd] if len(names) == 3 \
                else [args.hidden_dim, args.hidden_dim]
            starts = [sum(rows[:i]) for i in range(len(rows))]
            return [(prefix + n, a, r) for n, a, r in zip(names, starts, rows)]
    return None

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
# Biases of q and k, and Qwen3's per-head q/k norm weights (one head of rows), follow their rows.
def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF q_proj/k_proj rows (or bias/norm entries) -> Meta rows (the inverse of `permute_qk`)."""
    rows = w.shape[0]
    return w.view(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def permute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta wq/wk rows (or bias/norm entries) -> HF rows."""
    rows = w.shape[0]
    return w.view(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


# ---------------------------------------------------------------- the renamer
def qk_heads(meta_name: str, args: ModelArgs) -> int | None:
    """The heads whose rows the rotary permute reorders: n_heads for wq, n_kv_heads for wk, one head for
    the q/k norms, else None."""
    return {"wq": args.n_heads, "wk": args.n_kv_heads, "q_norm": 1, "k_norm": 1}.get(weight_kind(meta_name))


def rename_weight(key: str, args: ModelArgs,
                  to: str) -> tuple[str | None, Callable[[torch.Tensor], torch.Tensor] | None]:
    """`key` in the other naming (`to` is "meta" or "hf") through WEIGHT_MAP, and what reorders its rows.

    The name is None for Hugging Face entries that are not weights (skip them);
    the function is the q/k permute towards `to` for wq/wk, else None. A name
    missing from the table is an error: nabla runs plain Llama models.
    """
    table = weight_map(args)
    if to != "meta":
        table = {v: k for k, v in table.items() if v is not None}
    m = re.search(r"\.(\d+)\.", key)  # the layer number, put back after the lookup
    generic = key[:m.start()] + ".{}." + key[m.end():] if m else key
    if generic not in table:
        if to == "meta":
            raise CheckpointError(f"unexpected weight {key!r} in the Hugging Face checkpoint of a "
                                  f"{args.model_type!r} model; nabla reads its weights only (no other biases, "
                                  "adapters or extra heads)")
        raise CheckpointError(f"weight {key!r} has no Hugging Face name in a {args.model_type!r} model")
    new = table[generic]
    if new is None:
        return None, None
    new = new.format(m.group(1)) if m else new
    heads = qk_heads(new if to == "meta" else key, args)
    if heads is None:
        return new, None
    return new, functools.partial(unpermute_qk if to == "meta" else permute_qk, n_heads=heads)


# ------------------------------------------------------------------- config
def config_to_args(config: dict, source: str = "config.json") -> ModelArgs:
    """ModelArgs of a Hugging Face config.json (any family nabla runs; see nabla.checkpoint.families)."""
    from nabla.checkpoint.families import config_to_args as family_args

    return family_args(config, source)


def args_to_config(args: ModelArgs, *, dtype: torch.dtype | None = None, bos_id: int | None = None,
                   eos_ids: list[int] | None = None, context_length: int | None = None) -> dict:
    """A config.json that transformers (4 and 5) and nabla read back into the same Llama model."""
    if not args.is_llama:
        raise ConfigError(f"nabla writes config.json for Llama models only; this {args.model_type!r} model keeps "
                          "the config.json it was read from (convert it from its Hugging Face folder)")
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
        config["rope_scaling"] = {"rope_type": "llama3", **args.rope_scaling}  # other kinds: is_llama refused
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


def _unfused(entries: dict[str, Entry], args: ModelArgs):
    """(HF name, entry) pairs with Phi-3's fused matrices cut into the separate ones (lazy row slices)."""
    for hf_name, e in entries.items():
        parts = fused_parts(hf_name, args)
        if parts is None:
            yield hf_name, e
            continue
        total = sum(r for _, _, r in parts)
        if len(e.shape) != 2 or e.shape[0] != total:
            raise CheckpointError(f"{hf_name} has shape {tuple(e.shape)}, config.json implies ({total}, "
                                  f"{args.dim}); the config does not fit the weights")
        for name, start, rows in parts:
            yield name, Entry(lambda make=e.make, a=start, r=rows: make().narrow(0, a, r).clone(),
                              (rows, *e.shape[1:]), e.dtype, e.sources)


def load_hf_state(path: Path, args: ModelArgs, files: list[Path] | None = None) -> LazyState:
    """The weights of an HF Llama folder as a lazy state dict in Meta's naming."""
    files = files if files is not None else weight_files(path)
    if not files:
        raise CheckpointError(f"{path} has config.json but no weights: expected model.safetensors, "
                              "model.safetensors.index.json or pytorch_model.bin")
    entries: dict[str, Entry] = {}
    seen: dict[str, Path] = {}
    for file in files:
        for hf_name, e in _unfused(read_weight_file(file), args):
            name, unpermute = rename_weight(hf_name, args, to="meta")
            if name is None:
                continue
            if name in seen:
                raise CheckpointError(f"{hf_name} is in both {seen[name].name} and {file.name}")
            seen[name] = file
            if unpermute is not None:
                heads = qk_heads(name, args)
                rows = heads * args.head_dim
                want = (rows, args.dim) if hf_name.endswith("proj.weight") else (rows,)
                if tuple(e.shape) != want:
                    raise CheckpointError(
                        f"{file.name}: {hf_name} has shape {tuple(e.shape)}, config.json implies "
                        f"{want}; the config does not fit the weights")

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
def _fuse(tensors: dict, shapes: dict, dtypes: dict, args: ModelArgs) -> None:
    """Join q/k/v and gate/up back into Phi-3's fused matrices (in place, lazily)."""
    for i in range(args.n_layers):
        prefix = f"model.layers.{i}."
        for fused, names in FUSED.items():
            names = [prefix + n for n in names]
            makes = [tensors.pop(n) for n in names]
            rows = sum(shapes[n][0] for n in names)
            tensors[prefix + fused] = lambda makes=makes: torch.cat([m() for m in makes])
            shapes[prefix + fused] = (rows, *shapes[names[0]][1:])
            dtypes[prefix + fused] = dtypes[names[0]]
            for n in names:
                del shapes[n], dtypes[n]


def save_hf_checkpoint(out: Path, state: Mapping[str, torch.Tensor], args: ModelArgs, *,
                       dtype: torch.dtype | None = None, bos_id: int | None = None,
                       eos_ids: list[int] | None = None, context_length: int | None = None,
                       config: dict | None = None) -> list[Path]:
    """Write config.json + model.safetensors from a Meta-named state dict (q/k permuted back, Phi-3's
    matrices fused again). `config`: the config.json the model was read from, kept as it is (but the
    dtype); needed for every model args_to_config cannot describe (other families, other rope kinds)."""
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
    if args.model_type in FUSED_FAMILIES:
        _fuse(tensors, shapes, dtypes, args)
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(out / "model.safetensors", tensors, shapes, dtypes)
    main = dtype or state_dtype(state)
    if config is None:
        config = args_to_config(args, dtype=main, bos_id=bos_id, eos_ids=eos_ids, context_length=context_length)
    else:
        config = dict(config)
        if main in DTYPE_NAMES:
            config["torch_dtype"] = config["dtype"] = DTYPE_NAMES[main]
    atomic_write_text(out / "config.json", json.dumps(config, indent=2) + "\n")
    return [out / "model.safetensors", out / "config.json"]
