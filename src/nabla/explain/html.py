"""A self-contained HTML page of an explanation: every token shaded by its probability.

Hovering (or clicking, to pin) a token shows what the model weighed there:
the top alternatives with their probabilities at temperature 1, after
temperature and after top-p, the nucleus size and the entropy. One file, with
inline CSS and JavaScript only: no font, script or image is fetched from
anywhere, so it opens offline and leaks nothing. `#t=K` in the address pins
token K on load (for screenshots). Without JavaScript each token's title
still says its probability and the runners-up.
"""

from __future__ import annotations

import html
import json

from nabla.explain.explain import Explanation, TokenExplanation
from nabla.explain.score import ScoredText


def _num(x: float | None) -> float | None:
    return None if x is None else float(f"{x:.6g}")


def _step_data(s: TokenExplanation) -> dict:
    return {"i": s.position, "t": s.token, "s": s.piece, "p": _num(s.prob), "lp": _num(s.logprob),
            "pt": _num(s.prob_temp), "ps": _num(s.prob_sample), "r": s.rank, "n": s.nucleus,
            "h": _num(s.entropy), "hs": _num(s.sample_entropy), "prompt": s.prompt, "stop": s.stop,
            "alts": [[a.token, a.piece, _num(a.prob), _num(a.prob_temp), _num(a.prob_sample)]
                     for a in s.alternatives]}


def _colour(p: float | None) -> str:
    """Red (improbable) through yellow (25%) to green (certain); grey when nothing predicted the token.

    The hue follows the square root of p, so the common range of 1% to 30%
    spreads over red, orange and yellow instead of all looking red.
    """
    if p is None:
        return "#e4e4e4"
    return f"hsl({120 * max(0.0, min(1.0, p)) ** 0.5:.0f}, 75%, 78%)"


def _label(s: TokenExplanation) -> tuple[str, str]:
    """What the span shows, and extra classes."""
    if s.stop:
        return "\u27e8stop\u27e9", " special"
    if s.prob is None and not s.text:
        return "\u27e8start\u27e9", " special"
    if not s.text:
        return "\u2026", " partial"  # an unfinished UTF-8 character; the next token completes it
    return s.text.replace("\n", "\u21b5\n"), ""


def _title(s: TokenExplanation) -> str:
    if s.prob is None:
        return f"{s.piece!r}: the first token (nothing predicts it)"
    alts = ", ".join(f"{a.piece!r} {a.prob:.3f}" for a in s.alternatives)
    return f"{s.piece!r}: p={s.prob:.4f} (rank {s.rank}); top: {alts}"


def _spans(steps: list[TokenExplanation]) -> str:
    out = []
    for k, s in enumerate(steps):
        label, extra = _label(s)
        cls = "tok" + extra + (" prompt" if s.prompt else "")
        out.append(f'<span class="{cls}" data-k="{k}" style="background:{_colour(s.prob)}" '
                   f'title="{html.escape(_title(s), quote=True)}">{html.escape(label)}</span>')
    return "".join(out)


def _json_for_script(obj) -> str:
    # Inside <script>, "</script>" or "<!--" in a token would end the block: escape <, > and &.
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


def explanation_html(e: Explanation, prompt_text: str | None = None, title: str = "nabla explain") -> str:
    """The page for `Llama.explain`'s result; prompt_text is shown before the tokens when echo is off."""
    if prompt_text is None:
        prompt_text = e.prompt or ""
    sampling = "greedy (temperature 0)" if e.temperature == 0 else \
        f"temperature {e.temperature:g} \u00b7 top-p {e.top_p:g}" + (f" \u00b7 seed {e.seed}" if e.seed is not None
                                                                     else "")
    meta = f"{sampling} \u00b7 {len(e.tokens)} generated tokens"
    lead = "" if e.echo else f'<span class="prompt-text">{html.escape(prompt_text)}</span>'
    info = {"mode": "generate", "temperature": e.temperature, "top_p": e.top_p}
    return _page(title, meta, lead, e.steps, info)


def score_html(s: ScoredText, title: str = "nabla explain --score") -> str:
    """The page for `score`'s result: each token shaded by the probability the model gave it."""
    meta = (f"{len(s.steps) + 1} tokens \u00b7 perplexity {s.perplexity:.3f} \u00b7 {s.bits_per_token:.3f} bits/token "
            f"\u00b7 {s.bits_per_byte:.4f} bits/byte \u00b7 window {s.window}, stride {s.stride}")
    return _page(title, meta, "", s.steps, {"mode": "score", "temperature": 1.0, "top_p": 1.0})


def _page(title: str, meta: str, lead: str, steps: list[TokenExplanation], info: dict) -> str:
    data = {**info, "steps": [_step_data(s) for s in steps]}
    return _TEMPLATE.format(
        title=html.escape(title), meta=html.escape(meta), lead=lead, spans=_spans(steps), css=_CSS,
        js=_JS, data=_json_for_script(data))


_CSS = """
:root { color-scheme: light; }
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0; color: #1d1d1f;
       background: #fafafa; }
header { padding: 14px 22px 6px; }
h1 { font-size: 18px; margin: 0 0 2px; }
.meta { color: #555; margin: 0; font-size: 13px; }
.legend { display: flex; align-items: center; gap: 8px; font-size: 12px; color: #555; margin-top: 6px; }
.bar { width: 180px; height: 10px; border-radius: 3px;
       background: linear-gradient(90deg, hsl(0,75%,78%), hsl(60,75%,78%), hsl(120,75%,78%)); }
.wrap { display: flex; gap: 18px; padding: 10px 22px 22px; align-items: flex-start; }
#text { flex: 1 1 60%; white-space: pre-wrap; word-break: break-word; font: 15px/1.9 ui-monospace, Menlo,
        Consolas, monospace; background: #fff; border: 1px solid #ddd; border-radius: 8px; padding: 14px; }
.prompt-text { color: #777; }
.tok { border-radius: 3px; padding: 1px 0; cursor: pointer; box-shadow: inset 0 -1px 0 rgba(0,0,0,.12); }
.tok.prompt { text-decoration: underline dotted #888; }
.tok.special, .tok.partial { color: #555; font-size: 12px; }
.tok.active { outline: 2px solid #222; }
#detail { flex: 0 0 340px; background: #fff; border: 1px solid #ddd; border-radius: 8px; padding: 12px 14px;
          font-size: 13px; position: sticky; top: 10px; }
#detail h2 { font-size: 15px; margin: 0 0 6px; font-family: ui-monospace, Menlo, Consolas, monospace; }
#detail table { border-collapse: collapse; width: 100%; margin-top: 6px; }
#detail td, #detail th { padding: 2px 4px; text-align: right; }
#detail th { font-weight: 600; color: #555; border-bottom: 1px solid #ddd; }
#detail td.piece { text-align: left; font-family: ui-monospace, Menlo, Consolas, monospace; white-space: pre; }
#detail tr.chosen td { background: #eef4ff; font-weight: 600; }
.stats { display: grid; grid-template-columns: auto auto; gap: 0 12px; }
.stats span:nth-child(odd) { color: #666; }
.hint { color: #777; }
.pbar { display: inline-block; height: 8px; background: #7aa7e0; border-radius: 2px; vertical-align: middle; }
#status { color: #999; font-size: 11px; padding: 0 22px 10px; }
"""

_JS = """
(function () {
  var data = JSON.parse(document.getElementById('nabla-data').textContent);
  var steps = data.steps, detail = document.getElementById('detail'), pinned = null, shown = null;
  var greedy = data.mode === 'generate' && data.temperature === 0, score = data.mode === 'score';
  function esc(s) {
    return String(s).replace(/[&<>"']/g, function (c) {
      return {'&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;'}[c];
    });
  }
  function pct(p) { return p === null ? '\\u2013' : (100 * p).toFixed(p >= 0.001 || p === 0 ? 1 : 3) + '%'; }
  function num(x, d) { return x === null ? '\\u2013' : x.toFixed(d); }
  function show(k) {
    var s = steps[k];
    if (shown !== null) { tokens[shown].classList.remove('active'); }
    shown = k; tokens[k].classList.add('active');
    var h = '<h2>' + esc(JSON.stringify(s.s)) + ' <span class="hint">id ' + s.t + ', position ' + s.i +
            '</span></h2>';
    if (s.prompt) { h += '<p class="hint">A prompt token (forced, not sampled).</p>'; }
    if (s.stop) { h += '<p class="hint">A stop token: generation ends here.</p>'; }
    if (s.p === null) {
      detail.innerHTML = h + '<p class="hint">The first token: nothing before it predicts it.</p>'; return;
    }
    h += '<div class="stats"><span>probability</span><span>' + pct(s.p) + '</span>' +
         '<span>logprob</span><span>' + num(s.lp, 4) + '</span>' +
         '<span>surprisal</span><span>' + num(-s.lp / Math.LN2, 2) + ' bits</span>' +
         '<span>rank</span><span>' + s.r + '</span>' +
         '<span>entropy</span><span>' + num(s.h, 2) + ' bits</span>';
    if (!score) {
      h += '<span>sampled from</span><span>' + (greedy ? 'argmax (greedy)' : pct(s.ps) + ' after top-p') +
           '</span><span>nucleus</span><span>' + s.n + (s.n === 1 ? ' token' : ' tokens') + '</span>' +
           '<span>sampling entropy</span><span>' + num(s.hs, 2) + ' bits</span>';
    }
    h += '</div><table><tr><th style="text-align:left">token</th><th>p</th>' +
         (score ? '' : '<th>after T</th><th>after top-p</th>') + '<th></th></tr>';
    var chosenListed = false;
    s.alts.forEach(function (a) {
      var chosen = a[0] === s.t; chosenListed = chosenListed || chosen;
      h += '<tr' + (chosen ? ' class="chosen"' : '') + '><td class="piece">' + esc(JSON.stringify(a[1])) +
           '</td><td>' + pct(a[2]) + '</td>' + (score ? '' : '<td>' + pct(a[3]) + '</td><td>' + pct(a[4]) +
           '</td>') + '<td><span class="pbar" style="width:' + Math.round(80 * a[2]) + 'px"></span></td></tr>';
    });
    if (!chosenListed) {
      h += '<tr class="chosen"><td class="piece">' + esc(JSON.stringify(s.s)) + '</td><td>' + pct(s.p) +
           '</td>' + (score ? '' : '<td>' + pct(s.pt) + '</td><td>' + pct(s.ps) + '</td>') + '<td></td></tr>';
    }
    detail.innerHTML = h + '</table>';
  }
  var tokens = document.querySelectorAll('#text .tok');
  tokens.forEach(function (el) {
    var k = +el.getAttribute('data-k');
    el.addEventListener('mouseenter', function () { if (pinned === null) { show(k); } });
    el.addEventListener('click', function () { pinned = pinned === k ? null : k; show(k); });
  });
  var m = /^#t=(\\d+)$/.exec(location.hash);
  if (m && +m[1] < steps.length) { pinned = +m[1]; show(pinned); }
  document.getElementById('status').textContent = steps.length + ' tokens explained';
})();
"""

_TEMPLATE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>{css}</style>
</head>
<body>
<header>
<h1>{title}</h1>
<p class="meta">{meta}</p>
<div class="legend"><span>p = 0</span><span class="bar"></span><span>100%</span><span>(yellow: 25%)</span>
<span>&middot; hover a token to see the alternatives, click to pin it</span></div>
</header>
<div class="wrap">
<main id="text">{lead}{spans}</main>
<aside id="detail"><p class="hint">Hover a token to see what the model weighed there.</p></aside>
</div>
<p id="status"></p>
<script id="nabla-data" type="application/json">{data}</script>
<script>{js}</script>
</body>
</html>
"""

__all__ = ["explanation_html", "score_html"]
