"""`nabla serve`: the OpenAI-compatible HTTP server (uvicorn + FastAPI)."""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys

from nabla.cli.common import add_model_args, add_prefix_cache_arg
from nabla.errors import ConfigError


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, api_key: str | None, insecure: bool) -> None:
    """Refuse to serve an unauthenticated model beyond this machine unless told to."""
    if not is_loopback(host) and not api_key and not insecure:
        raise ConfigError(
            f"--host {host} exposes the server beyond this machine without an API key; pass --api-key KEY "
            "(or set NABLA_API_KEY), or --insecure if anyone who can reach it may use it")


def run_serve(args: argparse.Namespace) -> int:
    if args.max_queue < 1:  # the cache sizes are checked where the model is prepared (nabla.model.prepare)
        raise ConfigError(f"--max-queue must be at least 1, got {args.max_queue}")
    if args.prefix_cache_mb < 0:
        raise ConfigError(f"--prefix-cache-mb must be >= 0 (0: off), got {args.prefix_cache_mb}")
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be in 0..65535, got {args.port}")
    api_key = args.api_key or os.environ.get("NABLA_API_KEY") or None
    check_exposure(args.host, api_key, args.insecure)
    lora_modules = check_lora_modules(args)  # before the base model loads: a typo fails fast

    import uvicorn

    from nabla.cli.common import load_model, model_dir
    from nabla.server.app import create_app

    path = model_dir(args)
    print(f"nabla serve: loading {path} ...", file=sys.stderr, flush=True)
    llama = load_model(args, rank_0_only=True)  # under torchrun: ranks > 0 follow rank 0's passes
    name = args.model_name or path.resolve().name
    app = create_app(llama, name, api_key=api_key, cors_origins=args.cors_origin, max_queue=args.max_queue,
                     lora_modules=lora_modules)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=args.shutdown_timeout, access_log=args.access_log)
    server = draining_server(config, app.state.nabla)
    print(f"nabla serve: model '{name}' at http://{args.host}:{args.port}/v1 "
          f"(batch {args.max_batch_size}, context {args.max_seq_len}"
          f"{', API key required' if api_key else ''})", file=sys.stderr, flush=True)
    for m in lora_modules:
        print(f"nabla serve: adapter '{m.name}' ({m.path}) on '{name}'", file=sys.stderr, flush=True)
    server.run()
    return 0


def check_lora_modules(args: argparse.Namespace) -> list:
    """--lora-modules, parsed and checked as far as can be without the base model."""
    if not args.lora_modules:
        return []
    from nabla.cli.common import model_dir
    from nabla.distributed import model_parallel_world
    from nabla.server.lora_modules import parse_lora_modules

    if model_parallel_world(args.model_parallel_size) > 1:
        raise ConfigError("--lora-modules is not supported with a model split across processes yet; "
                          "serve the adapters from one process, or merge one (nabla convert --merge-adapter)")
    return parse_lora_modules(args.lora_modules, args.model_name or model_dir(args).resolve().name)


def draining_server(config, state):
    """uvicorn's server, answering 503 to new requests as soon as SIGTERM arrives."""
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, answering 503 to new requests as soon as SIGTERM arrives.

        uvicorn then stops listening, lets in-flight requests finish (up to
        --shutdown-timeout seconds) and runs the app's shutdown.
        """

        def __init__(self, config, state):
            super().__init__(config)
            self.state = state

        def handle_exit(self, sig, frame):
            self.state.draining = True
            super().handle_exit(sig, frame)

    return Server(config, state)


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve a model over the OpenAI HTTP API",
                       description="An OpenAI-compatible server (/v1/completions, /v1/chat/completions, "
                                   "/v1/embeddings, /v1/models) with streaming and continuous batching.")
    add_model_args(p, max_batch_size=8, batch_help="sequences decoded together, one key/value cache row "
                                                     "each (default: %(default)s)")
    p.add_argument("--model-name", metavar="NAME", help="the name clients pass as `model` (default: folder name)")
    p.add_argument("--lora-modules", metavar="NAME=DIR", nargs="+", action="extend",
                   help="LoRA adapters (PEFT folders) served next to the base model, each under its own model "
                        "name, as vLLM's --lora-modules (also its JSON form '{\"name\": ..., \"path\": ...}'); "
                        "requests for different adapters share the decode batch")
    p.add_argument("--seed", type=int, default=1, help=argparse.SUPPRESS)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    g.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    g.add_argument("--api-key", metavar="KEY", help="require `Authorization: Bearer KEY` (or set NABLA_API_KEY)")
    g.add_argument("--insecure", action="store_true", help="allow a non-loopback --host without an API key")
    g.add_argument("--cors-origin", metavar="ORIGIN", nargs="+", action="extend",
                   help="allow browser pages from these origins ('*' for any)")
    g.add_argument("--max-queue", type=int, default=64,
                   help="sequences waiting for a slot before new requests get 429 (default: %(default)s)")
    g.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds in-flight requests get to finish after SIGTERM (default: %(default)s)")
    add_prefix_cache_arg(g)
    g.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    g.add_argument("--access-log", action="store_true", help="log every request")
    p.set_defaults(func=run_serve)
