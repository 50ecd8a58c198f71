"""The engines nabla is timed against, on the very same weights, in the same run.

`hf_peer`: transformers' LlamaForCausalLM holding nabla's weights (q/k rows
permuted to Hugging Face's order), timed by `time_hf` the way
nabla.bench.timing times nabla. `llamacpp_peer`: llama.cpp on a GGUF file of
the weights (nabla.bench.llamacpp); `llamacpp_file_peer`: llama.cpp on a GGUF
file as it is, the very file nabla loaded (`--model FILE.gguf`).

Leaves out: other engines (vLLM, MLX) and peers' own quantization schemes
beyond the GGUF types that match nabla's.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from nabla import device as devices
from nabla.generation.sampling import greedy
from nabla.model.llama import Transformer

if TYPE_CHECKING:
    from nabla.bench.runner import Setup

GGUF_TYPE = {("fp32", None): "f32", ("bf16", None): "bf16", ("fp16", None): "f16"}  # else by --quantize


def hf_peer(model: Transformer, dtype: torch.dtype, context_length: int | None = None):
    """transformers' LlamaForCausalLM holding the same weights (q/k rows permuted to HF order);
    `context_length` goes into its config (max_position_embeddings)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from nabla.checkpoint.hf import args_to_config, rename_weight

    args = model.args
    config = LlamaConfig(**args_to_config(args, dtype=dtype, context_length=context_length))
    with torch.device("meta"):
        hf = LlamaForCausalLM(config)
    state = {}
    for key, t in model.state_dict().items():
        if key == "rope" or ".cache." in key:
            continue
        name, permute = rename_weight(key, args, to="hf")
        state[name] = (permute(t) if permute is not None else t).to(dtype)
    if args.tie_word_embeddings:
        state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    hf.load_state_dict(state, assign=True, strict=False)
    device = next(model.parameters()).device
    hf.model.rotary_emb.to_empty(device=device)
    with device:  # recompute its non-persistent inv_freq there
        hf.model.rotary_emb.__init__(config)
    return hf.eval()


def time_hf(hf, tokens: torch.Tensor, gen_len: int) -> tuple[float, float]:
    import inspect

    from transformers import DynamicCache

    # transformers 5 renamed past_key_values to cache; pass whichever this version takes.
    key = "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"
    sync = functools.partial(devices.synchronize, tokens.device)
    with torch.inference_mode():
        cache = DynamicCache()
        sync()
        t0 = time.perf_counter()
        out = hf(input_ids=tokens, use_cache=True, logits_to_keep=1, **{key: cache})
        sync()
        t1 = time.perf_counter()
        nxt = greedy(out.logits[:, -1])[:, None]
        for _ in range(gen_len):
            out = hf(input_ids=nxt, use_cache=True, logits_to_keep=1, **{key: cache})
            nxt = greedy(out.logits[:, -1])[:, None]
        sync()
        t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def llamacpp_peer(model: Transformer, tokenizer, setup: Setup, say):
    """llama.cpp on a GGUF of `model`'s weights (before nabla quantizes them): q8_0 beside int8,
    q4_0 beside int4, else the dtype's own type."""
    import tempfile

    from nabla.bench.llamacpp import LlamaCpp
    from nabla.checkpoint.gguf import write_gguf

    gguf_type = {"int8": "q8_0", "int4": "q4_0"}.get(setup.quantize) or GGUF_TYPE[(setup.dtype, None)]
    say(f"writing the weights as {gguf_type} GGUF for llama.cpp")
    folder = tempfile.TemporaryDirectory(prefix="nabla-bench-")
    try:
        context = setup.prompt_len + setup.gen_len + 1
        path = write_gguf(f"{folder.name}/model-{gguf_type}.gguf", model.state_dict(), model.args, tokenizer,
                          gguf_type, context_length=context)
        cpp = LlamaCpp(path, setup.batch_size, context, torch.get_num_threads(), setup.prompt_len)
    except BaseException:
        folder.cleanup()
        raise
    cpp.gguf_type, cpp.folder = gguf_type, folder  # the file lives as long as the peer
    cpp.gguf_file, cpp.gguf_types = None, None
    return cpp


def gguf_file(model: str | Path) -> Path | None:
    """The GGUF file a --model argument loads (a .gguf file, or a folder holding one), else None."""
    from nabla.checkpoint import detect_format
    from nabla.checkpoint.gguf_read import find_gguf, is_gguf

    path = Path(model)
    if path.is_file():
        return path if is_gguf(path) else None
    if path.is_dir() and detect_format(path) == "gguf":
        return find_gguf(path)
    return None


def file_type_name(types: dict[str, int], file_type: int | None = None) -> str:
    """What a GGUF file is called: its `general.file_type` ("Q4_K_M") where the gguf package knows the
    number, else the type most of its quantized tensors have ("Q4_0"), or F32/F16/BF16 for a float file."""
    import gguf

    try:
        return gguf.LlamaFileType(file_type).name.split("_", 1)[1]  # MOSTLY_Q4_K_M, ALL_F32
    except (ValueError, TypeError):
        pass
    blocks = {t: n for t, n in types.items() if t not in ("F32", "F16", "BF16")}
    pick = blocks or types
    return max(pick, key=pick.get)


def llamacpp_file_peer(path: Path, tensor_types: dict[str, int], file_type: int | None, setup: Setup, say):
    """llama.cpp on the GGUF file at `path` itself, nothing rewritten: the same bytes nabla loaded."""
    from nabla.bench.llamacpp import LlamaCpp

    say(f"loading {path.name} in llama.cpp")
    context = setup.prompt_len + setup.gen_len + 1
    cpp = LlamaCpp(path, setup.batch_size, context, torch.get_num_threads(), setup.prompt_len)
    cpp.gguf_type, cpp.folder = file_type_name(tensor_types, file_type), None
    cpp.gguf_file, cpp.gguf_types = str(path), dict(tensor_types)
    return cpp
