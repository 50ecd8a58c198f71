"""`nabla generate`, `nabla chat` and `nabla explain --json` on tiny transformers-saved Qwen2, Gemma 2 and
Phi-3 folders (TinyLlama's tokenizer, each family's published chat template): the same greedy tokens as
transformers' generate on that model, and explain's probabilities equal the softmax of transformers'
logits. Run in-process through nabla.cli.main (the command line a user types, without a fresh Python
per command: the machine is small)."""

import io
import json

import pytest
import torch
from hf_families import save_family, set_chat_template, template_ids
from tokenizer.family_templates import GEMMA2, PHI35, QWEN3, QWEN25

from nabla.cli import main

PROMPT = "Once upon a time there was"
TEMPLATES = {"qwen2": QWEN25, "gemma2": GEMMA2, "phi3": PHI35}
STEPS = 10


@pytest.fixture(scope="module", params=sorted(TEMPLATES))
def family(request, tmp_path_factory):
    """(folder, transformers' model, transformers' tokenizer) of one family."""
    pytest.importorskip("transformers")
    path, model = save_family(tmp_path_factory.mktemp(request.param), request.param)
    return path, model, set_chat_template(path, TEMPLATES[request.param])


def run(capsys, monkeypatch, *args, stdin=""):
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    code = main([*args, "--max-seq-len", "96", "--device", "cpu", "--dtype", "fp32", "--temperature", "0"])
    out = capsys.readouterr()
    assert code == 0, out.err
    return out.out


def greedy(model, ids: list[int], steps: int = STEPS) -> list[int]:
    """transformers' greedy continuation of `ids`, cut at the end-of-text token as nabla stops there."""
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=steps, do_sample=False, eos_token_id=2,
                             pad_token_id=0)
    new = out[0, len(ids):].tolist()
    return new[:new.index(2)] if 2 in new else new


def decode(path, ids):
    from nabla.tokenizer import load_tokenizer

    return load_tokenizer(path / "tokenizer.json").decode(ids)


def test_generate_equals_transformers(family, capsys, monkeypatch):
    path, model, ref = family
    got = json.loads(run(capsys, monkeypatch, "generate", PROMPT, "--model", str(path), "--max-gen-len",
                         str(STEPS), "--json"))
    ids = ref(PROMPT)["input_ids"]
    assert got["tokens"] == greedy(model, ids)
    assert len(got["tokens"]) > 0


def test_chat_equals_transformers(family, capsys, monkeypatch):
    path, model, ref = family
    dialog = [{"role": "user", "content": "Hello, who are you?"}]
    out = run(capsys, monkeypatch, "chat", "--model", str(path), "--max-gen-len", str(STEPS),
              stdin=dialog[0]["content"] + "\n/exit\n")
    want = greedy(model, template_ids(ref, dialog))
    assert want and out == "> " + decode(path, want) + "\n> "


def test_explain_equals_transformers_softmax(family, capsys, monkeypatch):
    path, model, ref = family
    got = json.loads(run(capsys, monkeypatch, "explain", PROMPT, "--model", str(path), "--max-gen-len",
                         str(STEPS), "--top-k-shown", "4", "--json"))
    ids = ref(PROMPT)["input_ids"]
    assert got["prompt_tokens"] == ids and got["tokens"] == greedy(model, ids)
    chosen = [s for s in got["steps"] if not s["prompt"]]
    with torch.no_grad():
        logits = model(torch.tensor([ids + [s["token"] for s in chosen]])).logits[0].double()
    probs = torch.softmax(logits, -1)
    for i, step in enumerate(chosen):
        p = probs[len(ids) - 1 + i]
        top = torch.topk(p, 4)
        assert [a["token"] for a in step["alternatives"]] == top.indices.tolist()
        assert [a["prob"] for a in step["alternatives"]] == pytest.approx(top.values.tolist(), abs=1e-4)
        assert step["prob"] == pytest.approx(float(p[step["token"]]), abs=1e-4)


def test_chat_template_kwargs_on_the_command_line(tmp_path, capsys, monkeypatch):
    """nabla chat --chat-template-kwargs: Qwen3 without thinking answers transformers' enable_thinking=False
    prompt; a value that is not a JSON object is one clear line."""
    pytest.importorskip("transformers")
    path, model = save_family(tmp_path, "qwen3")
    ref = set_chat_template(path, QWEN3)
    dialog = [{"role": "user", "content": "Hi"}]
    out = run(capsys, monkeypatch, "chat", "--model", str(path), "--max-gen-len", "6",
              "--chat-template-kwargs", '{"enable_thinking": false}', stdin="Hi\n/exit\n")
    want = greedy(model, template_ids(ref, dialog, enable_thinking=False), 6)
    assert want and out == "> " + decode(path, want) + "\n> "
    assert want != greedy(model, template_ids(ref, dialog), 6)  # the variable changed the prompt it answered
    for bad, words in (("enable_thinking", "not valid JSON"), ("[1]", "must be an object")):
        monkeypatch.setattr("sys.stdin", io.StringIO("Hi\n"))
        assert main(["chat", "--model", str(path), "--chat-template-kwargs", bad]) == 1
        err = capsys.readouterr().err
        assert "--chat-template-kwargs" in err and words in err and "Traceback" not in err
