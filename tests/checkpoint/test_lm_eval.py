"""lm-evaluation-harness opens what `nabla convert --to hf` writes: its Hugging Face model class (HFLM, as
`lm_eval --model hf --model_args pretrained=DIR` makes it) gives the built-in model's loglikelihoods equal
to nabla's own score of the same continuations.

lm-eval is not a test dependency (about 40 packages, pyarrow, pandas and scikit-learn among them): this
test runs where it is installed (`pip install lm-eval`) and is skipped elsewhere."""

from pathlib import Path

import pytest

import nabla
from nabla import Llama
from nabla.cli import main
from nabla.explain import score

STORIES = Path(nabla.__file__).parent / "assets" / "stories"
REQUESTS = [("Once upon a time, there was a little", " girl named Lily."),
            ("The cat sat on the", " mat"),
            ("Tom and Sue went to the park. Tom said,", " \"Let's play!\" Sue was happy.")]


def test_hflm_loglikelihood_equals_nabla_score(tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "hf"
    assert main(["convert", "--model", str(STORIES), "--out", str(out), "--to", "hf"]) == 0
    lm = HFLM(pretrained=str(out), device="cpu", dtype="float32", batch_size=2)
    got = lm.loglikelihood([Instance(request_type="loglikelihood", doc={}, arguments=r, idx=i)
                            for i, r in enumerate(REQUESTS)])

    llama = Llama.build(out, None, max_seq_len=256, max_batch_size=1, dtype="fp32", device="cpu")
    for (context, continuation), (loglikelihood, is_greedy) in zip(REQUESTS, got):
        n = len(llama.tokenizer.encode(context, bos=True, eos=False))
        steps = score(llama, context + continuation).steps[n - 1:]  # step i predicts token i + 1
        assert loglikelihood == pytest.approx(sum(s.logprob for s in steps), abs=1e-4)
        assert is_greedy == all(s.rank == 1 for s in steps)
    assert any(g for _, g in got) and not all(g for _, g in got)  # both answers of is_greedy are checked
