"""Opening llama.cpp GGUF files as nabla checkpoints, read with the `gguf` package's GGUFReader.

`open_gguf(file)` returns a GGUFCheckpoint: the hyper-parameters from the
`llama.*` metadata, the tensors renamed to Meta's names by inverting
nabla.checkpoint.gguf.TENSOR_NAMES (llama.cpp's attn_q / attn_k rows are in
Meta's order, so nothing is permuted), and the tokenizer from the `tokenizer.*`
metadata (nabla.tokenizer.gguf). Each tensor is dequantized once, when the
state is read, with `gguf.quants.dequantize` (llama.cpp's own arithmetic):

    F32                    -> fp32 as stored
    F16, BF16              -> fp16 / bf16 as stored (then the compute dtype)
    Q8_0, Q5_0, Q5_1,      -> dequantized to fp32, then the linear layers are stored as
    Q5_K, Q6_K                nabla int8 (one scale per output channel, requantized)
    Q4_0                   -> kept: nabla's int4 is Q4_0 (nabla.checkpoint.gguf_quantized)
    Q4_1, Q4_K             -> dequantized to fp32, then the linear layers are stored as
                              nabla int4 (Q4_0 blocks, requantized)

The int8 / int4 step (`load_quantize`, from the type most of the blocks' weights
have) runs in Llama.build unless the caller passes its own `quantize`; the
embedding and norms stay in the compute dtype. Requantized means not bit-exact:
nabla's int4 and int8 grids differ from llama.cpp's blocks (error at most half
a step of nabla's grid). Llama 3.1-style rope factors (`rope_freqs.weight`) are
matched against Meta's llama3 scaling.

Leaves out: architectures other than "llama", the other GGUF types (IQ*, Q2_K,
Q3_K, TQ*: a clear error), and keeping blocks quantized in memory as they are.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from nabla.checkpoint import Checkpoint
from nabla.checkpoint.gguf import TENSOR_NAMES
from nabla.checkpoint.shards import Entry, LazyState
from nabla.errors import CheckpointError, ConfigError
from nabla.model.args import LLAMA3_ROPE_SCALING, ModelArgs

LOADS_AS = {
    "F32": "fp32 (as stored)",
    "F16": "fp16 (as stored; computed in the run's dtype)",
    "BF16": "bf16 (as stored; computed in the run's dtype)",
    **{t: "int8 per output channel (dequantized, requantized)" for t in ("Q8_0", "Q5_0", "Q5_1", "Q5_K", "Q6_K")},
    "Q4_0": "int4, the file's Q4_0 blocks as they are",
    **{t: "int4 Q4_0 blocks (dequantized, requantized)" for t in ("Q4_1", "Q4_K")},
}
"""What nabla makes of each GGUF tensor type it reads (linear layers; embedding and norms stay float)."""
MODE_OF = {t: ("int8" if "int8" in v else "int4" if "int4" in v else None) for t, v in LOADS_AS.items()}
META_NAMES = {gguf: meta for meta, gguf in TENSOR_NAMES.items()}  # llama.cpp name -> Meta name
SKIPPED = ("rope_freqs.weight",)  # read into the rope settings, not a weight
MAGIC = b"GGUF"


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ConfigError("reading GGUF files needs the gguf package: `pip install gguf`") from None
    return gguf


def is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


def meta_name(name: str) -> str | None:
    """Meta's name for a llama.cpp tensor name (None for names the table lacks)."""
    parts = name.split(".")
    if len(parts) > 2 and parts[0] == "blk" and parts[1].isdigit():
        meta = META_NAMES.get(".".join(["blk", "{}", *parts[2:]]))
        return meta.format(parts[1]) if meta else None
    return META_NAMES.get(name)


@dataclass
class GGUFCheckpoint(Checkpoint):
    metadata: dict = field(default_factory=dict)
    """The file's metadata (key -> Python value), GGUF.* header fields left out."""
    tensor_types: dict[str, int] = field(default_factory=dict)
    """Tensors per GGUF type ("Q4_0": 57)."""
    load_quantize: str | None = None
    """"int8" / "int4": what Llama.build quantizes the linear layers to when not told otherwise."""

    def tokenizer(self):
        from nabla.tokenizer.gguf import gguf_tokenizer

        return gguf_tokenizer(self.metadata, str(self.path))


def _reader(path: Path):
    gguf = _gguf()
    size = path.stat().st_size
    if size < 24 or not is_gguf(path):
        raise CheckpointError(f"{path} is a file but not a GGUF file (no GGUF header); pass a .gguf file, or "
                              "the checkpoint folder that contains the weights")
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError, OverflowError, TypeError) as e:
        problem = "an unknown tensor type" if "GGMLQuantizationType" in str(e) else "truncated or damaged"
        raise CheckpointError(f"cannot read {path}: {problem} ({str(e)[:200]}); download or convert the file "
                              "again (nabla reads GGUF types " + ", ".join(LOADS_AS) + ")") from None
    for t in reader.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size or t.data.nbytes != int(t.n_bytes):
            raise CheckpointError(f"{path} is truncated: tensor {t.name} ends at byte {end:,} but the file has "
                                  f"{size:,} bytes; the download or copy did not finish: fetch it again")
        if t.tensor_type.name not in LOADS_AS:
            raise CheckpointError(f"{path}: tensor {t.name} is {t.tensor_type.name}, a GGUF type nabla does not "
                                  f"read (it reads {', '.join(LOADS_AS)}); requantize the original with "
                                  "llama.cpp's llama-quantize to one of those (e.g. Q4_K_M or Q8_0)")
    return reader


def _metadata(reader) -> dict:
    out = {}
    for key, f in reader.fields.items():
        if not key.startswith("GGUF."):
            value = f.contents()
            out[key] = value.tolist() if isinstance(value, np.ndarray) else value
    return out


def _rope_scaling(reader, theta: float, head_dim: int, path: Path) -> dict | None:
    """Meta's llama3 scaling whose factors equal the file's rope_freqs.weight, or None without one."""
    gguf = _gguf()
    t = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if t is None:
        return None
    want = gguf.quants.dequantize(t.data, t.tensor_type).reshape(-1).astype(np.float64)
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)
    for factor in (8.0, 16.0, 32.0, 4.0, 2.0):  # Llama 3.1 and 3.2 use 8 and 32
        s = dict(LLAMA3_ROPE_SCALING, factor=factor)
        low, high = s["original_max_position_embeddings"] / s["low_freq_factor"], \
            s["original_max_position_embeddings"] / s["high_freq_factor"]
        got = []
        for f in freqs:  # convert_hf_to_gguf.py's rope factors (1 / Meta's scaling of each frequency)
            wavelen = 2 * math.pi / f
            if wavelen < high:
                got.append(1.0)
            elif wavelen > low:
                got.append(factor)
            else:
                smooth = (s["original_max_position_embeddings"] / wavelen - s["low_freq_factor"]) / \
                    (s["high_freq_factor"] - s["low_freq_factor"])
                got.append(1 / ((1 - smooth) / factor + smooth))
        if len(got) == len(want) and np.allclose(got, want, rtol=1e-3):
            return s
    raise ConfigError(f"{path}: its rope_freqs.weight factors are not Llama 3's rope scaling (factor 2 to 32, "
                      "original context 8192); nabla cannot run this rope yet")


def gguf_args(reader, meta: dict, path: Path) -> tuple[ModelArgs, int | None]:
    """(ModelArgs, trained context length) from the `llama.*` metadata."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ConfigError(f"{path} is a {arch!r} model (general.architecture); nabla runs 'llama' GGUF files "
                          "so far: run the model's Hugging Face folder, or use llama.cpp for this file")

    def get(key, default=...):
        value = meta.get(f"llama.{key}", default)
        if value is ...:
            raise CheckpointError(f"{path} has no llama.{key} in its metadata; the file is incomplete: convert "
                                  "the model again with llama.cpp's convert_hf_to_gguf.py")
        if isinstance(value, list):
            raise ConfigError(f"{path}: llama.{key} differs between layers ({value[:4]}...); nabla runs "
                              "models whose layers all have the same shape")
        return value

    scaling_type = get("rope.scaling.type", "none")
    if scaling_type not in ("none", "", None):
        raise ConfigError(f"{path} uses {scaling_type!r} rope scaling, which nabla does not run yet; "
                          "use a model without it or llama.cpp")
    n_heads = get("attention.head_count")
    dim = get("embedding_length")
    head_dim = get("attention.key_length", dim // n_heads if n_heads else 0)
    rot = get("rope.dimension_count", head_dim)
    if rot != head_dim:
        raise ConfigError(f"{path} rotates {rot} of each head's {head_dim} channels; nabla rotates them all")
    theta = float(get("rope.freq_base", 10000.0))
    emb = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    vocab = int(emb.shape[1]) if emb is not None and len(emb.shape) == 2 else get("vocab_size", -1)
    tied = not any(t.name == "output.weight" for t in reader.tensors)
    args = ModelArgs(dim=dim, n_layers=get("block_count"), n_heads=n_heads,
                     n_kv_heads=get("attention.head_count_kv", n_heads), vocab_size=vocab,
                     norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)), rope_theta=theta,
                     rope_scaling=_rope_scaling(reader, theta, head_dim, path),
                     head_dim=head_dim if head_dim != dim // n_heads else None,
                     hidden_dim=get("feed_forward_length"), tie_word_embeddings=tied)
    return args, get("context_length", None)


def _tensor(t, path: Path) -> torch.Tensor:
    gguf = _gguf()
    Q = gguf.GGMLQuantizationType
    shape = tuple(int(n) for n in reversed(t.shape))  # GGUF lists the fastest dimension first
    if t.tensor_type == Q.F32:
        arr = np.array(t.data, dtype=np.float32)
    elif t.tensor_type == Q.F16:
        arr = np.array(t.data, dtype=np.float16)
    elif t.tensor_type == Q.BF16:
        return torch.from_numpy(np.array(t.data).view(np.int16).reshape(shape)).view(torch.bfloat16)
    else:
        arr = gguf.quants.dequantize(t.data, t.tensor_type)
    return torch.from_numpy(np.ascontiguousarray(arr).reshape(shape))


DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def open_gguf(path: str | Path) -> GGUFCheckpoint:
    """Open a .gguf file as a checkpoint (nothing dequantized until `load_state()` is read)."""
    path = Path(path)
    reader = _reader(path)
    meta = _metadata(reader)
    args, context = gguf_args(reader, meta, path)
    entries, types, unknown, block_types = {}, Counter(), [], Counter()
    for t in reader.tensors:
        kind = t.tensor_type.name
        types[kind] += 1
        name = meta_name(t.name)
        if name is None:
            if t.name not in SKIPPED:
                unknown.append(t.name)
            continue
        if name.startswith("layers.") and len(t.shape) == 2:
            block_types[kind] += 1
        shape = tuple(int(n) for n in reversed(t.shape))
        entries[name] = Entry(lambda t=t: _tensor(t, path), shape, DTYPES.get(kind, torch.float32))
    if unknown:
        raise CheckpointError(f"{path} has tensors a Llama does not have: {', '.join(unknown[:4])}"
                              f"{'...' if len(unknown) > 4 else ''}; it is not a plain Llama model: use llama.cpp")
    main = block_types.most_common(1)[0][0] if block_types else "F32"
    state = LazyState(entries)
    bos = meta.get("tokenizer.ggml.bos_token_id")
    eot = [meta[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id") if k in meta]
    return GGUFCheckpoint(path, "gguf", args, lambda: LazyState(entries), None, dtype=DTYPES.get(main, torch.float32),
                          shapes={k: e.shape for k, e in state._entries.items()}, files=[path],
                          context_length=context, bos_id=bos, eos_ids=list(dict.fromkeys(eot)),
                          metadata=meta, tensor_types=dict(types), load_quantize=MODE_OF.get(main))


def find_gguf(folder: Path) -> Path | None:
    """The one .gguf file of a folder (None without one; an error with several)."""
    found = sorted(p for p in folder.glob("*.gguf") if p.is_file())
    if len(found) > 1:
        raise CheckpointError(f"{folder} holds {len(found)} GGUF files ({', '.join(p.name for p in found[:4])}); "
                              "pass the one to run: --model FOLDER/FILE.gguf")
    return found[0] if found else None


def save_tokenizer(tok, meta: dict, out: Path) -> list[Path]:
    """Write a GGUF file's tokenizer as files nabla (and others) read: tokenizer.model, or tokenizer.json
    with a tokenizer_config.json (bos/eos tokens and the chat template)."""
    import json

    from nabla.checkpoint.io import atomic_write_text

    sp = getattr(tok, "sp", None)
    if sp is not None:
        dest = out / "tokenizer.model"
        tmp = out / ".tokenizer.model.tmp"
        tmp.write_bytes(sp.serialized_model_proto())
        tmp.replace(dest)
        return [dest]
    config = {"bos_token": tok.bos_token, "eos_token": tok.eos_token, "add_bos_token": tok.add_bos}
    if meta.get("tokenizer.chat_template"):
        config["chat_template"] = meta["tokenizer.chat_template"]
    atomic_write_text(out / "tokenizer.json", tok.tk.to_str())
    atomic_write_text(out / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")
    return [out / "tokenizer.json", out / "tokenizer_config.json"]
