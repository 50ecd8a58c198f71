"""nabla against llama.cpp on files llama.cpp quantized itself.

The built-in story model (trained, so its argmax means something) is written as
an f32 GGUF by nabla, then quantized by llama.cpp's own `llama_model_quantize`
to Q8_0, Q4_0 and Q4_K_M. On each file: every tensor nabla reads, and every
weight of the model Llama.build makes of it that nabla keeps as stored, equals
the `gguf` package's dequantization exactly (Q4_K layers too, kept under int4); and teacher-forced over the story
text, nabla's argmax next token equals llama.cpp's (its logits over the same
tokens) at >= 97% of positions.

What llama.cpp makes of this model: its rows are 192 wide, not a multiple of
k-quants' 256, so Q4_K_M keeps Q4_K / Q6_K only for ffn_down (512 wide) and falls
back to Q5_0 (Q8_0 for the layers it would give Q6_K) elsewhere; Q4_0 writes the
output head as Q8_0.

Needs llama-cpp-python (skipped without it: CI does not build llama.cpp).
"""

from __future__ import annotations

import ctypes
from collections import Counter

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
lc = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: the agreement test runs llama.cpp "
                                             "itself (pip install llama-cpp-python)")

from conftest import STORY_TEXT  # noqa: E402

from nabla import Llama, default_model_path  # noqa: E402
from nabla.bench.llamacpp import LlamaCpp, _quiet  # noqa: E402
from nabla.checkpoint import open_checkpoint  # noqa: E402
from nabla.checkpoint.gguf import write_gguf  # noqa: E402
from nabla.checkpoint.gguf_families import meta_name  # noqa: E402
from nabla.checkpoint.gguf_read import _reader, _tensor  # noqa: E402
from nabla.model import cpu_kernels  # noqa: E402
from nabla.model.quantize import Int4Linear, Int8Linear  # noqa: E402
from nabla.tokenizer import load_tokenizer  # noqa: E402

FTYPES = ("Q8_0", "Q4_0", "Q4_K_M")
WINDOW = 256  # the built-in model's training context
PREFILL_POSITIONS = 2 * WINDOW
DECODE_POSITIONS = WINDOW
AGREEMENT = 0.97


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """{ftype: path} of llama.cpp-quantized GGUFs of the built-in model, and the f32 one nabla wrote."""
    folder = tmp_path_factory.mktemp("llamacpp")
    lc.llama_log_set(_quiet, None)  # llama_model_quantize prints every tensor otherwise
    llama = Llama.build(default_model_path(), max_seq_len=WINDOW, max_batch_size=1)
    state = {k: v for k, v in llama.model.state_dict().items() if k != "rope" and ".cache." not in k}
    src = write_gguf(folder / "stories-f32.gguf", state, llama.model.args, llama.tokenizer, "f32",
                     context_length=WINDOW)
    out = {"F32": src}
    for name in FTYPES:
        params = lc.llama_model_quantize_default_params()
        params.ftype = getattr(lc, f"LLAMA_FTYPE_MOSTLY_{name}")
        params.nthread = 2
        dst = folder / f"stories-{name}.gguf"
        rc = lc.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
        assert rc == 0, f"llama_model_quantize to {name} failed with {rc}"
        out[name] = dst
    return out


def types_of(path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


def test_llama_cpp_made_the_block_types(files):
    assert set(types_of(files["F32"]).values()) == {"F32"}
    q8 = Counter(types_of(files["Q8_0"]).values())
    assert set(q8) == {"Q8_0", "F32"} and q8["F32"] == 13  # 6 layers x 2 norms + the final norm
    q4 = types_of(files["Q4_0"])
    assert {t for n, t in q4.items() if "norm" not in n and n != "output.weight"} == {"Q4_0"}
    assert q4["output.weight"] == "Q8_0"
    km = types_of(files["Q4_K_M"])
    # k-quants only where the row is a multiple of 256 (ffn_down, 512 wide); Q5_0 / Q8_0 fallbacks elsewhere
    assert {t for n, t in km.items() if "ffn_down" in n} == {"Q4_K", "Q6_K"}
    assert {t for n, t in km.items() if "attn_q" in n or "ffn_up" in n} == {"Q5_0"}


@pytest.mark.parametrize("ftype", FTYPES)
def test_dequantized_tensors_equal_gguf_package(files, ftype):
    path = files[ftype]
    reader = _reader(path)
    state = open_checkpoint(path).load_state()
    reference, stored = {}, {}
    for t in reader.tensors:
        shape = tuple(int(n) for n in reversed(t.shape))
        want = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type)).reshape(shape))
        assert torch.equal(_tensor(t, path).float(), want), t.name
        assert torch.equal(state[meta_name(t.name)].float(), want), t.name
        reference[meta_name(t.name)], stored[meta_name(t.name)] = want, t.tensor_type.name
    # The model Llama.build makes of the file: float tensors and kept Q4_0 blocks are the file's numbers
    # exactly; layers requantized to nabla's int8 / int4 grid are within half a step of it.
    model = Llama.build(path, max_seq_len=8, max_batch_size=1).model
    kept = requantized = floats = 0
    for name, module in model.named_modules():
        key = f"{name}.weight"
        if isinstance(module, (Int4Linear, Int8Linear)):
            got, want = module.dequantize(), reference[key]
            scales = module.scales.float().reshape(want.shape[0], -1)  # per block (int4) or per row (int8)
            step = scales.repeat_interleave(want.shape[1] // scales.shape[1], dim=1)
            if isinstance(module, Int4Linear) and stored[key] == "Q4_0":
                assert torch.equal(got, want), key
                kept += 1
            else:
                assert ((got - want).abs() <= step.abs() / 2 * (1 + 1e-5) + 1e-7).all(), key
                requantized += 1
        elif isinstance(module, torch.nn.Embedding) or key in ("norm.weight",) or name.endswith("_norm"):
            assert torch.equal(module.weight.float(), reference[key]), key
            floats += 1
    n_linear = 7 * 6 + 1
    assert kept + requantized == n_linear and floats == 1 + 2 * 6 + 1  # embedding, norms
    assert kept == (n_linear - 1 if ftype == "Q4_0" else 0)
    if ftype == "Q4_K_M":  # mostly Q5_0 here, so int8 by default; under int4 its Q4_K layers are kept
        model = Llama.build(path, max_seq_len=8, max_batch_size=1, quantize="int4").model
        q4_k = [k for k, t in stored.items() if t == "Q4_K"]
        assert q4_k
        for key in q4_k:
            module = model.get_submodule(key[: -len(".weight")])
            assert isinstance(module, Int4Linear) and module.format == "Q4_K", key
            assert torch.equal(module.dequantize(), reference[key]), key


@pytest.fixture(scope="module")
def story_ids():
    tokenizer = load_tokenizer(open_checkpoint(default_model_path()).tokenizer_path)
    ids = tokenizer.encode(STORY_TEXT.read_text(encoding="utf-8"), bos=True, eos=False)
    assert len(ids) >= PREFILL_POSITIONS
    return ids


def llama_cpp_argmax(path, windows) -> np.ndarray:
    cpp = LlamaCpp(path, 1, WINDOW, torch.get_num_threads(), WINDOW)
    try:
        return np.concatenate([cpp.logits(w).argmax(-1) for w in windows])
    finally:
        cpp.close()


@pytest.fixture(scope="module")
def argmaxes(files, story_ids):
    """{ftype: (llama.cpp, nabla prefill, nabla decode)} argmax next tokens, teacher-forced."""
    windows = [story_ids[s: s + WINDOW] for s in range(0, PREFILL_POSITIONS, WINDOW)]
    out = {}
    for ftype in FTYPES:
        path = files[ftype]
        llama = Llama.build(path, max_seq_len=WINDOW, max_batch_size=1)
        theirs = llama_cpp_argmax(path, windows)
        with torch.inference_mode():
            prefill = np.concatenate([llama.model(torch.tensor([w]))[0].argmax(-1).numpy() for w in windows])
            # One token a step through the cache, as generation runs after the prompt.
            decode = np.array([llama.model.decode(torch.tensor([[t]]), i)[0, -1].argmax().item()
                               for i, t in enumerate(windows[0][:DECODE_POSITIONS])])
        out[ftype] = (theirs, prefill, decode)
    return out


@pytest.mark.parametrize("ftype", FTYPES)
def test_greedy_next_token_agrees_decoding(argmaxes, ftype):
    theirs, _, decode = argmaxes[ftype]
    agree = float((decode == theirs[: len(decode)]).mean())
    print(f"{ftype}: nabla's next token (one step at a time) = llama.cpp's at {agree:.2%} of "
          f"{len(decode)} teacher-forced positions")
    assert agree >= AGREEMENT


INT8_PREFILL = ("without AVX-512 VNNI, nabla's int8 prefill (FBGEMM) quantizes each layer's inputs per tensor to "
                "7 bits; llama.cpp quantizes them per block of 32 (Q8_0): on these files 94-95% agreement")
NO_VNNI = pytest.mark.xfail(not cpu_kernels.I8_VNNI, strict=True, reason=INT8_PREFILL)


@pytest.mark.parametrize("ftype", [pytest.param("Q8_0", marks=NO_VNNI), "Q4_0", pytest.param("Q4_K_M", marks=NO_VNNI)])
def test_greedy_next_token_agrees_prefill(argmaxes, ftype):
    theirs, prefill, _ = argmaxes[ftype]
    agree = float((prefill == theirs).mean())
    print(f"{ftype}: nabla's next token (whole windows at once) = llama.cpp's at {agree:.2%} of "
          f"{len(prefill)} teacher-forced positions")
    assert agree >= AGREEMENT
