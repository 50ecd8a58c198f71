"""Peak memory while `Llama.build` loads a bf16 checkpoint, as a multiple of its size on disk.

Builds a random bf16 Llama checkpoint of about 440 MB in a temporary folder,
in Meta format (consolidated.00.pth), Meta MP=2, and Hugging Face format
(model.safetensors), then loads each in a fresh subprocess with
dtype="auto" (which keeps bf16 on a CPU) and reads the peak resident set size
(`resource.getrusage(...).ru_maxrss`; Linux keeps that peak across fork and
exec, so this parent process stays small: it imports no torch and builds the
checkpoints in a subprocess too). The process's RSS just before loading
(Python, torch and nabla imported, torch's meta-device kernels warmed up) is
reported too, so the cost of loading the weights is peak - before. A plain
`torch.load` + `load_state_dict` of the same .pth is measured for comparison.

    python benchmarks/bench_load_memory.py [--layers 12] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

TOKENIZER = Path(__file__).resolve().parents[1] / "tests" / "data" / "llama2" / "tokenizer.model"

LOAD = r"""
import json, resource, sys, torch
from nabla import Llama
mode, path, tok = sys.argv[1], sys.argv[2], sys.argv[3]
torch.set_num_threads(1)
# Warm up: the first model built on the meta device imports torch's meta
# kernels (~80 MB of code and tables, whatever the checkpoint's size).
from nabla.model import Transformer
from nabla.checkpoint.meta import args_from_params
with torch.device("meta"):
    Transformer(args_from_params(dict(dim=64, n_layers=1, n_heads=4, vocab_size=256)))
from nabla.tokenizer import load_tokenizer
load_tokenizer(tok)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
if mode == "nabla":
    llama = Llama.build(path, tok, max_seq_len=64, max_batch_size=1, dtype="auto", device="cpu")
    dtype = str(llama.model.tok_embeddings.weight.dtype)
else:  # the naive way: read the whole file into memory, then copy it into a model
    from nabla.model import Transformer
    from nabla.checkpoint.meta import args_from_params
    params = json.load(open(path + "/params.json"))
    args = args_from_params(params)
    with torch.device("meta"):
        model = Transformer(args)
    model = model.to(torch.bfloat16).to_empty(device="cpu")
    state = torch.load(path + "/consolidated.00.pth", weights_only=True)
    model.load_state_dict(state, strict=False)
    dtype = str(model.tok_embeddings.weight.dtype)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"before": before, "peak": peak, "dtype": dtype, "torch": torch.__version__}))
"""


def make_checkpoints(root: Path, layers: int) -> None:
    import torch

    from nabla.checkpoint.convert import convert_checkpoint
    from nabla.checkpoint.meta import args_from_params
    from nabla.model import Transformer

    params = dict(dim=1024, n_layers=layers, n_heads=16, vocab_size=32000, multiple_of=256, norm_eps=1e-5)
    args = args_from_params(params)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Transformer(args).state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    state = {k: (torch.ones(s) if k.endswith("norm.weight") else torch.randn(s, generator=gen) * 0.02)
             .to(torch.bfloat16) for k, s in shapes.items()}
    meta = root / "meta"
    meta.mkdir()
    (meta / "params.json").write_text(json.dumps(params))
    torch.save(state, meta / "consolidated.00.pth")
    del state
    (meta / "tokenizer.model").write_bytes(TOKENIZER.read_bytes())
    convert_checkpoint(meta, root / "hf", "hf")
    convert_checkpoint(meta, root / "meta-mp2", "meta", shards=2)


def measure(mode: str, path: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", LOAD, mode, str(path), str(TOKENIZER)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=12, help="transformer layers (12: about 440 MB in bf16)")
    ap.add_argument("--keep", metavar="DIR", help="build the checkpoints here and keep them")
    ap.add_argument("--make", metavar="DIR", help=argparse.SUPPRESS)  # internal: build in a subprocess
    opts = ap.parse_args()
    if opts.make:
        make_checkpoints(Path(opts.make), opts.layers)
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(opts.keep or tmp)
        root.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, __file__, "--make", str(root), "--layers", str(opts.layers)], check=True)
        folders = {"meta": root / "meta", "meta-mp2": root / "meta-mp2", "hf": root / "hf"}
        rows = []
        for name, path in folders.items():
            size = sum(f.stat().st_size for f in path.iterdir() if f.suffix in (".pth", ".safetensors"))
            for mode in (("nabla", "naive") if name == "meta" else ("nabla",)):
                r = measure(mode, path)
                rows.append((name, mode, size, r))
    print("| checkpoint | loader | size on disk | RSS before | peak RSS | peak / size | (peak - before) / size |")
    print("|---|---|---|---|---|---|---|")
    for name, mode, size, r in rows:
        mb = 1e6
        loader = "Llama.build(dtype='auto')" if mode == "nabla" else "torch.load + load_state_dict"
        print(f"| {name} | {loader} | {size / mb:.0f} MB | {r['before'] / mb:.0f} MB | {r['peak'] / mb:.0f} MB | "
              f"{r['peak'] / size:.2f}x | {(r['peak'] - r['before']) / size:.2f}x |")
    print(f"\ntorch {rows[0][3]['torch']}, Python {sys.version.split()[0]}, {sys.platform}; loaded dtype "
          f"{rows[0][3]['dtype']}")


if __name__ == "__main__":
    main()
