"""nabla on a CUDA GPU, against the CPU and transformers. Skipped where torch sees no GPU (CI).

Run on a GPU machine with `python -m pytest -q tests/gpu`. The rest of the suite
pins the CPU (tests/conftest.py sets NABLA_DEVICE=cpu); these tests name the GPU.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import threading

import pytest
import torch
from conftest import TINY_GQA, TINY_MHA, random_state
from hf_reference import hf_model_from_meta

from nabla import Llama
from nabla.checkpoint.meta import args_from_params
from nabla.model import Transformer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

GPU = "cuda"
PROMPTS = [[1, 15043, 3186], [1, 450, 4996, 17354, 1701, 975]]  # unequal lengths: the padded path
ROPE31 = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=1, vocab_size=300, multiple_of=16,
              rope_theta=500000.0, use_scaled_rope=True)


@pytest.fixture(autouse=True)
def exact_fp32():
    """fp32 products in full precision (no TF32), as on the CPU."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def model_on(params, device, dtype=torch.float32, seed=0):
    args = args_from_params(dict(params))
    model = Transformer(args).eval()
    model.load_state_dict(random_state(args, seed), strict=False)
    return model.to(device=device, dtype=dtype), args


def test_build_picks_the_gpu_and_its_dtype(make_checkpoint, monkeypatch):
    monkeypatch.delenv("NABLA_DEVICE")
    llama = Llama.build(make_checkpoint(TINY_MHA), None, max_seq_len=32, max_batch_size=1)
    p = next(llama.model.parameters())
    assert p.device.type == "cuda"
    assert p.dtype == (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    assert llama.model.layers[0].attention.cache.k.device.type == "cuda"
    (out,), _ = llama.generate([PROMPTS[0]], max_gen_len=4, temperature=0)  # prompts are plain lists
    assert len(out) == 4


@pytest.mark.parametrize("params", [TINY_MHA, TINY_GQA, ROPE31], ids=["mha", "gqa", "llama3.1-rope"])
def test_fp32_logits_on_gpu_equal_transformers_on_cpu(params):
    model, args = model_on(params, GPU)
    hf = hf_model_from_meta(random_state(args, 0), args)
    tokens = torch.randint(0, args.vocab_size, (2, 100), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(tokens.to(GPU)).cpu()
        theirs = hf(tokens).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_generate_on_gpu_equals_cpu(make_checkpoint):
    path = make_checkpoint(TINY_GQA, seed=2)
    cpu = Llama.build(path, None, max_seq_len=48, max_batch_size=2, device="cpu")
    gpu = Llama.build(path, None, max_seq_len=48, max_batch_size=2, device=GPU, dtype="fp32")
    for echo in (False, True):
        a, alp = cpu.generate(PROMPTS, max_gen_len=12, temperature=0, logprobs=True, echo=echo)
        b, blp = gpu.generate(PROMPTS, max_gen_len=12, temperature=0, logprobs=True, echo=echo)
        assert a == b
        for x, y in zip(alp, blp):
            torch.testing.assert_close(torch.tensor(y), torch.tensor(x), atol=1e-4, rtol=1e-4)
    text_cpu = cpu.text_completion(["Once upon a time"], temperature=0, max_gen_len=10)
    text_gpu = gpu.text_completion(["Once upon a time"], temperature=0, max_gen_len=10)
    assert text_gpu == text_cpu
    chat = [[{"role": "user", "content": "Hi"}]]
    assert gpu.chat_completion(chat, temperature=0, max_gen_len=6) == \
        cpu.chat_completion(chat, temperature=0, max_gen_len=6)


def test_sampling_on_gpu_follows_the_seed(make_checkpoint):
    llama = Llama.build(make_checkpoint(TINY_MHA), None, max_seq_len=48, max_batch_size=2, device=GPU,
                        dtype="fp32")
    runs = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        runs.append(llama.generate(PROMPTS, max_gen_len=16, temperature=1.0, top_p=0.95)[0])
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_bf16_on_gpu_is_as_close_to_fp32_as_transformers_bf16():
    """Both bf16 implementations drift from fp32; ours may not drift much further than transformers'."""
    ref, args = model_on(TINY_GQA, GPU)
    ours, _ = model_on(TINY_GQA, GPU, torch.bfloat16)
    hf = hf_model_from_meta(random_state(args, 0), args).to(GPU, torch.bfloat16)
    tokens = torch.randint(0, args.vocab_size, (2, 64), generator=torch.Generator().manual_seed(3)).to(GPU)
    with torch.no_grad():
        exact = ref(tokens)
        err_ours = (ours(tokens).float() - exact).norm() / exact.norm()
        err_hf = (hf(tokens).logits.float() - exact).norm() / exact.norm()
    print(f"bf16 relative error: nabla {err_ours:.2e}, transformers {err_hf:.2e}")
    assert err_ours < 2 * err_hf + 1e-3


@pytest.mark.parametrize("mode,rel", [("int8", 0.05), ("int4", 0.3)])
def test_quantized_on_gpu_close_to_fp32(make_checkpoint, mode, rel):
    path = make_checkpoint(TINY_MHA, seed=3)
    fp32 = Llama.build(path, None, max_seq_len=64, max_batch_size=1, device=GPU, dtype="fp32")
    q = Llama.build(path, None, max_seq_len=64, max_batch_size=1, device=GPU, dtype="fp32", quantize=mode)
    tokens = torch.tensor([PROMPTS[1]], device=GPU)
    with torch.no_grad():
        ref, out = fp32.model(tokens), q.model(tokens)
    assert out.device.type == torch.device(GPU).type
    assert (out - ref).norm() / ref.norm() < rel
    (tokens_q,), _ = q.generate([PROMPTS[0]], max_gen_len=8, temperature=0)
    assert len(tokens_q) == 8


def test_explain_on_gpu_equals_cpu(make_checkpoint):
    path = make_checkpoint(TINY_GQA, seed=3)
    cpu = Llama.build(path, None, max_seq_len=64, max_batch_size=1, device="cpu")
    gpu = Llama.build(path, None, max_seq_len=64, max_batch_size=1, device=GPU, dtype="fp32")
    a = cpu.explain("Once upon a time", max_gen_len=6, temperature=0)
    b = gpu.explain("Once upon a time", max_gen_len=6, temperature=0)
    assert [s.token for s in a.steps] == [s.token for s in b.steps]
    for x, y in zip(a.steps, b.steps):
        assert y.prob == pytest.approx(x.prob, abs=1e-4)


def test_server_engine_on_gpu_equals_generate(make_checkpoint):
    """Continuous batching on the GPU: sequences joining mid-flight each equal generate alone."""
    from nabla.server.batching import Engine, FinishEvent, SamplingParams, Sequence, TokenEvent

    llama = Llama.build(make_checkpoint(TINY_MHA), None, max_seq_len=64, max_batch_size=3, device=GPU,
                        dtype="fp32")
    prompts = [[1, 15043], [1, 450, 4996, 17354], [1, 306], [1, 1724, 338, 263, 1243], [1, 29871]]
    lengths = [9, 4, 12, 6, 8]
    expected = [llama.generate([p], max_gen_len=n, temperature=0)[0][0] for p, n in zip(prompts, lengths)]
    engine = Engine(llama.model, llama.tokenizer.stop_ids)
    outputs: dict[int, list[int]] = {}
    done = threading.Semaphore(0)

    def sink(i, events):
        for ev in events:
            if isinstance(ev, TokenEvent):
                outputs.setdefault(i, []).append(ev.token)
            elif isinstance(ev, FinishEvent):
                done.release()

    engine.start()
    try:
        for i, (p, n) in enumerate(zip(prompts, lengths)):
            engine.submit([Sequence(p, SamplingParams(n, temperature=0), lambda ev, i=i: sink(i, ev))])
        for _ in prompts:
            assert done.acquire(timeout=60)
    finally:
        engine.stop()
    assert [outputs.get(i, []) for i in range(len(prompts))] == expected


def test_training_on_gpu_lowers_the_loss_and_loads_on_cpu(tmp_path):
    from training.conftest import TINY, write_stories

    from nabla.training import train
    from nabla.training.data import parse_sources, train_tokenizer

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_stories(corpus / "stories.txt", 600)
    tok = train_tokenizer(parse_sources([str(corpus)]), tmp_path / "tokenizer.model", vocab_size=320)
    out = tmp_path / "run"
    summary = train(data=[str(corpus)], out=str(out), **{**TINY, "tokenizer": str(tok), "steps": 40,
                                                        "lr": 3e-3, "device": GPU})
    rows = list(csv.DictReader(open(out / "log.csv")))
    assert summary["val_loss"] < 0.5 * float(rows[0]["train_loss"])  # as on the CPU (tests/training)
    llama = Llama.build(out, None, max_seq_len=64, max_batch_size=1, device="cpu")
    text = llama.text_completion(["Once upon a time"], temperature=0.0, max_gen_len=12)[0]["generation"]
    assert text.strip()


def test_cli_generate_with_the_built_in_model_on_gpu(monkeypatch, capsys):
    from nabla.cli import main

    args = ["generate", "Once upon a time", "--temperature", "0", "--max-gen-len", "24", "--dtype", "fp32"]
    assert main(args) == 0  # NABLA_DEVICE=cpu
    cpu = capsys.readouterr().out
    monkeypatch.delenv("NABLA_DEVICE")
    torch.cuda.reset_peak_memory_stats()
    assert main(args) == 0
    assert torch.cuda.max_memory_allocated() > 0  # it ran on the GPU
    assert capsys.readouterr().out == cpu


@pytest.mark.skipif(torch.cuda.device_count() != 1, reason="checks one GPU shared by two processes")
def test_two_processes_on_one_gpu_get_a_clear_error(make_checkpoint):
    env = {**os.environ}
    env.pop("NABLA_DEVICE", None)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "nabla",
                        "generate", "--model", str(make_checkpoint(TINY_MHA)), "--model-parallel-size", "2",
                        "Hello"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode != 0
    assert "NCCL runs one process per GPU" in r.stderr


def test_recorded_decode_on_gpu_equals_plain_decode(make_checkpoint):
    """CUDA graphs of the decode step (nabla.model.graphs) give the plain forward's tokens and logprobs,
    across a bucket boundary (256 cache positions)."""
    from nabla.model.graphs import plain_steps

    path = make_checkpoint(TINY_GQA, seed=2)
    plain = Llama.build(path, None, max_seq_len=600, max_batch_size=2, device=GPU, dtype="fp32")
    plain_steps(plain.model)  # never records
    fast = Llama.build(path, None, max_seq_len=600, max_batch_size=2, device=GPU, dtype="fp32")
    plain.tokenizer.stop_ids = fast.tokenizer.stop_ids = ()
    plain.stop_ids = fast.stop_ids = ()  # run the full length
    a, alp = plain.generate(PROMPTS, max_gen_len=300, temperature=0, logprobs=True)
    b, blp = fast.generate(PROMPTS, max_gen_len=300, temperature=0, logprobs=True)
    assert sorted(k[1] for k in fast.model.step_graphs.graphs) == [256, 512]
    assert a == b
    torch.testing.assert_close(torch.tensor(blp), torch.tensor(alp), atol=1e-4, rtol=1e-4)
