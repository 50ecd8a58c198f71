"""`--lora-modules`: the base and two LoRA adapters served together, sharing decode steps, each as it runs alone."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import TINY_MHA

from nabla import Llama
from nabla.checkpoint.peft import adapter_of, write_adapter
from nabla.cli import main
from nabla.model.lora import LoraSettings, add_lora, lora_layers
from server.conftest import MODEL, LiveServer, admission_paused

PROMPT = [1, 450, 4996, 17354, 1701, 432]
MAX_TOKENS = 8


def make_adapter(ckpt, out, settings: LoraSettings, seed: int):
    """A nabla LoRA adapter on the checkpoint, with random (non-zero) B so that it changes the output."""
    llama = Llama.build(ckpt, max_seq_len=64, max_batch_size=1)
    add_lora(llama.model, settings)
    torch.manual_seed(seed)
    with torch.no_grad():
        for m in lora_layers(llama.model).values():
            m.lora_B.normal_(0, 0.2)
    write_adapter(out, adapter_of(llama.model), llama.model.args)
    return out


@pytest.fixture(scope="module")
def adapters(make_checkpoint, tmp_path_factory):
    ckpt = make_checkpoint(TINY_MHA)
    root = tmp_path_factory.mktemp("adapters")
    a = make_adapter(ckpt, root / "a", LoraSettings(r=4, alpha=8), seed=1)
    b = make_adapter(ckpt, root / "b", LoraSettings(r=2, alpha=3, targets=("wq", "wv", "w2"), rslora=True), seed=2)
    return ckpt, a, b


@pytest.fixture(scope="module")
def lora_server(adapters):
    from nabla.server.lora_modules import LoraModule

    ckpt, a, b = adapters
    llama = Llama.build(ckpt, max_seq_len=128, max_batch_size=4)
    s = LiveServer(llama, api_key=None, lora_modules=[LoraModule("ad-a", str(a)), LoraModule("ad-b", str(b))])
    yield s
    s.stop()


def alone(ckpt, adapter=None, merge=False):
    """Greedy tokens and their logprobs from Llama.generate on a model holding one adapter (or none)."""
    llama = Llama.build(ckpt, max_seq_len=128, max_batch_size=1, adapter=adapter, merge_adapter=merge)
    tokens, lps = llama.generate([PROMPT], MAX_TOKENS, temperature=0, logprobs=True)
    return tokens[0], lps[0]


class Recorder:
    """Wraps the model's forward to record each pass's batch size and the adapters its rows use."""

    def __init__(self, model):
        self.model, self.forward, self.passes = model, model.forward, []
        model.forward = self

    def __call__(self, tokens, *args, **kw):
        self.passes.append((tokens.shape[0], tokens.shape[1], sorted(
            -1 if k is None else k for k, _ in self.model.adapter_rows.groups)))
        return self.forward(tokens, *args, **kw)

    def undo(self):
        del self.model.forward


def test_base_and_two_adapters_share_decode_steps_and_each_equals_alone(lora_server, adapters):
    ckpt, a, b = adapters
    names = [MODEL, "ad-a", "ad-b"]
    rec = Recorder(lora_server.llama.model)
    try:
        with lora_server.http() as http, ThreadPoolExecutor(3) as pool:
            def ask(name):
                r = http.post("/v1/completions", json={"model": name, "prompt": PROMPT, "max_tokens": MAX_TOKENS,
                                                       "temperature": 0, "logprobs": 1, "ignore_eos": True})
                assert r.status_code == 200, r.text
                return r.json()

            with admission_paused(lora_server.engine):
                futures = [pool.submit(ask, n) for n in names]
                lora_server.wait_for("nabla_queue_depth", 3)
            got = {n: f.result() for n, f in zip(names, futures)}
    finally:
        rec.undo()
    # One prefill of the three rows, then decode steps of all three: base rows (-1) next to both adapters.
    assert rec.passes[0] == (3, len(PROMPT), [0, 1]), rec.passes[:3]
    shared = [p for p in rec.passes if p[0] == 3 and p[1] == 1]
    assert len(shared) == MAX_TOKENS - 1 and all(p[2] == [0, 1] for p in shared), rec.passes

    tok = lora_server.llama.tokenizer
    outputs = []
    for name, adapter in zip(names, [None, a, b]):
        body = got[name]
        assert body["model"] == name
        want_tokens, want_lps = alone(ckpt, adapter)
        lp = body["choices"][0]["logprobs"]
        assert body["choices"][0]["text"] == tok.decode(PROMPT + want_tokens)[len(tok.decode(PROMPT)):], name
        assert len(lp["token_logprobs"]) == MAX_TOKENS
        torch.testing.assert_close(torch.tensor(lp["token_logprobs"]), torch.tensor(want_lps), atol=1e-5, rtol=0)
        if adapter is not None:  # merged into the weights at load (the default) gives the same tokens
            assert alone(ckpt, adapter, merge=True)[0] == want_tokens, name
        outputs.append(want_tokens)
    assert outputs[0] != outputs[1] and outputs[0] != outputs[2] and outputs[1] != outputs[2]


def test_chat_stream_names_the_adapter(lora_server):
    client = lora_server.client()
    stream = client.chat.completions.create(model="ad-b", messages=[{"role": "user", "content": "Hi"}],
                                            max_tokens=3, temperature=0, stream=True)
    assert {c.model for c in stream} == {"ad-b"}


def test_models_lists_the_base_and_each_adapter(lora_server, adapters):
    _, a, b = adapters
    with lora_server.http() as http:
        data = http.get("/v1/models").json()["data"]
        assert [m["id"] for m in data] == [MODEL, "ad-a", "ad-b"]
        assert data[0]["parent"] is None and data[0]["root"] == MODEL
        assert [(m["root"], m["parent"]) for m in data[1:]] == [(str(a), MODEL), (str(b), MODEL)]
        assert http.get("/v1/models/ad-b").json() == data[2]
        r = http.post("/v1/completions", json={"model": "ad-c", "prompt": "Hi", "max_tokens": 2})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        assert r.json()["error"]["param"] == "model"


def test_embeddings_run_with_the_adapter(lora_server):
    with lora_server.http() as http:
        vecs = {}
        for name in (MODEL, "ad-a"):
            r = http.post("/v1/embeddings", json={"model": name, "input": "Once upon a time"})
            assert r.status_code == 200 and r.json()["model"] == name
            vecs[name] = torch.tensor(r.json()["data"][0]["embedding"])
    assert (vecs[MODEL] - vecs["ad-a"]).abs().max() > 1e-3


def test_engine_rows_with_no_adapter_add_nothing(adapters):
    """The multi-adapter layers with every row on the base give the plain model's logits exactly."""
    from nabla.checkpoint.peft import read_adapter
    from nabla.model.multi_lora import add_adapters, use_adapters

    ckpt, a, b = adapters
    plain = Llama.build(ckpt, max_seq_len=32, max_batch_size=2)
    multi = Llama.build(ckpt, max_seq_len=32, max_batch_size=2)
    add_adapters(multi.model, [read_adapter(p, multi.model.args) for p in (a, b)])
    tokens = torch.tensor([PROMPT, PROMPT[::-1]])
    with torch.no_grad(), use_adapters(multi.model, [None, None]):
        torch.testing.assert_close(multi.model(tokens), plain.model(tokens), atol=0, rtol=0)


def multi_model(ckpt, paths, batch, quantize=None):
    from nabla.checkpoint.peft import read_adapter
    from nabla.model.multi_lora import add_adapters

    llama = Llama.build(ckpt, max_seq_len=32, max_batch_size=batch, quantize=quantize)
    return add_adapters(llama.model, [read_adapter(p, llama.model.args) for p in paths])


def test_mixed_rows_equal_each_adapter_alone(adapters):
    """One pass with rows on adapter a, the base and adapter b gives each row's single-adapter logits."""
    from nabla.model.multi_lora import use_adapters

    ckpt, a, b = adapters
    multi = multi_model(ckpt, (a, b), 3)
    tokens = torch.tensor([PROMPT, PROMPT[::-1], PROMPT])
    with torch.no_grad(), use_adapters(multi, [0, None, 1]):
        got = multi(tokens)
    for row, adapter in enumerate([a, None, b]):
        one = Llama.build(ckpt, max_seq_len=32, max_batch_size=1, adapter=adapter, merge_adapter=False)
        with torch.no_grad():
            torch.testing.assert_close(got[row], one.model(tokens[row:row + 1])[0], atol=1e-5, rtol=0)


def test_adapters_on_an_int8_base(adapters):
    """The base stays quantized under the adapters. (Row by row: an int8 layer's dynamically quantized
    input is scaled over the whole batch, so on the CPU a row depends a little on its neighbours.)"""
    from nabla.model.multi_lora import use_adapters
    from nabla.model.quantize import Int8Linear

    ckpt, a, b = adapters
    multi = multi_model(ckpt, (a, b), 1, quantize="int8")
    assert isinstance(multi.layers[0].attention.wq.base, Int8Linear)
    tokens = torch.tensor([PROMPT])
    for k, adapter in ((0, a), (None, None), (1, b)):
        with torch.no_grad(), use_adapters(multi, [k]):
            got = multi(tokens)
        one = Llama.build(ckpt, max_seq_len=32, max_batch_size=1, quantize="int8", adapter=adapter,
                          merge_adapter=False)
        with torch.no_grad():
            torch.testing.assert_close(got, one.model(tokens), atol=1e-5, rtol=0)


# ----------------------------------------------------------------- bad input
def serve_error(capsys, *argv) -> str:
    assert main(["serve", *argv]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    return err[-1]


def test_bad_lora_modules_are_one_line_errors_before_serving(adapters, make_checkpoint, tmp_path, capsys):
    ckpt, a, _ = adapters
    model = ["--model", str(ckpt), "--max-seq-len", "64", "--port", "0"]
    line = serve_error(capsys, *model, "--lora-modules", f"x={tmp_path / 'nowhere'}")
    assert line.startswith("nabla serve: error: --lora-modules x=") and "not found" in line
    line = serve_error(capsys, *model, "--lora-modules", f"x={a}", f"x={a}")
    assert "--lora-modules" in line and "'x' is given twice" in line
    line = serve_error(capsys, *model, "--lora-modules", "just-a-name")
    assert "--lora-modules just-a-name: expected NAME=DIR" in line
    line = serve_error(capsys, *model, "--model-name", "base", "--lora-modules", f"base={a}")
    assert "the base model's own" in line
    line = serve_error(capsys, *model, "--lora-modules", '{"name": "x"}')
    assert "needs string fields" in line
    other = make_checkpoint(dict(TINY_MHA, dim=128))
    line = serve_error(capsys, "--model", str(other), "--max-seq-len", "64", "--port", "0",
                       "--lora-modules", f"x={a}")
    assert line.startswith("nabla serve: error: --lora-modules x=") and "another base model" in line


def test_json_form_is_read(adapters):
    from nabla.server.lora_modules import LoraModule, parse_lora_modules

    _, a, b = adapters
    got = parse_lora_modules([f'{{"name": "j", "path": "{a}", "base_model_name": "up"}}', f"k={b}"], "tiny")
    assert got == [LoraModule("j", str(a), "up"), LoraModule("k", str(b))]
