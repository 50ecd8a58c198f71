"""Memory per rank of tensor-parallel inference: 2 CPU processes (gloo) vs one.

Builds a random fp32 Llama checkpoint of a few hundred MB in a temporary
folder (Meta MP=1, and the same weights as Meta MP=2), then loads it

    - in one process (model_parallel_size=None), and
    - in 2 processes under `torchrun --standalone --nproc_per_node 2`
      (model_parallel_size=2), from the MP=1 and from the MP=2 files,

and reports, per process: bytes of parameters held, resident set size just
before `Llama.build` (Python + torch + nabla imported), peak RSS during the
build and one greedy generation, and RSS at the end. Peak RSS is the
kernel's high-water mark of the process's own memory (VmHWM in
/proc/self/status, reset by exec, so the launcher's memory is not counted).

    python benchmarks/bench_tp_memory.py [--layers 4] [--dim 1024] [--keep DIR] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

TOKENIZER = Path(__file__).resolve().parents[1] / "tests" / "data" / "llama2" / "tokenizer.model"
PROMPT = [1, 15043, 3186, 372, 338]


def status_bytes(field: str) -> int:
    """VmRSS / VmHWM of this process, in bytes (Linux); ru_maxrss elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def worker(ckpt: str, mp: int | None, out: str) -> None:
    """One process: build, generate a few tokens, write what it measured to OUT/rank{r}.json."""
    import torch

    from nabla import Llama
    from nabla.distributed import local_param_bytes, rank

    torch.set_num_threads(1)
    before = status_bytes("VmRSS")
    llama = Llama.build(ckpt, str(TOKENIZER), max_seq_len=64, max_batch_size=1, model_parallel_size=mp)
    after_build = status_bytes("VmRSS")
    tokens, _ = llama.generate([PROMPT], 8, temperature=0.0)
    result = dict(rank=rank(), param_bytes=local_param_bytes(llama.model), rss_before=before,
                  rss_after_build=after_build, peak_rss=status_bytes("VmHWM"), rss_end=status_bytes("VmRSS"),
                  tokens=tokens[0])
    Path(out, f"rank{rank()}.json").write_text(json.dumps(result))


def make_checkpoints(root: Path, layers: int, dim: int) -> dict:
    import torch

    from nabla.checkpoint.convert import convert_checkpoint
    from nabla.checkpoint.meta import args_from_params
    from nabla.model import Transformer, param_count

    params = dict(dim=dim, n_layers=layers, n_heads=16, n_kv_heads=8, vocab_size=32000, multiple_of=256,
                  norm_eps=1e-5)
    args = args_from_params(params)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Transformer(args).state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    state = {k: (torch.ones(s) if k.endswith("norm.weight") else torch.randn(s, generator=gen) * 0.02)
             for k, s in shapes.items()}
    meta = root / "meta-mp1"
    meta.mkdir()
    (meta / "params.json").write_text(json.dumps(params))
    torch.save(state, meta / "consolidated.00.pth")
    del state
    (meta / "tokenizer.model").write_bytes(TOKENIZER.read_bytes())
    convert_checkpoint(meta, root / "meta-mp2", "meta", shards=2)
    return dict(params=params, n_params=param_count(args), file_bytes=(meta / "consolidated.00.pth").stat().st_size)


def run(ckpt: Path, mp: int | None, out: Path) -> list[dict]:
    out.mkdir()
    me = [str(Path(__file__).resolve()), "--worker", str(ckpt), "--mp", str(mp or 0), "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if mp:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(mp), *me]
    else:
        env = {k: v for k, v in env.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        cmd = [sys.executable, *me]
    subprocess.run(cmd, check=True, env=env, capture_output=True, text=True)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(mp or 1)]


def mb(n: int) -> str:
    return f"{n / 2**20:,.0f} MB"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--keep", metavar="DIR", help="build the checkpoints here and keep them")
    p.add_argument("--json", action="store_true")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--mp", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a.worker, a.mp or None, a.out)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(a.keep) if a.keep else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        info = make_checkpoints(root, a.layers, a.dim)
        runs = {
            "1 process, MP=1 files": run(root / "meta-mp1", None, root / "out-single"),
            "2 ranks, MP=1 files": run(root / "meta-mp1", 2, root / "out-tp-mp1"),
            "2 ranks, MP=2 files": run(root / "meta-mp2", 2, root / "out-tp-mp2"),
        }
    full = runs["1 process, MP=1 files"][0]["param_bytes"]
    same = all(r["tokens"] == runs["1 process, MP=1 files"][0]["tokens"] for rs in runs.values() for r in rs)
    if a.json:
        print(json.dumps(dict(info, runs=runs, full_param_bytes=full, same_tokens=same), indent=2))
        return
    print(f"model: {info['params']}, {info['n_params'] / 1e6:.0f}M parameters, "
          f"checkpoint {mb(info['file_bytes'])} (fp32)")
    print("| run | rank | parameters held | share of full | RSS before build | peak RSS | "
          "peak - before | RSS at end |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, rs in runs.items():
        for r in rs:
            print(f"| {name} | {r['rank']} | {mb(r['param_bytes'])} | {r['param_bytes'] / full:.3f} | "
                  f"{mb(r['rss_before'])} | {mb(r['peak_rss'])} | {mb(r['peak_rss'] - r['rss_before'])} | "
                  f"{mb(r['rss_end'])} |")
    print(f"greedy tokens identical in every run and rank: {same}")


if __name__ == "__main__":
    main()
