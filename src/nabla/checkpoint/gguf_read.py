"""Opening llama.cpp GGUF files as nabla checkpoints, read with the `gguf` package's GGUFReader.

`open_gguf(file)` returns a GGUFCheckpoint: the hyper-parameters from the
`{arch}.*` metadata and the tensors in Meta's names and layout, for the
architectures llama (Llama, Mistral), qwen2, qwen3, gemma, gemma2 and phi3
(nabla.checkpoint.gguf_families: q/k rows back to Meta's order where llama.cpp
keeps Hugging Face's, Gemma's 1 + w norms, Phi-3's fused tensors split, rope
factors read into the rope settings), and the tokenizer from the `tokenizer.*`
metadata (nabla.tokenizer.gguf). Each tensor is dequantized once, when the
state is read, with `gguf.quants.dequantize` (llama.cpp's own arithmetic):

    F32                    -> fp32 as stored
    F16, BF16              -> fp16 / bf16 as stored (then the compute dtype)
    Q8_0, Q5_0, Q5_1,      -> dequantized to fp32, then the linear layers are stored as
    Q5_K, Q6_K                nabla int8 (one scale per output channel, requantized)
    Q4_0                   -> kept: nabla's int4 is Q4_0 (nabla.checkpoint.gguf_quantized)
    Q4_1                   -> kept: nabla's int4 with a minimum per block is Q4_1
    Q4_K                   -> kept: its super-blocks as they are, the 6-bit fields a byte each

The int8 / int4 step (`load_quantize`, from the type most of the blocks' weights
have) runs in Llama.build unless the caller passes its own `quantize`; the
embedding and norms stay in the compute dtype. Requantized means not bit-exact:
nabla's int4 and int8 grids differ from llama.cpp's blocks (error at most half
a step of nabla's grid).

Leaves out: other architectures (mixture-of-experts, gemma3...: one clear
error), the other GGUF types (IQ*, Q2_K, Q3_K, TQ*: a clear error), and keeping
the 5-, 6- and 8-bit blocks as they are.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from nabla.checkpoint import Checkpoint
from nabla.checkpoint.shards import Entry, LazyState
from nabla.errors import CheckpointError, ConfigError
from nabla.model.args import ModelArgs

LOADS_AS = {
    "F32": "fp32 (as stored)",
    "F16": "fp16 (as stored; computed in the run's dtype)",
    "BF16": "bf16 (as stored; computed in the run's dtype)",
    **{t: "int8 per output channel (dequantized, requantized)"
       for t in ("Q8_0", "Q5_0", "Q5_1", "Q5_K", "Q6_K")},
    "Q4_0": "int4, the file's Q4_0 blocks as they are",
    "Q4_1": "int4 with a minimum per block, the file's Q4_1 blocks as they are",
    "Q4_K": "int4 with a minimum per block, the file's Q4_K super-blocks as they are",
}
"""What nabla makes of each GGUF tensor type it reads (linear layers; embedding and norms stay float)."""
MODE_OF = {t: ("int8" if "int8" in v else "int4" if "int4" in v else None) for t, v in LOADS_AS.items()}
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


@dataclass
class GGUFCheckpoint(Checkpoint):
    metadata: dict = field(default_factory=dict)
    """The file's metadata (key -> Python value), GGUF.* header fields left out."""
    tensor_types: dict[str, int] = field(default_factory=dict)
    """Tensors per GGUF type ("Q4_0": 57)."""
    load_quantize: str | None = None
    """"int8" / "int4": what Llama.build quantizes the linear layers to when not told otherwise."""
    reader: object = field(default=None, repr=False)
    """The gguf package's GGUFReader of the file (its tensors are views of one memory map), read once:
    parsing a file's metadata (a 32000-token vocabulary) takes seconds."""

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


def gguf_args(reader, meta: dict, path: Path) -> tuple[ModelArgs, int | None]:
    """(ModelArgs, trained context length) from the file's metadata (nabla.checkpoint.gguf_families)."""
    from nabla.checkpoint.gguf_families import args_from_metadata

    gguf = _gguf()
    by_name = {t.name: t for t in reader.tensors}

    def values(name: str) -> list[float] | None:
        t = by_name.get(name)
        return None if t is None else gguf.quants.dequantize(t.data, t.tensor_type).reshape(-1).tolist()

    emb = by_name.get("token_embd.weight")
    vocab = int(emb.shape[1]) if emb is not None and len(emb.shape) == 2 else -1
    if vocab == -1:
        vocab = meta.get(f"{meta.get('general.architecture')}.vocab_size", -1)
    return args_from_metadata(meta, values, "output.weight" in by_name, vocab, path)


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
    from nabla.checkpoint.gguf_families import extra_tensor_names, from_gguf

    arch = meta["general.architecture"]
    entries, types, unknown, block_types = {}, Counter(), [], Counter()
    for t in reader.tensors:
        kind = t.tensor_type.name
        types[kind] += 1
        shape = tuple(int(n) for n in reversed(t.shape))  # GGUF lists the fastest dimension first
        try:
            parts = from_gguf(t.name, shape, args, arch)
        except ConfigError as e:
            raise CheckpointError(f"{path}: {e}; the metadata does not fit the weights") from None
        if parts is None:
            if t.name not in extra_tensor_names():
                unknown.append(t.name)
            continue
        if t.name.startswith("blk.") and len(t.shape) == 2:
            block_types[kind] += 1
        for name, part_shape, make in parts:
            entries[name] = Entry(lambda t=t, make=make: make(_tensor(t, path)), part_shape,
                                  DTYPES.get(kind, torch.float32))
    if unknown:
        raise CheckpointError(f"{path} has tensors a {arch!r} model does not have: {', '.join(unknown[:4])}"
                              f"{'...' if len(unknown) > 4 else ''}; nabla runs plain {arch} models (no experts, "
                              "adapters or extra heads): use llama.cpp for this file")
    main = block_types.most_common(1)[0][0] if block_types else "F32"
    state = LazyState(entries)
    bos = meta.get("tokenizer.ggml.bos_token_id")
    eot = [meta[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id") if k in meta]
    return GGUFCheckpoint(path, "gguf", args, lambda: LazyState(entries), None, dtype=DTYPES.get(main, torch.float32),
                          shapes={k: e.shape for k, e in state._entries.items()}, files=[path],
                          context_length=context, bos_id=bos, eos_ids=list(dict.fromkeys(eot)),
                          metadata=meta, tensor_types=dict(types), load_quantize=MODE_OF.get(main), reader=reader)


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
