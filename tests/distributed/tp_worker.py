"""One rank of the tensor-parallel test, run by `torchrun --nproc_per_node 2` (see test_tensor_parallel.py).

Reads a JSON list of cases, builds each checkpoint with model_parallel_size=2,
writes every rank's tokens, logprobs and parameter bytes to OUT/rank{r}.json,
then runs `nabla generate --json` once (only rank 0 may print).
"""

import json
import sys

import torch

from nabla import Llama
from nabla.distributed import local_param_bytes, rank


def main(cases_path: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    cases = json.loads(open(cases_path).read())
    results = {}
    for case in cases:
        if case.get("follow"):
            continue
        llama = Llama.build(case["ckpt"], case.get("tokenizer"), max_seq_len=64, max_batch_size=2,
                            model_parallel_size=2)
        greedy, greedy_lps = llama.generate(case["prompts"], case["max_gen_len"], temperature=0.0,
                                            logprobs=True)
        torch.manual_seed(7)
        sampled, _ = llama.generate(case["prompts"], case["max_gen_len"], temperature=1.0, top_p=0.95)
        a = llama.model.layers[0].attention
        results[case["name"]] = dict(
            tokens=greedy, logprobs=greedy_lps, sampled=sampled, param_bytes=local_param_bytes(llama.model),
            n_heads=a.n_heads, n_kv_heads=a.n_kv_heads, cache_heads=a.cache.k.shape[1])
    r = rank()
    follow_case = [c for c in cases if c.get("follow")]
    if follow_case:
        results["follow"] = leader_and_follower(follow_case[0], out_dir)
    with open(f"{out_dir}/rank{r}.json", "w") as f:
        json.dump(results, f)
    if cases and "cli" in cases[0]:
        from nabla.cli import main as nabla_main

        sys.stdout.flush()
        code = nabla_main(cases[0]["cli"])
        sys.stdout.flush()
        if code:
            sys.exit(code)


def leader_and_follower(case: dict, out_dir: str) -> dict:
    """Only rank 0 runs the calls (as a server does); rank 1 follows. Rank 0 saves what it got."""
    from nabla.distributed import follow, is_main_process, lead

    llama = Llama.build(case["ckpt"], None, max_seq_len=64, max_batch_size=2, model_parallel_size=2)
    if not is_main_process():
        return {"calls": follow(llama.model)}
    release = lead(llama.model)
    try:
        out = run_calls(llama)
    finally:
        release()
    torch.save(out, f"{out_dir}/follow.pt")
    return {"calls": None}


def run_calls(llama) -> dict:
    """A generate, a batched step with per-row positions and cache rows, a stateless hidden-state pass."""
    tokens, lps = llama.generate([[1, 15043, 3186], [1, 450, 4996, 17354, 1701]], 5, temperature=0.0, logprobs=True)
    with torch.inference_mode():
        step = llama.model(torch.tensor([[29889], [338]]), torch.tensor([8, 10]), rows=torch.tensor([1, 0]))
        hidden = llama.model(torch.tensor([[1, 450, 4996]]), return_hidden=True)
    return dict(tokens=tokens, logprobs=lps, step=step, hidden=hidden)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
