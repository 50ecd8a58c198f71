"""Sliding-window and soft-capped families inside the continuous-batching engine equal generate alone."""

import threading

import pytest
from hf_families import MORE, PROMPT, save_family

from nabla import Llama


@pytest.mark.parametrize("family", ["mistral", "gemma2"])
def test_engine_equals_generate_past_the_window(tmp_path, family):
    from nabla.server.batching import Engine, FinishEvent, SamplingParams, Sequence, TokenEvent

    path, _ = save_family(tmp_path, family)
    llama = Llama.build(path, None, max_seq_len=64, max_batch_size=3, dtype="fp32", device="cpu")
    prompts = [PROMPT, PROMPT[:2] + MORE[:12], MORE[:4], PROMPT + MORE]
    lengths = [20, 9, 24, 12]
    alone = [llama.generate([p], max_gen_len=n, temperature=0.0)[0][0] for p, n in zip(prompts, lengths)]
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
        for i, (p, n) in enumerate(zip(prompts, lengths)):  # more sequences than cache rows
            engine.submit([Sequence(p, SamplingParams(n, temperature=0), lambda ev, i=i: sink(i, ev))])
        for _ in prompts:
            done.acquire()
    finally:
        engine.stop()
    assert [outputs.get(i, []) for i in range(len(prompts))] == alone
