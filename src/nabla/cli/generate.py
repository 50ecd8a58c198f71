"""`nabla generate`: continue a prompt, streaming the text (or one JSON object)."""

from __future__ import annotations

import argparse
import json
import sys

from nabla.cli.common import add_model_args, add_sampling_args, load_model
from nabla.errors import ConfigError
from nabla.jsonfile import read_json_object


def run_generate(args: argparse.Namespace) -> int:
    llama = load_model(args)
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    ids = llama.tokenizer.encode(prompt, bos=True, eos=False)
    max_gen_len = args.max_gen_len if args.max_gen_len is not None else llama.max_seq_len - len(ids)
    max_gen_len = max(0, min(max_gen_len, llama.max_seq_len - len(ids)))
    schema = read_json_object(args.json_schema, error=ConfigError) if args.json_schema else None
    pieces = llama.stream(ids, max_gen_len, args.temperature, args.top_p, logprobs=args.logprobs or args.json,
                          in_context=not args.json, json_schema=schema)
    if args.json:
        pieces = list(pieces)
        out = {"prompt": prompt, "generation": "".join(p.text for p in pieces),
               "tokens": [p.token for p in pieces],
               "token_texts": [llama.tokenizer.decode([p.token]) for p in pieces],
               "logprobs": [p.logprob for p in pieces]}
        print(json.dumps(out, ensure_ascii=False))
        return 0
    out = sys.stdout
    out.write(prompt)
    out.flush()
    pieces = list(_echo(pieces, out))
    out.write("\n")
    if args.logprobs:
        print("\ntoken logprobs:", file=out)
        for p in pieces:
            print(f"{p.token:>8} {llama.tokenizer.decode([p.token])!r:>20} {p.logprob:9.4f}", file=out)
    return 0


def _echo(pieces, out):
    """Print each piece (as it reads after the prompt) as it arrives."""
    for p in pieces:
        out.write(p.text)
        out.flush()
        yield p


def register(sub) -> None:
    p = sub.add_parser("generate", help="continue a prompt, streaming the text",
                       description="Generate text from a prompt (read from stdin when omitted).")
    p.add_argument("prompt", nargs="?", help="the text to continue")
    add_model_args(p)
    add_sampling_args(p)
    p.add_argument("--logprobs", action="store_true", help="print each token's log-probability")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    p.add_argument("--json-schema", metavar="FILE",
                   help="constrain the generation to JSON valid against the JSON Schema in FILE")
    p.set_defaults(func=run_generate)
