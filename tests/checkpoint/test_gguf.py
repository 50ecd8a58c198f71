"""GGUF export (nabla.checkpoint.gguf): read back with the gguf package's reader, and run by llama.cpp
itself where llama-cpp-python is installed."""

import importlib.util

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from conftest import LLAMA2_TOKENIZER, TINY_GQA, random_state  # noqa: E402

from nabla.checkpoint.gguf import write_gguf  # noqa: E402
from nabla.checkpoint.meta import args_from_params  # noqa: E402
from nabla.errors import ConfigError  # noqa: E402
from nabla.model import Transformer  # noqa: E402
from nabla.tokenizer import load_tokenizer  # noqa: E402

PARAMS = dict(TINY_GQA, rope_theta=10000.0)


def tiny():
    args = args_from_params(dict(PARAMS))
    model = Transformer(args).eval()
    model.load_state_dict(random_state(args, 2), strict=False)
    return model, args


def field(reader, key):
    f = reader.fields[key]
    return f.contents() if hasattr(f, "contents") else f.parts[f.data[0]].tolist()


@pytest.mark.parametrize("qtype,tol", [("f32", 0.0), ("q8_0", 1 / 254), ("q4_0", 1 / 8)])
def test_tensors_and_metadata_read_back(tmp_path, qtype, tol):
    model, args = tiny()
    path = write_gguf(tmp_path / "m.gguf", model.state_dict(), args, load_tokenizer(LLAMA2_TOKENIZER), qtype)
    r = gguf.GGUFReader(path)
    assert field(r, "general.architecture") == "llama"
    assert field(r, "llama.block_count") == args.n_layers
    assert field(r, "llama.attention.head_count_kv") == args.n_kv_heads
    assert field(r, "llama.embedding_length") == args.dim
    tokens = field(r, "tokenizer.ggml.tokens")
    assert len(tokens) == 32000 and tokens[15043] == "\u2581Hello"
    got = {t.name: t for t in r.tensors}
    assert len(got) == 3 + 9 * args.n_layers  # embedding, norm, output; 9 per layer
    for meta, name in [("layers.1.attention.wk.weight", "blk.1.attn_k.weight"),
                       ("layers.0.feed_forward.w2.weight", "blk.0.ffn_down.weight"),
                       ("norm.weight", "output_norm.weight")]:
        want = model.state_dict()[meta].numpy()
        t = got[name]
        data = gguf.quants.dequantize(t.data, t.tensor_type).reshape(want.shape)
        # q8_0: half a step of the block scale absmax/127; q4_0 (scale absmax/8, q clipped at +7): one step
        assert np.abs(data - want).max() <= tol * np.abs(want).max() + 1e-7, name


def test_bad_types_are_config_errors(tmp_path):
    model, args = tiny()
    with pytest.raises(ConfigError, match="q8_0"):
        write_gguf(tmp_path / "m.gguf", model.state_dict(), args, None, "q3_k")
    assert not list(tmp_path.iterdir())  # nothing half-written


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python not installed")
def test_llama_cpp_gives_our_logits(tmp_path):
    from nabla.bench.llamacpp import LlamaCpp

    model, args = tiny()
    path = write_gguf(tmp_path / "m.gguf", model.state_dict(), args, load_tokenizer(LLAMA2_TOKENIZER), "f32")
    cpp = LlamaCpp(path, 1, 32, 1)
    prompt = [1, 15043, 3186, 29892, 920, 526]
    with torch.no_grad():
        ours = model(torch.tensor([prompt]))[0].numpy()
    theirs = cpp.logits(prompt)
    cpp.close()
    np.testing.assert_allclose(theirs, ours, atol=2e-3)
    assert (theirs.argmax(-1) == ours.argmax(-1)).all()


def test_convert_to_gguf(tmp_path, make_checkpoint, capsys):
    from nabla.cli import main

    src = make_checkpoint(PARAMS, seed=4)
    assert main(["convert", "--model", str(src), "--out", str(tmp_path / "g"), "--to", "gguf",
                 "--quantize", "int4"]) == 0
    assert "GGUF" in capsys.readouterr().out
    (path,) = (tmp_path / "g").iterdir()
    assert path.name.endswith("-q4_0.gguf")
    r = gguf.GGUFReader(path)
    assert r.tensors[0].tensor_type in (gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.F32)
    assert any(t.tensor_type == gguf.GGMLQuantizationType.Q4_0 for t in r.tensors)
    assert main(["convert", "--model", str(src), "--out", str(tmp_path / "h"), "--to", "gguf",
                 "--shards", "2"]) == 1
    assert "--shards applies to Meta output" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python not installed")
def test_llama_cpp_continues_the_built_in_model_as_nabla_does(tmp_path):
    import llama_cpp

    from nabla import Llama, default_model_path
    from nabla.checkpoint.convert import convert_checkpoint

    BUILTIN_MODEL = default_model_path()
    (path,) = convert_checkpoint(BUILTIN_MODEL, tmp_path / "g", "gguf", dtype="fp32")
    llm = llama_cpp.Llama(str(path), verbose=False, n_threads=1)
    theirs = llm("Once upon a time", max_tokens=24, temperature=0)["choices"][0]["text"]
    ours = Llama.build(BUILTIN_MODEL, None, max_seq_len=64, max_batch_size=1).text_completion(
        ["Once upon a time"], temperature=0, max_gen_len=24)[0]["generation"]
    assert theirs == ours
