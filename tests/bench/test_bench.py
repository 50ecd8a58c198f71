"""`nabla bench` end to end on the smallest shape (numbers recorded, never asserted)."""

import collections
import importlib.util
import json

import pytest

from nabla.bench import peers, runner
from nabla.cli import main


def test_bench_tiny_json(capsys):
    rc = main(["bench", "--shape", "tiny", "--gen-len", "4", "--prompt-len", "8", "--repeats", "1",
               "--threads", "1", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("prefill_tok_s", "decode_tok_s", "peak_rss_bytes", "bandwidth_gb_s", "roofline_fraction"):
        assert out[key] > 0, key
    assert set(out["bandwidth_probes_gb_s"]) == {"torch_sum", "torch_linear_1xK", "numpy_sum"}
    print("bench tiny:", {k: out[k] for k in ("prefill_tok_s", "decode_tok_s", "roofline_fraction")})


def test_bench_vs_hf_and_int8(capsys):
    rc = main(["bench", "--shape", "tiny", "--gen-len", "3", "--prompt-len", "4", "--repeats", "1",
               "--threads", "1", "--vs", "hf", "--quantize", "int8", "--batch-size", "2"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "transformers:" in text and "decode:" in text and "int8" in text


def test_hf_peer_gives_our_logits():
    import torch

    from nabla.model.args import from_name

    args = from_name("tiny")
    model = runner.random_model(args, torch.float32, seed=1)
    hf = peers.hf_peer(model, torch.float32)
    tokens = torch.randint(0, args.vocab_size, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf(tokens).logits, atol=1e-4, rtol=1e-4)


def test_bench_refuses_what_does_not_fit(monkeypatch, capsys):
    monkeypatch.setattr(runner, "available_memory", lambda device=None: 2**30)
    rc = main(["bench", "--shape", "llama2-7b", "--json"])
    assert rc == 1
    assert "GiB available" in capsys.readouterr().err


def test_vs_llama_cpp_says_how_to_install(monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real(name, *a))
    rc = main(["bench", "--shape", "tiny", "--vs", "llama.cpp"])
    assert rc == 1
    assert "pip install llama-cpp-python" in capsys.readouterr().err


@pytest.mark.parametrize("flag", [["--batch-size", "0"], ["--repeats", "0"]])
def test_bad_numbers_are_config_errors(flag, capsys):
    assert main(["bench", "--shape", "tiny", *flag]) == 1
    assert "at least 1" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("gguf") is None,
                    reason="llama-cpp-python and gguf not installed")
@pytest.mark.parametrize("quantize", [None, "int8"])
def test_bench_vs_llama_cpp(capsys, quantize):
    args = ["bench", "--shape", "tiny", "--gen-len", "3", "--prompt-len", "4", "--repeats", "1",
            "--threads", "1", "--vs", "llama.cpp", "--batch-size", "2", "--json"]
    assert main(args + (["--quantize", quantize] if quantize else [])) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["llamacpp"]["gguf_type"] == ("q8_0" if quantize else "f32")
    assert out["llamacpp"]["decode_tok_s"] > 0 and out["vs_llamacpp_ratio"] > 0


# ------------------------------------------------------------------ --model FILE.gguf --vs llama.cpp
def tiny_gguf(tmp_path, qtype):
    """A GGUF file of a tiny random Llama (Llama 2 tokenizer) in `qtype`, written by nabla."""
    pytest.importorskip("gguf")
    from conftest import LLAMA2_TOKENIZER, TINY_GQA, random_state

    from nabla.checkpoint.gguf import write_gguf
    from nabla.checkpoint.meta import args_from_params
    from nabla.tokenizer import load_tokenizer

    args = args_from_params(dict(TINY_GQA))
    return write_gguf(tmp_path / f"tiny-{qtype}.gguf", random_state(args, 3), args,
                      load_tokenizer(LLAMA2_TOKENIZER), qtype)


class FakeLlamaCpp:
    """Stands in for nabla.bench.llamacpp.LlamaCpp where llama.cpp is not installed: records what it loads."""
    loaded: list = []

    def __init__(self, gguf_path, batch_size, seq_len, threads, prompt_len=512):
        from pathlib import Path

        FakeLlamaCpp.loaded.append((Path(gguf_path), Path(gguf_path).read_bytes()))

    def time(self, tokens, gen_len):
        return 0.01, 0.02

    def close(self):
        pass


@pytest.fixture
def fake_llama_cpp(monkeypatch):
    from nabla.bench import llamacpp

    FakeLlamaCpp.loaded = []
    monkeypatch.setattr(llamacpp, "check_installed", lambda: None)
    monkeypatch.setattr(llamacpp, "LlamaCpp", FakeLlamaCpp)
    return FakeLlamaCpp.loaded


def bench_json(capsys, *extra):
    args = ["bench", "--gen-len", "2", "--prompt-len", "4", "--repeats", "1", "--threads", "1", "--json", *extra]
    assert main(args) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("where", ["file", "folder"])
def test_gguf_model_gives_llama_cpp_that_very_file(tmp_path, capsys, fake_llama_cpp, where):
    path = tiny_gguf(tmp_path, "q4_0")
    out = bench_json(capsys, "--model", str(path if where == "file" else tmp_path), "--vs", "llama.cpp")
    [(loaded, data)] = fake_llama_cpp
    assert loaded.resolve() == path.resolve() and data == path.read_bytes()  # the file itself, not a copy
    peer = out["llamacpp"]
    assert peer["gguf_file"] == str(loaded) and peer["gguf_type"] == "Q4_0"
    import gguf

    types = collections.Counter(t.tensor_type.name for t in gguf.GGUFReader(path).tensors)
    assert peer["gguf_types"] == out["gguf_types"] == dict(types) and "Q4_0" in types
    assert out["quantize"] == "int4"  # nabla ran the file's Q4_0 blocks, as Llama.build loads them


def test_gguf_report_names_the_tensor_types(tmp_path, capsys, fake_llama_cpp):
    from nabla.bench.runner import format_report

    out = bench_json(capsys, "--model", str(tiny_gguf(tmp_path, "q8_0")), "--vs", "llama.cpp")
    text = format_report(out)
    assert "GGUF tensor types: Q8_0 x" in text and "as int8" in text
    assert "llama.cpp (the same file, Q8_0)" in text


def test_non_gguf_model_vs_llama_cpp_still_writes_a_gguf(tmp_path, capsys, fake_llama_cpp, make_checkpoint):
    from conftest import TINY_GQA

    folder = make_checkpoint(dict(TINY_GQA), seed=3)
    out = bench_json(capsys, "--model", str(folder), "--vs", "llama.cpp", "--quantize", "int8")
    [(loaded, data)] = fake_llama_cpp
    assert loaded.suffix == ".gguf" and folder not in loaded.parents and data[:4] == b"GGUF"
    assert out["llamacpp"]["gguf_type"] == "q8_0" and out["llamacpp"]["gguf_file"] is None
    assert out["gguf_types"] is None and not loaded.exists()  # the written copy is gone after the run


def test_quantized_gguf_vs_hf_is_refused(tmp_path, capsys):
    assert main(["bench", "--model", str(tiny_gguf(tmp_path, "q4_0")), "--vs", "hf", "--gen-len", "1"]) == 1
    assert "--vs llama.cpp" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("gguf") is None,
                    reason="llama-cpp-python and gguf not installed")
def test_bench_gguf_file_vs_llama_cpp(tmp_path, capsys):
    path = tiny_gguf(tmp_path, "q4_0")
    out = bench_json(capsys, "--model", str(path), "--vs", "llama.cpp", "--batch-size", "2")
    peer = out["llamacpp"]
    assert peer["gguf_file"] == str(path) and peer["gguf_type"] == "Q4_0"
    assert peer["decode_tok_s"] > 0 and out["decode_tok_s"] > 0 and out["vs_llamacpp_ratio"] > 0


def test_gguf_quantize_flag_applies_at_the_load(tmp_path, capsys, fake_llama_cpp):
    path = tiny_gguf(tmp_path, "q4_0")
    out = bench_json(capsys, "--model", str(path), "--vs", "llama.cpp", "--quantize", "int8")
    assert out["quantize"] == "int8" and out["llamacpp"]["gguf_type"] == "Q4_0"  # llama.cpp: the file as it is
    [(loaded, _)] = fake_llama_cpp
    assert loaded.resolve() == path.resolve()
