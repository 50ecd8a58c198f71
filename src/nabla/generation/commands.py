"""`nabla generate` and `nabla chat`, plus the model flags every command shares."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from nabla.errors import CheckpointError, NablaError
from nabla.tokenizer.base import IncrementalDecoder


def add_model_args(p: argparse.ArgumentParser, max_seq_len: int = 2048, max_batch_size: int = 1,
                   batch_help: str = argparse.SUPPRESS) -> None:
    """--model, --tokenizer, --device, --dtype, --max-seq-len, --max-batch-size."""
    g = p.add_argument_group("model")
    g.add_argument("--model", metavar="DIR", help="checkpoint folder (default: the built-in story model)")
    g.add_argument("--tokenizer", metavar="FILE", help="tokenizer file, when the folder holds none")
    g.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: the best available)")
    g.add_argument("--dtype", choices=["fp32", "bf16", "fp16", "auto"],
                   help="compute dtype (default: per device; auto: the checkpoint's own)")
    g.add_argument("--quantize", choices=["int8", "int4"],
                   help="store the linear layers' weights in 8 or 4 bits (faster decode, less memory)")
    g.add_argument("--max-seq-len", type=int, default=max_seq_len, help="context length (default: %(default)s)")
    g.add_argument("--max-batch-size", type=int, default=max_batch_size, help=batch_help)
    g.add_argument("--model-parallel-size", type=int, metavar="N",
                   help="split the model across N processes started by `torchrun --nproc_per_node N` "
                        "(default: torchrun's WORLD_SIZE, else 1)")


def add_sampling_args(p: argparse.ArgumentParser, max_gen_len: int | None = 256) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-gen-len", type=int, default=max_gen_len, help="new tokens at most (default: %(default)s)")
    g.add_argument("--temperature", type=float, default=0.6, help="0 is greedy (default: %(default)s)")
    g.add_argument("--top-p", type=float, default=0.9, help="nucleus size (default: %(default)s)")
    g.add_argument("--seed", type=int, default=1, help="random seed (default: %(default)s)")


def model_dir(args: argparse.Namespace) -> Path:
    """The folder named by --model, or the built-in model."""
    if args.model:
        return Path(args.model)
    from nabla import default_model_path

    path = default_model_path()
    if not (path / "params.json").is_file():
        raise CheckpointError("no built-in model is installed in this copy of nabla; "
                              "pass --model DIR (a checkpoint folder)")
    return path


def load_model(args: argparse.Namespace, rank_0_only: bool = False):
    """Llama.build from the shared model flags.

    Under torchrun every rank runs the command and only rank 0 prints; with
    `rank_0_only` (chat, serve) only rank 0 runs it, the others follow its
    forward passes and exit (nabla.distributed.only_rank_0_runs).
    """
    from nabla.api import Llama

    llama = Llama.build(model_dir(args), args.tokenizer, max_seq_len=args.max_seq_len,
                        max_batch_size=args.max_batch_size, seed=getattr(args, "seed", 1),
                        device=args.device, dtype=args.dtype, verbose=False,
                        quantize=getattr(args, "quantize", None),
                        model_parallel_size=getattr(args, "model_parallel_size", None))
    from nabla.distributed import is_main_process, only_rank_0_runs

    if rank_0_only:
        only_rank_0_runs(llama.model)
    if not is_main_process():  # under torchrun every rank runs the same loop; only rank 0 prints
        sys.stdout = open(os.devnull, "w")
    return llama


def run_generate(args: argparse.Namespace) -> int:
    llama = load_model(args)
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    ids = llama.tokenizer.encode(prompt, bos=True, eos=False)
    max_gen_len = args.max_gen_len if args.max_gen_len is not None else llama.max_seq_len - len(ids)
    max_gen_len = max(0, min(max_gen_len, llama.max_seq_len - len(ids)))
    pieces = llama.stream(ids, max_gen_len, args.temperature, args.top_p, logprobs=args.logprobs or args.json)
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
    pieces = list(_echo(pieces, IncrementalDecoder(llama.tokenizer, ids), out))
    out.write("\n")
    if args.logprobs:
        print("\ntoken logprobs:", file=out)
        for p in pieces:
            print(f"{p.token:>8} {llama.tokenizer.decode([p.token])!r:>20} {p.logprob:9.4f}", file=out)
    return 0


def _echo(pieces, text: IncrementalDecoder, out):
    """Print each piece as it arrives, as it reads after the prompt."""
    for p in pieces:
        out.write(text.push(p.token))
        out.flush()
        yield p
    out.write(text.flush())


def run_chat(args: argparse.Namespace) -> int:
    llama = load_model(args, rank_0_only=True)
    system = [{"role": "system", "content": args.system}] if args.system else []
    turns: list[dict] = []
    print("nabla chat: type a message, Ctrl-D or /exit to quit, /reset to start over.", file=sys.stderr)
    while True:
        try:
            user = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        if user.strip() in ("/exit", "/quit"):
            return 0
        if user.strip() == "/reset":
            turns = []
            continue
        if not user.strip():
            continue
        turns.append({"role": "user", "content": user})
        reserve = min(args.max_gen_len or 256, llama.max_seq_len // 2)
        ids = llama.encode_chat(system + turns)
        while len(ids) + reserve > llama.max_seq_len and len(turns) > 1:
            turns = turns[2:]  # drop the oldest user/assistant exchange
            print("[the conversation outgrew the context: dropped the oldest turn]", file=sys.stderr)
            ids = llama.encode_chat(system + turns)
        if len(ids) >= llama.max_seq_len:
            print(f"[this message alone is {len(ids)} tokens, over the context of {llama.max_seq_len}; "
                  "send a shorter one]", file=sys.stderr)
            turns.pop()
            continue
        max_gen_len = min(args.max_gen_len or llama.max_seq_len, llama.max_seq_len - len(ids))
        answer = []
        for p in llama.stream(ids, max_gen_len, args.temperature, args.top_p):
            sys.stdout.write(p.text)
            sys.stdout.flush()
            answer.append(p.text)
        sys.stdout.write("\n")
        turns.append({"role": "assistant", "content": "".join(answer)})


def register(sub) -> None:
    p = sub.add_parser("generate", help="continue a prompt, streaming the text",
                       description="Generate text from a prompt (read from stdin when omitted).")
    p.add_argument("prompt", nargs="?", help="the text to continue")
    add_model_args(p)
    add_sampling_args(p)
    p.add_argument("--logprobs", action="store_true", help="print each token's log-probability")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    p.set_defaults(func=run_generate)

    p = sub.add_parser("chat", help="interactive multi-turn chat",
                       description="Chat with a model in the terminal (Llama chat format).")
    add_model_args(p)
    add_sampling_args(p)
    p.add_argument("--system", help="system prompt")
    p.set_defaults(func=run_chat)


__all__ = ["add_model_args", "add_sampling_args", "load_model", "model_dir", "register", "NablaError"]
