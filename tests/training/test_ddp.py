"""Two CPU processes under torchrun (gloo) train the same weights as one at the same global batch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_MHA

from nabla.training import train
from nabla.training.finetune import finetune

from .conftest import TINY


def torchrun(cmd: list[str], env: dict, timeout: int, out: Path) -> subprocess.CompletedProcess:
    """Run `cmd` under torchrun, once more from an empty `out` when a process aborted at exit.

    A gloo process of torch 2.13 has aborted once in CI at exit, after its run was saved and the group
    destroyed ("terminate called without an active exception", SIGABRT); 30 runs here, some under load, never did. A
    second abort, or any other failure, still fails the test.
    """
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 and "terminate called without an active exception" in proc.stderr:
        shutil.rmtree(out, ignore_errors=True)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    return proc


def test_two_process_ddp_matches_one_process(corpus, tokenizer_path, tmp_path):
    common = ["--data", str(corpus), "--tokenizer", str(tokenizer_path), "--preset", "tiny",
              "--seq-len", "32", "--batch-size", "4", "--grad-accum", "2", "--steps", "4",
              "--warmup", "1", "--eval-every", "100", "--eval-tokens", "256", "--seed", "5", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "nabla", "train", "--out", str(tmp_path / "ddp"), *common]
    proc = torchrun(cmd, env, 120, tmp_path / "ddp")
    assert proc.returncode == 0, proc.stderr[-3000:]
    train(data=[str(corpus)], out=str(tmp_path / "one"), tokenizer=str(tokenizer_path),
          **{**TINY, "batch_size": 4, "grad_accum": 2, "steps": 4, "warmup": 1, "eval_every": 100,
             "eval_tokens": 256, "seed": 5})
    a = torch.load(tmp_path / "ddp" / "train_state.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "one" / "train_state.pt", weights_only=True)["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def test_two_process_finetune_matches_one_process(make_checkpoint, tmp_path):
    """`nabla finetune` under torchrun (2 CPU processes, gloo) trains the adapter one process trains."""
    if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available: torchrun cannot run on CPU here")
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"What does the parrot say, number {i}?"},
        {"role": "assistant", "content": f"Biscuit says the nutmeg costs {i} pearls."}]}) + "\n" for i in range(40)))
    ckpt = str(make_checkpoint(TINY_MHA))
    settings = dict(seq_len=16, batch_size=2, grad_accum=2, steps=3, warmup=1, eval_every=100, eval_tokens=64,
                    val_fraction=0.2, rank=4, lr=1e-2, seed=5)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "nabla", "finetune", "--model", ckpt, "--data", str(chats), "--out", str(tmp_path / "ddp"),
           "--no-progress", "--device", "cpu"]
    for k, v in settings.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    proc = torchrun(cmd, env, 180, tmp_path / "ddp")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "nabla finetune:" in proc.stderr and "on 2 x cpu" in proc.stderr
    finetune(model=ckpt, data=[str(chats)], out=str(tmp_path / "one"), progress=False, device="cpu", **settings)

    from safetensors.torch import load_file

    a, b = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("ddp", "one"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
