"""Two CPU processes under torchrun (gloo) train the same weights as one at the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from nabla.training import train

from .conftest import TINY


def test_two_process_ddp_matches_one_process(corpus, tokenizer_path, tmp_path):
    common = ["--data", str(corpus), "--tokenizer", str(tokenizer_path), "--preset", "tiny",
              "--seq-len", "32", "--batch-size", "4", "--grad-accum", "2", "--steps", "4",
              "--warmup", "1", "--eval-every", "100", "--eval-tokens", "256", "--seed", "5", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "nabla", "train", "--out", str(tmp_path / "ddp"), *common]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    train(data=[str(corpus)], out=str(tmp_path / "one"), tokenizer=str(tokenizer_path),
          **{**TINY, "batch_size": 4, "grad_accum": 2, "steps": 4, "warmup": 1, "eval_every": 100,
             "eval_tokens": 256, "seed": 5})
    a = torch.load(tmp_path / "ddp" / "train_state.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "one" / "train_state.pt", weights_only=True)["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
