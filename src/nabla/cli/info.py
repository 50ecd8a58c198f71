"""`nabla info`: what a checkpoint holds and the memory it needs, as a table or JSON."""

from __future__ import annotations

import argparse
import json
import sys

from nabla.checkpoint.info import checkpoint_info, verify_checklist
from nabla.cli.common import human_bytes, human_count, model_dir
from nabla.errors import CheckpointError

FORMAT_NAMES = {"meta": "Meta", "hf": "Hugging Face", "gguf": "GGUF (llama.cpp)"}


def print_info(info: dict, out=None) -> None:
    out = out or sys.stdout
    a, m, t = info["architecture"], info["memory"], info["tokenizer"]
    files = f"{len(info['files'])} file{'s' if len(info['files']) != 1 else ''}"
    rows = [
        ("checkpoint", f"{info['path']}"),
        ("format", f"{FORMAT_NAMES.get(info['format'], info['format'])} ({files}"
                   + (f", model-parallel {info['shards']}" if info["format"] == "meta" and info["shards"] > 1 else "")
                   + ")"),
        ("layers", f"{a['n_layers']} x (dim {a['dim']}, {a['n_heads']} heads, {a['n_kv_heads']} kv heads, "
                   f"head_dim {a['head_dim']}, ffn {a['hidden_dim']})"),
        ("vocabulary", f"{a['vocab_size']} rows" + (", tied output" if a["tie_word_embeddings"] else "")),
        ("family", a["model_type"] + "".join(f", {k} {v}" for k, v in a["switches"].items())),
        ("rope", f"theta {a['rope_theta']:g}" + (
            f", {a['rope_scaling'].get('rope_type', 'llama3')} scaling"
            + (f" x{a['rope_scaling']['factor']:g}" if "factor" in a["rope_scaling"] else "")
            if a["rope_scaling"] else "")),
        ("norm_eps", f"{a['norm_eps']:g}"),
        ("parameters", f"{human_count(info['parameters'])} ({info['parameters']:,})"),
        ("dtype", str(info["dtype"])),
        ("size on disk", human_bytes(info["size_bytes"])),
    ]
    if info.get("gguf"):  # what each of the file's tensor types becomes in nabla
        g = info["gguf"]
        rows.append(("gguf architecture", str(g.get("architecture"))))
        rows.append(("tensor types", "; ".join(f"{t} x{n} -> {g['loads_as'][t]}"
                                               for t, n in g["tensor_types"].items())))
        if g["load_quantize"]:
            rows.append(("runs as", f"linear layers {g['load_quantize']} (pass --quantize to choose)"))
    if info["context_length"]:
        rows.append(("trained context", str(info["context_length"])))
    if t and "error" not in t:
        fits = "" if t["fits"] else "  (MORE ids than the embedding has rows: wrong tokenizer?)"
        rows.append(("tokenizer", f"{t['kind']}, {t['n_words']} ids, bos {t['bos_id']}, stop {t['stop_ids']}, "
                                  f"chat format {t['chat_format']}{fits}"))
    else:
        rows.append(("tokenizer", t["error"] if t else "none"))
    rows.append(("memory", f"{human_bytes(m['total_bytes'])} in {m['dtype']} = weights "
                           f"{human_bytes(m['weights_bytes'])} + KV cache {human_bytes(m['kv_cache_bytes'])} "
                           f"(context {m['context']}, batch {m['batch']})"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}", file=out)


def run_info(args: argparse.Namespace) -> int:
    path = model_dir(args)
    checked = verify_checklist(path, progress=not args.json) if args.verify else None
    if checked is not None:
        bad = [r for r in checked if not r["ok"]]
        if not args.json:
            for r in checked:
                size = "missing" if r["bytes"] is None else human_bytes(r["bytes"])
                problem = "" if r["ok"] else f": {r['problem']}"
                print(f"{'ok' if r['ok'] else 'BAD':<4} {r['file']} ({size}){problem}")
        if bad:
            if args.json:
                print(json.dumps({"path": str(path), "verify": checked}, indent=2))
            raise CheckpointError(f"{len(bad)} of {len(checked)} files in {path} do not match checklist.chk "
                                  f"({', '.join(r['file'] + ': ' + r['problem'] for r in bad[:3])}); "
                                  "download them again")
    info = checkpoint_info(path, args.tokenizer, args.context, args.batch, args.dtype)
    if checked is not None:
        info["verify"] = checked
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print_info(info)
    return 0


def register(sub) -> None:
    p = sub.add_parser("info", help="what a checkpoint holds and the memory it needs",
                       description="Describe a checkpoint folder (Meta or Hugging Face) or GGUF file: architecture, "
                                   "parameters, dtype, size, tokenizer, and the memory to run it.")
    p.add_argument("--model", metavar="DIR", help="checkpoint folder or .gguf file (default: the built-in story model)")
    p.add_argument("--tokenizer", metavar="FILE", help="tokenizer file, when the folder holds none")
    p.add_argument("--context", type=int, help="context length for the memory estimate "
                                               "(default: the model's trained context, else 2048)")
    p.add_argument("--batch", type=int, default=1, help="batch size for the memory estimate (default: 1)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"],
                   help="compute dtype for the memory estimate (default: the checkpoint's)")
    p.add_argument("--verify", action="store_true",
                   help="check every file against the folder's checklist.chk (Meta's MD5 list)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run_info)
