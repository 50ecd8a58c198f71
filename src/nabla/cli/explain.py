"""`nabla explain`: show why the model chose each token, or how surprised it is by a text.

    nabla explain "Once upon a time" --model DIR           # a table, coloured by probability
    nabla explain "Once upon a time" --html out.html       # a page to hover over
    nabla explain --score "Some text" --json               # surprisal, perplexity, bits per byte
    nabla explain --score-file book.txt --window 512
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from nabla.cli.common import add_model_args, add_sampling_args, load_model
from nabla.errors import InvalidRequestError


def run_explain(args: argparse.Namespace) -> int:
    from nabla.explain.explain import check_top_k_shown

    check_top_k_shown(args.top_k_shown)
    if args.score is not None or args.score_file is not None:
        return _run_score(args)
    prompt = args.prompt if args.prompt is not None else _stdin()
    if not prompt.strip():
        raise InvalidRequestError("give a prompt to explain (an argument or on stdin), or --score TEXT", "prompt")
    llama = load_model(args)
    ids = llama.tokenizer.encode(prompt, bos=True, eos=False)
    max_gen_len = args.max_gen_len if args.max_gen_len is not None else llama.max_seq_len - len(ids)
    if max_gen_len >= 0:  # a negative one is left for explain to reject
        max_gen_len = max(0, min(max_gen_len, llama.max_seq_len - len(ids)))
    e = llama.explain(ids, max_gen_len, args.temperature, args.top_p, args.top_k_shown, args.echo, args.seed)
    e.prompt = prompt
    if args.html:
        from nabla.explain.html import explanation_html

        _write(args.html, explanation_html(e, prompt))
    if args.json:
        print(json.dumps(e.to_dict(), ensure_ascii=False))
    else:
        _print_explanation(e, prompt, args.top_k_shown)
        if args.html:
            print(f"wrote {args.html}", file=sys.stderr)
    return 0


def _stdin() -> str:
    try:
        return "" if sys.stdin is None or sys.stdin.isatty() else sys.stdin.read()
    except (OSError, ValueError):  # no readable stdin
        return ""


def _run_score(args: argparse.Namespace) -> int:
    from nabla.explain.score import score

    if args.score is not None and args.score_file is not None:
        raise InvalidRequestError("give either --score TEXT or --score-file FILE, not both", "score")
    if args.prompt is not None:
        raise InvalidRequestError("--score scores a text, it does not take a prompt too; drop the prompt", "prompt")
    text = args.score if args.score is not None else _read_text(args.score_file)
    if not text.strip():
        raise InvalidRequestError("the text to score is empty; give some text", "score")
    llama = load_model(args)
    s = score(llama, text, args.window, args.stride, args.top_k_shown, progress=args.score_file is not None)
    if args.html:
        from nabla.explain.html import score_html

        _write(args.html, score_html(s))
    if args.json:
        out = s.summary()
        if args.per_token:
            out["steps"] = [st.to_dict() for st in s.steps]
        print(json.dumps(out, ensure_ascii=False))
    else:
        _print_score(s, args.max_rows)
        if args.html:
            print(f"wrote {args.html}", file=sys.stderr)
    return 0


def _read_text(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise InvalidRequestError(f"--score-file {path}: no such file; give the path of a UTF-8 text file",
                                  "score_file") from None
    except IsADirectoryError:
        raise InvalidRequestError(f"--score-file {path} is a folder; give the path of a text file",
                                  "score_file") from None
    except UnicodeDecodeError as e:
        raise InvalidRequestError(f"--score-file {path} is not UTF-8 text ({e.reason} at byte {e.start}); "
                                  "convert it to UTF-8 first", "score_file") from None
    except OSError as e:
        raise InvalidRequestError(f"cannot read --score-file {path}: {e.strerror}", "score_file") from None


def _write(path: str, text: str) -> None:
    from nabla.checkpoint.io import atomic_write_text
    from nabla.distributed import is_main_process

    if not is_main_process():  # under torchrun every rank computes the same page; rank 0 writes it
        return
    try:
        atomic_write_text(path, text)
    except OSError as e:
        raise InvalidRequestError(f"cannot write {path}: {e.strerror}; pick a writable path", "html") from None


# -------------------------------------------------------------- terminal
def _style(p: float | None) -> str:
    if p is None:
        return "dim"
    if p >= 0.5:
        return "green"
    if p >= 0.1:
        return "yellow"
    return "red"


def _shown(piece: str) -> str:
    return repr(piece)[1:-1] if piece else "\u27e8\u27e9"


def _p(p: float) -> str:
    """A probability as a short percentage (scientific below 0.01%)."""
    if p == 0:
        return "0"
    return f"{100 * p:.3g}%" if p >= 1e-3 else f"{p:.1e}"


def _print_explanation(e, prompt: str, k: int) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console(highlight=False)
    line = Text()
    if not e.echo:
        line.append(prompt, style="dim")
    for s in e.steps:
        if s.stop:
            line.append("\u27e8stop\u27e9", style="dim " + _style(s.prob))
        else:
            line.append(s.text, style="reverse " + _style(s.prob) if s.prob is not None else "dim")
    console.print(line)
    greedy = e.temperature == 0
    title = "greedy (temperature 0)" if greedy else f"temperature {e.temperature:g}, top-p {e.top_p:g}"
    table = Table(title=f"why each token: {title}", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    wide = console.width >= 120  # logprob and rank too, where there is room
    table.add_column("pos", justify="right", no_wrap=True)
    table.add_column("token", no_wrap=True, max_width=16)
    table.add_column("p", justify="right", no_wrap=True)
    if wide:
        table.add_column("logp", justify="right", no_wrap=True)
        table.add_column("rank", justify="right", no_wrap=True)
    if not greedy:
        table.add_column("sampled", justify="right", no_wrap=True)
        table.add_column("nucleus", justify="right", no_wrap=True)
    table.add_column("H bits", justify="right", no_wrap=True)
    table.add_column(f"top {k}: p" + ("" if greedy else " \u2192 sampled"), overflow="fold", ratio=1, min_width=20)
    for s in e.steps:
        if s.prob is None:
            name = "\u27e8start\u27e9" if not s.piece else _shown(s.piece)
            table.add_row(str(s.position), Text(name, style="dim"), *[""] * (len(table.columns) - 2))
            continue
        name = Text(_shown(s.piece) + (" \u27e8stop\u27e9" if s.stop else ""), style="dim" if s.prompt else "")
        alts = Text()
        for j, a in enumerate(s.alternatives):
            if j:
                alts.append("  ")
            alts.append(_shown(a.piece), style="bold underline" if a.token == s.token else "")
            alts.append(" " + _p(a.prob) + ("" if greedy else "\u2192" + _p(a.prob_sample)), style=_style(a.prob))
        cells = [str(s.position), name, Text(_p(s.prob), style=_style(s.prob))]
        if wide:
            cells += [f"{s.logprob:.2f}", str(s.rank)]
        if not greedy:
            cells += [_p(s.prob_sample), str(s.nucleus)]
        table.add_row(*cells, f"{s.entropy:.2f}", alts)
    console.print(table)


def _print_score(s, max_rows: int) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console(highlight=False)
    table = Table(title="surprisal per token", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for name, just in (("pos", "right"), ("token", "left"), ("p", "right"), ("bits", "right"),
                       ("rank", "right"), ("top guess", "left")):
        table.add_column(name, justify=just)
    for st in s.steps[:max_rows]:
        best = st.alternatives[0] if st.alternatives else None
        table.add_row(str(st.position), _shown(st.piece), Text(_p(st.prob), style=_style(st.prob)),
                      f"{st.surprisal:.2f}", str(st.rank), f"{_shown(best.piece)} {_p(best.prob)}" if best else "")
    console.print(table)
    if len(s.steps) > max_rows:
        console.print(f"... {len(s.steps) - max_rows} more tokens (--max-rows N shows more, --json --per-token "
                      "gives all)")
    console.print(f"tokens {len(s.steps) + 1} (predicted {len(s.steps)}), bytes {s.n_bytes}, window {s.window}, "
                  f"stride {s.stride}")
    console.print(f"perplexity {s.perplexity:.4f}, mean NLL {s.mean_nll:.4f} nats, "
                  f"{s.bits_per_token:.4f} bits/token, {s.bits_per_byte:.4f} bits/byte")


def register(sub) -> None:
    p = sub.add_parser("explain", help="show why the model chose each token, or score a text",
                       description="Generate from a prompt and show, for every token, its probability, the "
                                   "alternatives before and after temperature and top-p, the nucleus size and "
                                   "the entropy; or (--score) measure a text's surprisal and perplexity.")
    p.add_argument("prompt", nargs="?", help="the text to continue (read from stdin when omitted)")
    add_model_args(p)
    add_sampling_args(p, max_gen_len=32)
    g = p.add_argument_group("explain")
    g.add_argument("--top-k-shown", type=int, default=5, help="alternatives shown per token (default: %(default)s)")
    g.add_argument("--echo", action="store_true", help="explain the prompt's tokens too")
    g.add_argument("--json", action="store_true", help="print JSON instead of a table")
    g.add_argument("--html", metavar="FILE", help="also write a self-contained page to hover over")
    g = p.add_argument_group("scoring")
    g.add_argument("--score", metavar="TEXT", help="score this text instead of generating")
    g.add_argument("--score-file", metavar="FILE", help="score a UTF-8 text file")
    g.add_argument("--window", type=int, help="tokens per scoring window (default: the context length)")
    g.add_argument("--stride", type=int, help="tokens between window starts (default: half a window)")
    g.add_argument("--per-token", action="store_true", help="with --json, list every token too")
    g.add_argument("--max-rows", type=int, default=1000, help="tokens listed in the table (default: %(default)s)")
    p.set_defaults(func=run_explain)
