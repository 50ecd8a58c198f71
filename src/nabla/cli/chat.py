"""`nabla chat`: a multi-turn conversation in the terminal, in the model's chat format.

Each turn encodes the whole dialog again; the prefix cache (`--prefix-cache-mb`) hands back the keys and
values of the earlier turns' prompts, so only the newest exchange goes through the model."""

from __future__ import annotations

import argparse
import sys

from nabla.cli.common import add_model_args, add_prefix_cache_arg, add_sampling_args, load_model


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
    p = sub.add_parser("chat", help="interactive multi-turn chat",
                       description="Chat with a model in the terminal (Llama chat format).")
    add_model_args(p)
    add_sampling_args(p)
    p.add_argument("--system", help="system prompt")
    add_prefix_cache_arg(p)
    p.set_defaults(func=run_chat)
