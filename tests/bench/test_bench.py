"""`nabla bench` end to end on the smallest shape (numbers recorded, never asserted)."""

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
