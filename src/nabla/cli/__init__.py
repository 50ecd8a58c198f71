"""`nabla <command>`: one entry point for every command.

Each command is a module of nabla.cli that defines `register(subparsers)`;
heavy imports (torch, the server) happen inside the command's handler so
`nabla --help` and `nabla mnist` stay fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from nabla.errors import NablaError

# One line per module that registers commands, in the order `--help` lists them.
COMMAND_MODULES = (
    "nabla.cli.generate",
    "nabla.cli.chat",
    "nabla.cli.mnist",
    "nabla.cli.explain",
    "nabla.cli.serve",
    "nabla.cli.train",
    "nabla.cli.finetune",
    "nabla.cli.info",
    "nabla.cli.convert",
    "nabla.cli.bench",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nabla",
        description="Run, serve, train and understand Llama-family language models.",
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args) or 0
    except NablaError as e:
        print(f"nabla {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
