"""Model-parallel Meta checkpoints: any MP loads in one process; split/merge/re-slice are exact."""

import json

import pytest
import torch
from conftest import TINY_GQA, TINY_MHA, random_state

from checkpoint.helpers import TOKENS, meta_folder, nabla_greedy, tiny_args
from nabla import Llama
from nabla.checkpoint import open_checkpoint
from nabla.checkpoint.shards import embedding_split_dim, merge_shards, shard_for_rank, split_state
from nabla.errors import CheckpointError


def write_shards(path, params, state, n, vocab_parallel):
    meta_folder(path, params, state)
    (path / "consolidated.00.pth").unlink()
    for i, part in enumerate(split_state(state, n, vocab_parallel_embedding=vocab_parallel)):
        torch.save(dict(part), path / f"consolidated.{i:02d}.pth")
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    state = random_state(tiny_args(TINY_MHA), seed=11)
    path = meta_folder(tmp_path_factory.mktemp("mp1"), TINY_MHA, state)
    llama = Llama.build(path, None, max_seq_len=48, max_batch_size=1, dtype="fp32")
    return state, nabla_greedy(llama, TOKENS[0], 16)


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("vocab_parallel", [False, True], ids=["llama2-embedding", "llama3-embedding"])
def test_mp_folder_gives_unsharded_tokens(tmp_path, reference, n, vocab_parallel):
    state, tokens = reference
    path = write_shards(tmp_path / "weights", TINY_MHA, state, n, vocab_parallel)
    shard0 = torch.load(path / "consolidated.00.pth", weights_only=True)
    emb = shard0["tok_embeddings.weight"].shape
    assert emb == ((32000 // n, 64) if vocab_parallel else (32000, 64 // n))
    assert shard0["layers.0.attention.wo.weight"].shape == (64, 64 // n)
    ckpt = open_checkpoint(path)
    assert ckpt.num_shards == n and ckpt.shapes["tok_embeddings.weight"] == (32000, 64)
    merged = ckpt.load_state()
    for key, value in state.items():
        assert torch.equal(merged[key], value), key
    llama = Llama.build(path, None, max_seq_len=48, max_batch_size=1, dtype="fp32")
    assert nabla_greedy(llama, TOKENS[0], 16) == tokens


def test_embedding_split_told_from_shapes():
    assert embedding_split_dim([(32000, 32), (32000, 32)], 64) == 1  # Llama 2: ParallelEmbedding
    assert embedding_split_dim([(16000, 64), (16000, 64)], 64) == 0  # Llama 3: VocabParallelEmbedding
    with pytest.raises(CheckpointError, match="fit neither"):
        embedding_split_dim([(100, 48), (100, 48)], 64)


def test_shard_for_rank_reslices_any_mp(tmp_path):
    state = random_state(tiny_args(TINY_GQA), seed=12)
    path = write_shards(tmp_path / "mp2", TINY_GQA, state, 2, vocab_parallel=False)
    merged = open_checkpoint(path).load_state()
    for r in range(4):
        ours = shard_for_rank(merged, r, 4)
        want = split_state(state, 4)[r]
        assert set(ours) == set(want)
        for key in want:
            assert torch.equal(ours[key], want[key]), key
    # world size 1 is the whole model
    whole = shard_for_rank(merged, 0, 1)
    assert all(torch.equal(whole[k], v) for k, v in state.items())
    with pytest.raises(CheckpointError, match="rank 4"):
        shard_for_rank(merged, 4, 4)


def test_split_errors():
    args = tiny_args(TINY_GQA)  # 2 kv heads
    state = random_state(args, seed=13)
    with pytest.raises(CheckpointError, match="n_kv_heads=2"):
        split_state(state, 4, args=args)
    with pytest.raises(CheckpointError, match="not a multiple of 3"):
        split_state(state, 3)


def test_shards_that_do_not_fit(tmp_path):
    state = random_state(tiny_args(TINY_MHA), seed=14)
    parts = [dict(p) for p in split_state(state, 2)]
    bad = [dict(parts[0]), dict(parts[1])]
    bad[1]["layers.0.attention.wq.weight"] = torch.zeros(32, 48)
    with pytest.raises(CheckpointError, match="wq.weight.*shard 1"):
        merge_shards(bad)
    bad = [dict(parts[0]), dict(parts[1])]
    bad[1]["norm.weight"] = torch.zeros(32)
    with pytest.raises(CheckpointError, match="norm.weight"):
        merge_shards(bad)
    bad = [dict(parts[0]), {k: v for k, v in parts[1].items() if k != "norm.weight"}]
    with pytest.raises(CheckpointError, match="different weights"):
        merge_shards(bad)
    # on disk: Llama.build says which weight does not fit, no traceback from torch
    path = meta_folder(tmp_path / "bad", TINY_MHA, state)
    (path / "consolidated.00.pth").unlink()
    parts[1]["layers.1.feed_forward.w2.weight"] = torch.zeros(48, 96)
    for i, p in enumerate(parts):
        torch.save(p, path / f"consolidated.{i:02d}.pth")
    with pytest.raises(CheckpointError, match="w2.weight"):
        Llama.build(path, None, max_seq_len=32, max_batch_size=1)


def test_params_json_dim_decides(tmp_path):
    """A folder name saying 'llama3' changes nothing: the shapes and params.json decide."""
    state = random_state(tiny_args(TINY_MHA), seed=15)
    path = write_shards(tmp_path / "Meta-Llama-3-8B", TINY_MHA, state, 2, vocab_parallel=False)
    assert json.loads((path / "params.json").read_text())["dim"] == 64
    merged = open_checkpoint(path).load_state()
    assert torch.equal(merged["tok_embeddings.weight"], state["tok_embeddings.weight"])


def test_released_pages_read_back_intact(tmp_path):
    """Dropping a mapped file's pages after the copy loses nothing: reading again gives the same values."""
    from safetensors.torch import save_file

    from nabla.checkpoint.safetensors import read_safetensors
    from nabla.checkpoint.shards import LazyState, drop_pages

    state = random_state(tiny_args(TINY_MHA), seed=16)
    path = meta_folder(tmp_path / "m", TINY_MHA, state)
    lazy = open_checkpoint(path).load_state()
    assert lazy.file_backed
    for key in state:
        torch.zeros_like(state[key]).copy_(lazy[key])
        lazy.release(key)
        assert torch.equal(lazy[key], state[key]), key
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "w.safetensors")
    mapped = LazyState.of(read_safetensors(tmp_path / "w.safetensors"), file_backed=True)
    for key in state:
        t = mapped[key]
        drop_pages(t)
        assert torch.equal(t, state[key]), key
