"""`nabla generate` and `nabla chat` end to end, in a fresh process as a user runs them."""

import json
import subprocess
import sys

import pytest
from conftest import TINY_MHA

from nabla import Llama


def nabla(*args, input=None):
    return subprocess.run([sys.executable, "-m", "nabla", *args], capture_output=True, text=True,
                          input=input, timeout=300)


def test_generate_streams_the_same_tokens_as_the_api(make_checkpoint):
    ckpt = make_checkpoint(TINY_MHA)
    out = nabla("generate", "Once upon a time", "--model", str(ckpt), "--max-gen-len", "12",
                "--temperature", "0", "--json")
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    llama = Llama.build(ckpt, None, max_seq_len=2048, max_batch_size=1)
    (expected,), (lps,) = llama.generate([llama.tokenizer.encode("Once upon a time", True, False)], 12,
                                         temperature=0, logprobs=True)
    assert got["tokens"] == expected
    assert got["generation"] == llama.tokenizer.decode(expected)
    assert got["logprobs"] == pytest.approx(lps, abs=1e-5)

    text = nabla("generate", "Once upon a time", "--model", str(ckpt), "--max-gen-len", "12",
                 "--temperature", "0")
    assert text.returncode == 0, text.stderr
    full = llama.tokenizer.decode(llama.tokenizer.encode("Once upon a time", True, False) + expected)
    assert text.stdout.rstrip("\n") == full


def test_generate_bad_input_is_one_clear_line(tmp_path, make_checkpoint):
    out = nabla("generate", "hi", "--model", str(tmp_path / "missing"))
    assert out.returncode == 1
    assert "does not exist" in out.stderr and "Traceback" not in out.stderr
    out = nabla("generate", "hi", "--model", str(make_checkpoint(TINY_MHA)), "--temperature", "-1")
    assert out.returncode == 1 and "temperature" in out.stderr and "Traceback" not in out.stderr


def test_a_vanishing_temperature_is_greedy(make_checkpoint):
    ckpt = str(make_checkpoint(TINY_MHA))
    greedy = nabla("generate", "hi", "--model", ckpt, "--max-gen-len", "6", "--temperature", "0", "--json")
    tiny = nabla("generate", "hi", "--model", ckpt, "--max-gen-len", "6", "--temperature", "1e-300", "--json")
    assert tiny.returncode == 0 and "Traceback" not in tiny.stderr, tiny.stderr
    assert json.loads(tiny.stdout)["tokens"] == json.loads(greedy.stdout)["tokens"]


def test_chat_repl_answers_and_trims(make_checkpoint):
    ckpt = make_checkpoint(TINY_MHA)
    out = nabla("chat", "--model", str(ckpt), "--max-seq-len", "64", "--max-gen-len", "8", "--temperature", "0",
                input="Hello there\n" + "tell me a long story please " * 7 + "\n/exit\n")
    assert out.returncode == 0, out.stderr
    assert "dropped the oldest turn" in out.stderr
    assert out.stdout.count("> ") >= 2
