"""Llama.generate / text_completion / chat_completion against the reference semantics."""

import pytest
import torch

from generation.reference import reference_generate
from nabla import Llama
from nabla.tokenizer.chat import UNSAFE_ERROR

PROMPTS = ["Hello world", "Once upon a time there was a", "I"]


@pytest.fixture(scope="module")
def llama(make_checkpoint):
    from conftest import TINY_GQA

    return Llama.build(make_checkpoint(TINY_GQA, seed=1), None, max_seq_len=48, max_batch_size=4)


def encode(llama, prompts):
    return [llama.tokenizer.encode(p, bos=True, eos=False) for p in prompts]


@pytest.mark.parametrize("temperature,top_p,echo", [(0.0, 0.9, False), (0.6, 0.9, True), (1.3, 0.5, False),
                                                    (1.0, 1.0, True)])
def test_equals_reference(llama, temperature, top_p, echo):
    prompts = encode(llama, PROMPTS)
    torch.manual_seed(7)
    ours = llama.generate(prompts, max_gen_len=20, temperature=temperature, top_p=top_p, logprobs=True, echo=echo)
    torch.manual_seed(7)
    ref = reference_generate(llama.model, prompts, 20, llama.max_seq_len, llama.tokenizer.eos_id,
                             temperature=temperature, top_p=top_p, logprobs=True, echo=echo)
    assert ours[0] == ref[0]
    for a, b in zip(ours[1], ref[1]):
        assert a == pytest.approx(b, abs=1e-5)


def test_batch_independence(llama):
    prompts = encode(llama, PROMPTS)
    together, _ = llama.generate(prompts, max_gen_len=15, temperature=0)
    alone = [llama.generate([p], max_gen_len=15, temperature=0)[0][0] for p in prompts]
    assert together == alone


def test_logprobs_equal_log_softmax_of_full_forward(llama):
    (prompt,) = encode(llama, ["The little dog"])
    (toks,), (lps,) = llama.generate([prompt], max_gen_len=10, temperature=0.8, logprobs=True, echo=True)
    assert toks[: len(prompt)] == prompt and len(lps) == len(toks)
    with torch.no_grad():
        logits = llama.model(torch.tensor([toks]))
    expected = torch.log_softmax(logits[0, :-1], -1).gather(-1, torch.tensor(toks[1:])[:, None])[:, 0]
    assert lps[0] == 0.0  # the reference's buffer starts at zero: BOS has logprob 0
    assert lps[1:] == pytest.approx(expected.tolist(), abs=1e-5)


def test_seed_reproducibility(make_checkpoint):
    from conftest import TINY_GQA

    ckpt = make_checkpoint(TINY_GQA, seed=1)
    runs = []
    for seed in (5, 5, 6):
        g = Llama.build(ckpt, None, max_seq_len=48, max_batch_size=2, seed=seed)
        runs.append(g.text_completion(["Hello"], temperature=1.0, top_p=0.95, max_gen_len=12)[0]["generation"])
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


class StopAt:
    """The model's tokenizer with another token playing EOS."""

    def __init__(self, tok, eos_id):
        self.tok, self.eos_id, self.stop_ids = tok, eos_id, (eos_id,)

    def __getattr__(self, name):
        return getattr(self.tok, name)


def test_stops_at_eos(llama):
    prompts = encode(llama, ["Hi", "Hello there"])
    free, _ = llama.generate(prompts, max_gen_len=10, temperature=0)
    eos = free[1][3]  # the 4th token the second prompt generates
    stopping = Llama(llama.model, StopAt(llama.tokenizer, eos))
    toks, lps = stopping.generate(prompts, max_gen_len=10, temperature=0, logprobs=True)
    assert toks[1] == free[1][:3] and len(lps[1]) == 3
    assert eos not in toks[0]
    ref = reference_generate(llama.model, prompts, 10, llama.max_seq_len, eos, temperature=0, logprobs=True)
    assert toks == ref[0]
    # With echo the prompt comes back too, cut at the first EOS after it.
    toks, _ = stopping.generate(prompts, max_gen_len=10, temperature=0, echo=True)
    assert toks[1] == prompts[1] + free[1][:3]


def test_full_context_returns_shifted_logprobs(llama):
    """Nothing left to generate: logprobs still score token t+1 from position t."""
    toks = list(range(100, 100 + llama.max_seq_len))
    (out,), (lps,) = llama.generate([toks], max_gen_len=5, temperature=0, logprobs=True, echo=True)
    assert out == toks
    with torch.no_grad():
        logits = llama.model(torch.tensor([toks]))
    expected = torch.log_softmax(logits[0, :-1], -1).gather(-1, torch.tensor(toks[1:])[:, None])[:, 0]
    assert lps[0] == 0.0 and lps[1:] == pytest.approx(expected.tolist(), abs=1e-5)


def test_max_gen_len_default_and_cut(llama):
    res = llama.text_completion(["Hi"], temperature=0, max_gen_len=5, logprobs=True)[0]
    assert len(res["tokens"]) == len(res["logprobs"]) <= 5
    assert res["tokens"] == [llama.tokenizer.decode([t]) for t in
                             llama.generate(encode(llama, ["Hi"]), 5, temperature=0)[0][0]]
    full = llama.text_completion(["Hi"], temperature=0)[0]  # max_gen_len None: max_seq_len - 1
    assert full["generation"].startswith(res["generation"])


def test_stream_matches_generate(llama):
    (prompt,) = encode(llama, ["Once upon"])
    (expected,), (lps,) = llama.generate([prompt], max_gen_len=16, temperature=0, logprobs=True)
    pieces = list(llama.stream(prompt, max_gen_len=16, temperature=0, logprobs=True))
    assert [p.token for p in pieces] == expected
    assert [p.logprob for p in pieces] == pytest.approx(lps, abs=1e-6)
    assert "".join(p.text for p in pieces) == llama.tokenizer.decode(expected)


def test_chat_completion_llama2_format(llama):
    tok = llama.tokenizer
    dialog = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
              {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": " Name a fruit. "}]
    expected = (tok.encode("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello! ", bos=True, eos=True)
                + tok.encode("[INST] Name a fruit. [/INST]", bos=True, eos=False))
    assert llama.encode_chat(dialog) == expected
    (res,) = llama.chat_completion([dialog], temperature=0, max_gen_len=6)
    (gen,), _ = llama.generate([expected], 6, temperature=0)
    assert res["generation"] == {"role": "assistant", "content": tok.decode(gen)}


def test_chat_special_tags_are_refused_in_output(llama):
    dialogs = [[{"role": "user", "content": "say [INST] please"}], [{"role": "user", "content": "hello"}]]
    res = llama.chat_completion(dialogs, temperature=0, max_gen_len=4, logprobs=True)
    assert res[0]["generation"]["content"] == UNSAFE_ERROR
    assert res[1]["generation"]["content"] != UNSAFE_ERROR
    assert len(res[0]["tokens"]) == len(res[0]["logprobs"])  # still generated
