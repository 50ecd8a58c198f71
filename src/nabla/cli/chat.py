"""`nabla chat`: a multi-turn conversation in the terminal, in the model's chat format.

Each turn encodes the whole dialog again; the prefix cache (`--prefix-cache-mb`) hands back the keys and
values of the earlier turns' prompts, so only the newest exchange goes through the model."""

from __future__ import annotations

import argparse
import json
import sys

from nabla.cli.common import add_model_args, add_prefix_cache_arg, add_sampling_args, load_model
from nabla.errors import InvalidRequestError
from nabla.tokenizer.chat import check_template_kwargs


def template_kwargs(text: str | None) -> dict:
    """--chat-template-kwargs: a JSON object of further variables for the model's chat template."""
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidRequestError(f"--chat-template-kwargs is not valid JSON ({e}); pass an object such as "
                                  "'{\"enable_thinking\": false}'", "--chat-template-kwargs") from None
    return check_template_kwargs(value, "--chat-template-kwargs")


def run_chat(args: argparse.Namespace) -> int:
    variables = template_kwargs(args.chat_template_kwargs)  # before the model loads: a typo fails fast
    llama = load_model(args, rank_0_only=True)
    if variables:
        llama.encode_chat([{"role": "user", "content": "Hi"}], variables)  # a chat format that takes none says so now
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
        ids = llama.encode_chat(system + turns, variables)
        while len(ids) + reserve > llama.max_seq_len and len(turns) > 1:
            turns = turns[2:]  # drop the oldest user/assistant exchange
            print("[the conversation outgrew the context: dropped the oldest turn]", file=sys.stderr)
            ids = llama.encode_chat(system + turns, variables)
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
                       description="Chat with a model in the terminal, in its chat format.")
    add_model_args(p)
    add_sampling_args(p)
    p.add_argument("--system", help="system prompt")
    p.add_argument("--chat-template-kwargs", metavar="JSON",
                   help="further variables for the model's Jinja chat template, as a JSON object, "
                        "e.g. '{\"enable_thinking\": false}' for Qwen3 (transformers' and vLLM's "
                        "chat_template_kwargs)")
    add_prefix_cache_arg(p)
    p.set_defaults(func=run_chat)
