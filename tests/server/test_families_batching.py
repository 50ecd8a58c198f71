"""Sliding-window and soft-capped families inside the continuous-batching engine equal generate alone."""


import pytest
from hf_families import MORE, PROMPT, save_family

from nabla import Llama
from server.conftest import Collected


@pytest.mark.parametrize("family", ["mistral", "gemma2"])
def test_engine_equals_generate_past_the_window(tmp_path, family):
    from nabla.server.batching import Engine, SamplingParams, Sequence

    path, _ = save_family(tmp_path, family)
    llama = Llama.build(path, None, max_seq_len=64, max_batch_size=3, dtype="fp32", device="cpu")
    prompts = [PROMPT, PROMPT[:2] + MORE[:12], MORE[:4], PROMPT + MORE]
    lengths = [20, 9, 24, 12]
    alone = [llama.generate([p], max_gen_len=n, temperature=0.0)[0][0] for p, n in zip(prompts, lengths)]
    engine = Engine(llama.model, llama.tokenizer.stop_ids)
    got = Collected()
    engine.start()
    try:
        for i, (p, n) in enumerate(zip(prompts, lengths)):  # more sequences than cache rows
            engine.submit([Sequence(p, SamplingParams(n, temperature=0), got.sink(i))])
        got.wait(len(prompts))
    finally:
        engine.stop()
    assert [got.tokens(i) for i in range(len(prompts))] == alone
