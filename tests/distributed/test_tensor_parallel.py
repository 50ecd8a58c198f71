"""Tensor-parallel inference: 2 CPU processes (gloo, launched by torchrun) give the
single-process tokens and logprobs, from Meta checkpoints of MP 1, 2 and 4 and from a
Hugging Face folder; plus the launch errors, checked in this process.

One torchrun launch runs every case (tests/distributed/tp_worker.py) to keep it quick.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import LLAMA2_TOKENIZER, TINY_GQA, TINY_MHA, random_state, write_meta_checkpoint

from nabla import Llama
from nabla.checkpoint.meta import args_from_params
from nabla.errors import ConfigError

PROMPTS = [[1, 15043, 3186], [1, 450, 4996, 17354, 1701]]  # two lengths: the padded batch path too
GEN = 6
CLI_PROMPT = "Hello world"
WORKER = Path(__file__).with_name("tp_worker.py")

# How Meta's fairscale layers cut a Llama 2 state into MP shards (written out
# here, independently of nabla.checkpoint.shards).
META_SPLIT_DIM = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1,
                  "tok_embeddings": 1}


def write_meta_mp(path: Path, params: dict, state: dict, n: int) -> Path:
    """A Meta folder with consolidated.00.pth .. consolidated.{n-1}.pth."""
    path.mkdir(parents=True)
    (path / "params.json").write_text(json.dumps(params))
    (path / "tokenizer.model").write_bytes(LLAMA2_TOKENIZER.read_bytes())
    for r in range(n):
        shard = {}
        for key, t in state.items():
            d = META_SPLIT_DIM.get(key.split(".")[-2])
            shard[key] = t if d is None else t.chunk(n, dim=d)[r].clone()
        torch.save(shard, path / f"consolidated.{r:02d}.pth")
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from nabla.checkpoint.hf import save_hf_checkpoint

    root = tmp_path_factory.mktemp("tp")
    out = {}
    for name, params in (("mha", TINY_MHA), ("gqa", TINY_GQA)):
        state = random_state(args_from_params(dict(params)), seed=3)
        out[f"{name}-mp1"] = write_meta_checkpoint(root / f"{name}-mp1", params, state)
        out[f"{name}-mp2"] = write_meta_mp(root / f"{name}-mp2", params, state, 2)
        if name == "mha":
            out["mha-mp4"] = write_meta_mp(root / "mha-mp4", params, state, 4)
    # A Hugging Face folder (safetensors) of a GQA model with a tied output head.
    args = args_from_params(dict(TINY_GQA), tie_word_embeddings=True)
    save_hf_checkpoint(root / "gqa-tied-hf", random_state(args, seed=4), args)
    out["gqa-tied-hf"] = root / "gqa-tied-hf"
    return out


def reference(folder: Path, tokenizer=None):
    """Greedy tokens and logprobs, sampled tokens, and parameter bytes in one process."""
    llama = Llama.build(folder, tokenizer, max_seq_len=64, max_batch_size=2)
    tokens, lps = llama.generate(PROMPTS, GEN, temperature=0.0, logprobs=True)
    torch.manual_seed(7)
    sampled, _ = llama.generate(PROMPTS, GEN, temperature=1.0, top_p=0.95)
    m = llama.model
    full = sum(p.numel() * p.element_size() for p in {id(p): p for p in m.parameters()}.values())
    replicated = sum(p.numel() * p.element_size() for n, p in m.named_parameters() if n.endswith("norm.weight"))
    return dict(tokens=tokens, logprobs=lps, sampled=sampled, full=full, replicated=replicated)


@pytest.fixture(scope="module")
def ranks(folders, tmp_path_factory):
    out = tmp_path_factory.mktemp("tp-out")
    cases = [dict(name=k, ckpt=str(v), prompts=PROMPTS, max_gen_len=GEN,
                  tokenizer=str(LLAMA2_TOKENIZER) if k.endswith("hf") else None) for k, v in folders.items()]
    cases.append(dict(name="follow", ckpt=str(folders["gqa-mp2"]), follow=True, prompts=PROMPTS, max_gen_len=GEN))
    cases[0]["cli"] = ["generate", "--model", str(folders["mha-mp2"]), "--temperature", "0", "--max-gen-len",
                       str(GEN), "--json", "--model-parallel-size", "2", CLI_PROMPT]
    (out / "cases.json").write_text(json.dumps(cases))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    # --standalone: a rendezvous on a free local port.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(WORKER), str(out / "cases.json"), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    results = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    return results, proc.stdout, torch.load(out / "follow.pt", weights_only=True)


@pytest.fixture(scope="module")
def references(folders):
    """One single-process reference per set of weights (the MP=1 folder, or the HF one)."""
    return {"mha": reference(folders["mha-mp1"]), "gqa": reference(folders["gqa-mp1"]),
            "hf": reference(folders["gqa-tied-hf"], LLAMA2_TOKENIZER)}


@pytest.mark.parametrize("name", ["mha-mp1", "mha-mp2", "mha-mp4", "gqa-mp1", "gqa-mp2", "gqa-tied-hf"])
def test_two_ranks_match_one_process(name, folders, ranks, references):
    results = ranks[0]
    ref = references["hf" if name.endswith("hf") else name[:3]]
    params = TINY_GQA if name.startswith("gqa") else TINY_MHA
    for r, res in enumerate(results):
        got = res[name]
        assert got["tokens"] == ref["tokens"], f"rank {r}"
        for a, b in zip(got["logprobs"], ref["logprobs"]):
            torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-5, rtol=0)
        assert got["sampled"] == ref["sampled"], f"rank {r}: same seed, same full logits, same samples"
        # This rank's heads only, and a key/value cache of only those heads.
        assert got["n_heads"] == params["n_heads"] // 2
        assert got["n_kv_heads"] == got["cache_heads"] == params["n_kv_heads"] // 2
        # Half of every split weight, the (small) norms in full.
        assert got["param_bytes"] == (ref["full"] - ref["replicated"]) // 2 + ref["replicated"]
    assert results[0][name]["logprobs"] == results[1][name]["logprobs"]  # bit-identical on every rank


def test_cli_prints_once(folders, ranks):
    stdout = ranks[1]
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, stdout  # rank 1 ran the same loop but printed nothing
    got = json.loads(lines[0])
    llama = Llama.build(folders["mha-mp1"], None, max_seq_len=2048, max_batch_size=1)  # the CLI's defaults
    ids = llama.tokenizer.encode(CLI_PROMPT, bos=True, eos=False)
    want, _ = llama.generate([ids], GEN, temperature=0.0)
    assert got["tokens"] == want[0]


def test_rank_0_leads_and_rank_1_follows(folders, ranks):
    """Only rank 0 calls the model (as the server does); rank 1 runs each call it is sent."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("tp_worker", WORKER)
    tp_worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tp_worker)
    results, _, got = ranks
    assert results[1]["follow"]["calls"] > 5  # prefill and decode steps, the batched step, the hidden pass
    want = tp_worker.run_calls(Llama.build(folders["gqa-mp1"], None, max_seq_len=64, max_batch_size=2))
    assert got["tokens"] == want["tokens"]
    torch.testing.assert_close(torch.tensor(got["logprobs"]), torch.tensor(want["logprobs"]), atol=1e-5, rtol=0)
    torch.testing.assert_close(got["step"], want["step"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["hidden"], want["hidden"], atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------ launch errors
@pytest.fixture
def no_torchrun(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    return monkeypatch


def test_model_parallel_without_torchrun_says_how_to_launch(folders, no_torchrun):
    with pytest.raises(ConfigError, match=r"torchrun --nproc_per_node 2"):
        Llama.build(folders["mha-mp1"], None, max_seq_len=32, model_parallel_size=2)


def test_model_parallel_size_must_match_world(folders, no_torchrun):
    no_torchrun.setenv("WORLD_SIZE", "4")
    with pytest.raises(ConfigError, match=r"model_parallel_size=2 but there are 4 processes"):
        Llama.build(folders["mha-mp1"], None, max_seq_len=32, model_parallel_size=2)


@pytest.mark.parametrize("bad", [0, -2, "2", 1.5, True])
def test_model_parallel_size_must_be_a_positive_int(folders, no_torchrun, bad):
    with pytest.raises(ConfigError, match="model_parallel_size must be a positive integer"):
        Llama.build(folders["mha-mp1"], None, max_seq_len=32, model_parallel_size=bad)


def test_heads_that_do_not_divide(folders, no_torchrun):
    # WORLD_SIZE=3 under torchrun, size from the world; 4 heads cannot be split 3 ways.
    no_torchrun.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match=r"n_heads=4, n_kv_heads=2, vocab_size=32000 are not a multiple of 3"
                                          r".*sizes that fit this model: 1, 2$"):
        Llama.build(folders["gqa-mp1"], None, max_seq_len=32)


def test_one_process_stays_one_process(folders, no_torchrun):
    llama = Llama.build(folders["mha-mp2"], None, max_seq_len=32, model_parallel_size=1)
    assert isinstance(llama.model.layers[0].attention.wq, torch.nn.Linear)  # not a parallel slice


# -------------------------------------------------- slicing straight from shards
@pytest.mark.parametrize("files_mp", [1, 2, 4])
@pytest.mark.parametrize("vocab_split_files", [False, True])  # Llama 2 files (vectors) / Llama 3 (vocabulary)
def test_rank_state_is_the_slice_of_the_full_weights(files_mp, vocab_split_files):
    from nabla.distributed import rank_state

    args = args_from_params(dict(TINY_MHA, vocab_size=512))
    state = random_state(args, seed=5)
    split = dict(META_SPLIT_DIM, tok_embeddings=0 if vocab_split_files else 1)
    shards = [{k: (t if split.get(k.split(".")[-2]) is None else t.chunk(files_mp, split[k.split(".")[-2]])[r])
               for k, t in state.items()} for r in range(files_mp)]
    run_dim = dict(META_SPLIT_DIM, tok_embeddings=0)  # at run time the vocabulary is split
    for world in (1, 2, 4):
        for rank in range(world):
            got = rank_state(shards, rank, world, dim=args.dim)
            assert set(got) == set(state)
            for key, full in state.items():
                d = run_dim.get(key.split(".")[-2])
                want = full if d is None else full.chunk(world, d)[rank]
                assert got.shapes[key] == tuple(want.shape), key
                assert torch.equal(got[key], want), (key, world, rank)


def test_lead_and_only_rank_0_runs_do_nothing_in_one_process(folders, no_torchrun):
    from nabla.distributed import lead, only_rank_0_runs

    llama = Llama.build(folders["gqa-mp1"], None, max_seq_len=32, max_batch_size=1)
    only_rank_0_runs(llama.model)  # returns: this process is rank 0 of 1
    release = lead(llama.model)
    want, _ = llama.generate([PROMPTS[0]], 3, temperature=0.0)
    release()
    assert not llama.model._forward_pre_hooks
    assert want == references_tokens(folders["gqa-mp1"])


def references_tokens(folder):
    out, _ = Llama.build(folder, None, max_seq_len=32, max_batch_size=1).generate([PROMPTS[0]], 3, temperature=0.0)
    return out
