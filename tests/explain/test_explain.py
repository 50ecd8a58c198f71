"""`Llama.explain`, `score`, the HTML page and `nabla explain`, against independent references.

References are computed here from a full stateless forward pass
(`llama.model(tokens)`), torch.softmax and the top-p rule written out again;
chosen tokens are compared with `Llama.generate` under the same seed.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from conftest import TINY_GQA, TINY_MHA

from nabla.cli import main
from nabla.errors import ContextLengthError, InvalidRequestError
from nabla.explain import Alternative, Explanation, TokenExplanation, score, token_stats
from nabla.explain.html import explanation_html, score_html

PROMPT = "Once upon a time"
CHROMIUM = Path(shutil.which("chromium") or "/usr/bin/chromium")


@pytest.fixture(scope="module")
def peaky_llama(make_checkpoint):
    """A tiny model whose output head is scaled up, so distributions are peaked and nuclei small."""
    from nabla import Llama

    llama = Llama.build(make_checkpoint(TINY_GQA, seed=3), None, max_seq_len=64, max_batch_size=2)
    with torch.no_grad():
        llama.model.output.weight.mul_(12.0)
    return llama


def reference_dists(llama, ids: list[int], pos: int, temperature: float, top_p: float):
    """Model, temperature and top-p distributions of the token at `pos`, from a full forward pass."""
    with torch.no_grad():
        logits = llama.model(torch.tensor([ids[:pos]]))[0, -1].double()
    p = torch.softmax(logits, -1)
    if temperature == 0:
        pt = torch.zeros_like(p)
        pt[int(torch.argmax(logits))] = 1.0
        return p, pt, pt, 1
    pt = torch.softmax(logits / temperature, -1)
    order = torch.argsort(pt, descending=True)
    kept = torch.zeros_like(pt)
    mass, nucleus = 0.0, 0
    for i in order.tolist():  # keep a token while the mass before it is within top_p
        if mass > top_p:
            break
        kept[i] = pt[i]
        mass += float(pt[i])
        nucleus += 1
    return p, pt, kept / kept.sum(), nucleus


def entropy_bits(p: torch.Tensor) -> float:
    p = p[p > 0]
    return float(-(p * p.log2()).sum())


# ---------------------------------------------------------------- the maths
def test_token_stats_hand_checked():
    probs = torch.tensor([0.5, 0.25, 0.125, 0.125])
    logits = probs.log()
    s = token_stats(logits, 1, temperature=1.0, top_p=0.6, k=3)
    # sorted 0.5, 0.25, 0.125, 0.125; mass before each: 0, 0.5, 0.75, 0.875 -> keep 2
    assert s["nucleus"] == 2
    assert s["entropy"] == pytest.approx(1.75)  # 0.5*1 + 0.25*2 + 2*0.125*3
    assert s["prob"] == pytest.approx(0.25) and s["logprob"] == pytest.approx(math.log(0.25))
    assert s["prob_sample"] == pytest.approx(1 / 3)
    assert s["sample_entropy"] == pytest.approx(-(2 / 3) * math.log2(2 / 3) - (1 / 3) * math.log2(1 / 3))
    assert s["rank"] == 2
    assert [a.token for a in s["alternatives"]][:2] == [0, 1]
    assert [a.prob_sample for a in s["alternatives"]][2] == 0.0

    s = token_stats(logits, 3, temperature=0.5, top_p=1.0, k=4)  # p^2 renormalised
    sq = probs ** 2 / (probs ** 2).sum()
    assert s["prob_temp"] == pytest.approx(float(sq[3]))
    assert s["nucleus"] == 4 and s["rank"] == 3  # ties: only two tokens are strictly more likely

    s = token_stats(logits, 0, temperature=0.0, top_p=0.9, k=2)  # greedy: all mass on the argmax
    assert s["nucleus"] == 1 and s["prob_sample"] == 1.0 and s["sample_entropy"] == 0.0
    assert s["entropy"] == pytest.approx(1.75)


# ------------------------------------------------------------ explain vs refs
@pytest.mark.parametrize("temperature,top_p", [(0.0, 0.9), (0.8, 0.7), (1.3, 0.95)])
def test_probabilities_equal_full_forward_softmax(peaky_llama, temperature, top_p):
    llama = peaky_llama
    e = llama.explain(PROMPT, 8, temperature, top_p, top_k_shown=4, echo=True, seed=5)
    ids = e.prompt_tokens + [s.token for s in e.steps if not s.prompt]
    assert [s.position for s in e.steps] == list(range(len(ids)))
    assert e.steps[0].prob is None and e.steps[0].prompt  # nothing predicts the first token
    nuclei = set()
    for s in e.steps[1:]:
        p, pt, ps, nucleus = reference_dists(llama, ids, s.position, temperature, top_p)
        assert s.prob == pytest.approx(float(p[s.token]), rel=1e-4, abs=1e-6)
        assert s.logprob == pytest.approx(math.log(float(p[s.token])), abs=1e-4)
        assert s.prob_temp == pytest.approx(float(pt[s.token]), rel=1e-4, abs=1e-6)
        assert s.prob_sample == pytest.approx(float(ps[s.token]), rel=1e-4, abs=1e-6)
        assert s.nucleus == nucleus
        assert s.entropy == pytest.approx(entropy_bits(p), abs=1e-3)
        assert s.sample_entropy == pytest.approx(entropy_bits(ps), abs=1e-3)
        assert s.rank == int((p > p[s.token]).sum()) + 1
        top = torch.topk(p, 4).indices.tolist()
        assert [a.token for a in s.alternatives] == top
        for a in s.alternatives:
            assert a.prob == pytest.approx(float(p[a.token]), rel=1e-4, abs=1e-6)
            assert a.prob_temp == pytest.approx(float(pt[a.token]), rel=1e-4, abs=1e-6)
            assert a.prob_sample == pytest.approx(float(ps[a.token]), rel=1e-4, abs=1e-6)
            assert a.piece == llama.tokenizer.decode([a.token])
        if not s.prompt:
            assert s.prob_sample > 0  # a sampled token is always inside the nucleus
        nuclei.add(s.nucleus)
    if 0 < temperature < 1:
        assert len(nuclei) > 1 and min(nuclei) < 50  # the peaked model makes top-p matter


@pytest.mark.parametrize("temperature,top_p,seed", [(0.0, 0.9, 1), (0.6, 0.9, 1), (1.0, 0.8, 7), (1.5, 1.0, 42)])
def test_chosen_tokens_equal_generate(peaky_llama, tiny_llama, temperature, top_p, seed):
    for llama in (peaky_llama, tiny_llama):
        ids = llama.tokenizer.encode(PROMPT, bos=True, eos=False)
        torch.manual_seed(seed)
        tokens, _ = llama.generate([ids], 8, temperature, top_p)
        torch.manual_seed(seed)
        tokens_lp, logprobs = llama.generate([ids], 8, temperature, top_p, logprobs=True)
        e = llama.explain(ids, 8, temperature, top_p, seed=seed)
        assert e.tokens == tokens[0] == tokens_lp[0]
        gen = [s for s in e.steps if not s.stop]
        assert [s.logprob for s in gen] == pytest.approx(logprobs[0], abs=1e-4)
        dec = llama.tokenizer.decode
        assert dec(ids) + e.text == dec(ids + tokens[0])  # pieces read on from the prompt
    # without a seed, explain draws from torch's global generator, as generate does
    torch.manual_seed(seed)
    assert llama.explain(ids, 8, temperature, top_p, top_k_shown=1).tokens == tokens[0]


def test_stop_token_is_explained_but_not_returned(peaky_llama):
    from nabla.api import Llama

    ids = peaky_llama.tokenizer.encode(PROMPT, bos=True, eos=False)
    free = peaky_llama.explain(ids, 10, 0.0, 0.9).tokens
    # The same model, with the fourth greedy token made a stop token.
    llama = Llama(peaky_llama.model, peaky_llama.tokenizer)
    stop = free[3]
    llama.stop_ids = (stop,)
    e = llama.explain(ids, 10, 0.0, 0.9)
    tokens, _ = llama.generate([ids], 10, 0.0, 0.9)
    assert e.steps[-1].stop and e.steps[-1].token == stop and e.steps[-1].text == ""
    assert e.tokens == tokens[0] == free[:free.index(stop)]
    assert [s.token for s in e.steps[:-1]] == e.tokens


def test_text_pieces_join_to_the_generation(tiny_llama):
    e = tiny_llama.explain(PROMPT, 16, 0.9, 0.95, echo=True, seed=3)
    prompt_text = "".join(s.text for s in e.steps if s.prompt)
    assert prompt_text == PROMPT
    dec = tiny_llama.tokenizer.decode
    assert prompt_text + e.text == dec(e.prompt_tokens + e.tokens)
    only_prompt = tiny_llama.explain(PROMPT, 0, echo=True)
    assert only_prompt.tokens == [] and [s.token for s in only_prompt.steps] == e.prompt_tokens
    d = json.loads(json.dumps(e.to_dict()))
    assert d["tokens"] == e.tokens and len(d["steps"]) == len(e.steps)
    assert d["steps"][1]["surprisal"] == pytest.approx(-d["steps"][1]["logprob"] / math.log(2))


def test_explain_bad_input(tiny_llama):
    with pytest.raises(InvalidRequestError, match="empty"):
        tiny_llama.explain("   ", 4)
    with pytest.raises(InvalidRequestError, match="temperature"):
        tiny_llama.explain(PROMPT, 4, temperature=-1)
    with pytest.raises(InvalidRequestError, match="top_p"):
        tiny_llama.explain(PROMPT, 4, top_p=0)
    with pytest.raises(InvalidRequestError, match="top_k_shown"):
        tiny_llama.explain(PROMPT, 4, top_k_shown=0)
    with pytest.raises(ContextLengthError, match="max_seq_len"):
        tiny_llama.explain([1] + [450] * tiny_llama.max_seq_len, 4)
    with pytest.raises(InvalidRequestError, match="empty"):
        tiny_llama.explain([], 4)


# ------------------------------------------------------------------- score
def test_score_equals_full_forward(tiny_llama):
    text = "The little dog ran to the park. It was a sunny day."
    s = score(tiny_llama, text)
    ids = tiny_llama.tokenizer.encode(text, bos=True, eos=False)
    with torch.no_grad():
        logits = tiny_llama.model(torch.tensor([ids]))[0, :-1].double()
    nll = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="none")
    assert [st.token for st in s.steps] == ids[1:]
    assert [st.surprisal for st in s.steps] == pytest.approx((nll / math.log(2)).tolist(), abs=1e-4)
    assert s.perplexity == pytest.approx(math.exp(float(nll.mean())), rel=1e-5)
    assert s.bits_per_byte == pytest.approx(float(nll.sum()) / math.log(2) / len(text.encode()), rel=1e-5)
    assert "".join(st.text for st in s.steps) == text


def test_score_windows_give_every_token_context(tiny_llama):
    text = "One day, a little girl named Lily found a needle in her room. She knew it was difficult to " \
           "play with it because it was sharp. Lily wanted to share the needle with her mom."
    window, stride = 16, 6
    s = score(tiny_llama, text, window=window, stride=stride)
    ids = tiny_llama.tokenizer.encode(text, bos=True, eos=False)
    assert len(ids) > 2 * window
    assert [st.position for st in s.steps] == list(range(1, len(ids)))
    starts = list(range(0, len(ids), stride))
    windows = {}
    for st in s.steps:
        i = st.position
        b = next(b for b in starts if i < b + window)  # the first window that holds token i scores it
        assert i - b >= min(i, window - stride)
        if b not in windows:
            with torch.no_grad():
                windows[b] = torch.log_softmax(tiny_llama.model(torch.tensor([ids[b:b + window]]))[0], -1)
        assert st.logprob == pytest.approx(float(windows[b][i - b - 1, ids[i]]), abs=1e-4)
    assert "".join(st.text for st in s.steps) == text


def test_score_bad_input(tiny_llama):
    with pytest.raises(InvalidRequestError, match="empty"):
        score(tiny_llama, "")
    with pytest.raises(InvalidRequestError, match="window"):
        score(tiny_llama, "hello", window=tiny_llama.max_seq_len + 1)
    with pytest.raises(InvalidRequestError, match="stride"):
        score(tiny_llama, "hello", window=8, stride=8)


# -------------------------------------------------------------------- HTML
class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs, self.tags, self.spans, self.scripts = [], [], 0, []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        a = dict(attrs)
        for key in ("src", "href", "action", "srcset", "poster", "data"):
            if key in a and tag != "span":
                self.refs.append(a[key])
        if tag == "span" and "tok" in (a.get("class") or "").split():
            self.spans += 1


def _external(page: str, parser: _Links) -> list[str]:
    bad = [r for r in parser.refs if r and (r.startswith(("http:", "https:", "//")) or ":" in r.split("/")[0])]
    lowered = page.lower()
    for needle in ("@import", "url(", "http://", "https://", "<link", "<iframe", "fetch(", "xmlhttprequest"):
        if needle in lowered:
            bad.append(needle)
    return bad


def _fake_explanation() -> Explanation:
    evil = '</script><script>alert("x")</script>&<b>'
    alts = [Alternative(5, evil, 0.5, 0.6, 0.7), Alternative(6, "a\nb", 0.2, 0.1, 0.0)]
    steps = [TokenExplanation(0, 1, "", "", prompt=True),
             TokenExplanation(1, 5, evil, evil, prob=0.5, logprob=math.log(0.5), prob_temp=0.6, prob_sample=0.7,
                              rank=1, nucleus=1, entropy=1.0, sample_entropy=0.0, alternatives=alts),
             TokenExplanation(2, 6, "\n", "\n", prob=0.2, logprob=math.log(0.2), prob_temp=0.1, prob_sample=0.0,
                              rank=2, nucleus=1, entropy=1.0, sample_entropy=0.0, alternatives=alts),
             TokenExplanation(3, 2, "", "", stop=True, prob=0.1, logprob=math.log(0.1), prob_temp=0.1,
                              prob_sample=0.1, rank=3, nucleus=2, entropy=1.0, sample_entropy=1.0)]
    return Explanation([1], 0.7, 0.9, 1, True, steps, prompt=evil)


def test_html_is_escaped_and_self_contained(tiny_llama):
    page = explanation_html(_fake_explanation())
    assert '<script>alert("x")' not in page and "&lt;/script&gt;" in page
    assert page.count("</script>") == 2  # the data block and the code, nothing injected
    p = _Links()
    p.feed(page)
    assert p.spans == 4 and "script" in p.tags and "style" in p.tags
    assert _external(page, p) == []

    e = tiny_llama.explain(PROMPT, 6, 0.8, 0.9, echo=False, seed=2)
    page = explanation_html(e)
    p = _Links()
    p.feed(page)
    assert p.spans == len(e.steps) and _external(page, p) == []
    assert PROMPT in page
    s = score(tiny_llama, "A cat & a <dog>.")
    page = score_html(s)
    p = _Links()
    p.feed(page)
    assert p.spans == len(s.steps) and _external(page, p) == [] and "<dog>" not in page and "&lt;" in page


def _chromium(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'chromium-profile'}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(not CHROMIUM.exists(), reason="Chromium is not installed (apt-get install -y chromium); "
                                                 "the page is still checked by html.parser")
def test_html_renders_in_headless_chromium(tiny_llama, tmp_path):
    e = tiny_llama.explain(PROMPT, 6, 0.8, 0.9, echo=True, seed=2)
    path = tmp_path / "explain.html"
    path.write_text(explanation_html(e), encoding="utf-8")
    out = _chromium(["--dump-dom", f"{path.as_uri()}#t=5"], tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    dom = out.stdout
    p = _Links()
    p.feed(dom)
    assert p.spans == len(e.steps)
    assert f"{len(e.steps)} tokens explained" in dom  # the script ran to the end
    pinned = e.steps[5]
    assert f"id {pinned.token}, position 5" in dom  # #t=5 pinned the token's details
    assert "<table>" in dom and "after top-p" in dom

    shot = tmp_path / "shot.png"
    out = _chromium([f"--screenshot={shot}", "--window-size=1000,600", f"{path.as_uri()}#t=5"], tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------- CLI
def _cli(args, model, capsys):
    rc = main(["explain", *args, "--model", str(model), "--max-seq-len", "128"])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_json_equals_generate(make_checkpoint, tiny_llama, capsys):
    model = make_checkpoint(TINY_MHA)
    rc, out, _ = _cli([PROMPT, "--json", "--temperature", "0.7", "--seed", "9", "--max-gen-len", "6",
                       "--top-k-shown", "3"], model, capsys)
    assert rc == 0
    d = json.loads(out)
    ids = tiny_llama.tokenizer.encode(PROMPT, bos=True, eos=False)
    torch.manual_seed(9)
    tokens, _ = tiny_llama.generate([ids], 6, 0.7, 0.9)
    assert d["tokens"] == tokens[0] and d["prompt"] == PROMPT
    assert all(len(s["alternatives"]) == 3 for s in d["steps"])


def test_cli_table_and_html(make_checkpoint, tmp_path, capsys):
    model = make_checkpoint(TINY_MHA)
    html_path = tmp_path / "out" / "page.html"
    rc, out, err = _cli([PROMPT, "--max-gen-len", "4", "--echo", "--html", str(html_path)], model, capsys)
    assert rc == 0
    assert "why each token" in out and "nucleus" in out and "Once" in out
    page = html_path.read_text(encoding="utf-8")
    p = _Links()
    p.feed(page)
    assert p.spans >= 5 + 4 - 1 and _external(page, p) == []
    assert not list(html_path.parent.glob(".*.tmp"))  # written atomically, no leftovers


def test_cli_score(make_checkpoint, tiny_llama, tmp_path, capsys):
    model = make_checkpoint(TINY_MHA)
    text = "The cat sat on the mat."
    rc, out, _ = _cli(["--score", text, "--json"], model, capsys)
    assert rc == 0
    d = json.loads(out)
    ref = score(tiny_llama, text)
    assert d["perplexity"] == pytest.approx(ref.perplexity, rel=1e-5)
    assert d["bits_per_byte"] == pytest.approx(ref.bits_per_byte, rel=1e-5)
    assert d["bytes"] == len(text.encode())

    rc, out, _ = _cli(["--score", text], model, capsys)
    assert rc == 0 and "perplexity" in out and "bits/byte" in out and "mat" in out

    f = tmp_path / "story.txt"
    f.write_text("Lily found a needle. " * 12, encoding="utf-8")
    rc, out, err = _cli(["--score-file", str(f), "--window", "24", "--stride", "12", "--json", "--per-token",
                         "--html", str(tmp_path / "score.html")], model, capsys)
    assert rc == 0
    d = json.loads(out)
    assert d["predicted"] == len(d["steps"]) == d["tokens"] - 1
    assert d["window"] == 24 and "scoring" in err  # the progress bar
    assert (tmp_path / "score.html").read_text().count('class="tok') == d["predicted"]


@pytest.mark.parametrize("args,message", [
    (["", "--max-gen-len", "2"], "give a prompt"),
    ([PROMPT, "--temperature", "-0.5"], "temperature"),
    ([PROMPT, "--top-p", "1.5"], "top_p"),
    ([PROMPT, "--top-k-shown", "0"], "top_k_shown"),
    ([PROMPT, "--max-gen-len", "-3"], "max_gen_len"),
    (["--score", "  "], "empty"),
    (["--score-file", "/nonexistent/story.txt"], "no such file"),
    (["--score", "x", "--window", "1"], "window"),
    ([PROMPT * 100], "max_seq_len"),
])
def test_cli_bad_input(make_checkpoint, capsys, args, message):
    rc, _, err = _cli(args, make_checkpoint(TINY_MHA), capsys)
    assert rc == 1 and message in err and "Traceback" not in err


def test_cli_unreadable_score_file(make_checkpoint, tmp_path, capsys):
    f = tmp_path / "latin1.txt"
    f.write_bytes("caf\xe9".encode("latin-1"))
    rc, _, err = _cli(["--score-file", str(f)], make_checkpoint(TINY_MHA), capsys)
    assert rc == 1 and "not UTF-8" in err
    rc, _, err = _cli(["--score-file", str(tmp_path)], make_checkpoint(TINY_MHA), capsys)
    assert rc == 1 and "folder" in err

