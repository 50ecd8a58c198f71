"""Stop strings never leak: text is held back while it could still be the start of one."""

from __future__ import annotations

import pytest

from nabla.server.text import ChoiceText, Tok


class Pieces:
    """A tokenizer whose ids index a list of text pieces."""

    def __init__(self, pieces):
        self.pieces = pieces

    def decode(self, ids):
        return "".join(self.pieces[i] for i in ids)


def run(pieces, stops, final=True):
    tok = Pieces(["<prompt>"] + pieces)
    ct = ChoiceText(tok, [0], stops)
    out, tokens, reason = [], [], None
    for i in range(1, len(pieces) + 1):
        text, toks, stopped = ct.push(Tok(i, pieces[i - 1], [], None, None))
        out.append(text)
        tokens += [t.id for t in toks]
        if stopped:
            reason = "stop"
            break
    else:
        if final:
            text, toks, stopped = ct.finish()
            out.append(text)
            tokens += [t.id for t in toks]
            reason = "stop" if stopped else "length"
    return out, tokens, reason


@pytest.mark.parametrize("pieces, stops, text, reason", [
    (["Hel", "lo wor", "ld"], ["wor"], "Hello ", "stop"),
    (["Hel", "lo wor", "ld"], ["o w"], "Hell", "stop"),
    (["a", "a", "a", "b", "c"], ["aab"], "a", "stop"),
    (["x", "y", "z"], ["yz!"], "xyz", "length"),
    (["The end", "."], ["END", "d."], "The en", "stop"),
    (["abc"], ["c"], "ab", "stop"),
    (["ab", "cd"], [], "abcd", "length"),
])
def test_stop_strings(pieces, stops, text, reason):
    out, _, why = run(pieces, stops)
    assert "".join(out) == text and why == reason
    for s in stops:
        assert all(s not in piece for piece in out)


def test_text_is_held_only_while_it_may_start_a_stop():
    out, _, _ = run(["Hel", "lo wo", "ndy"], ["wor"], final=False)
    assert out == ["Hel", "lo ", "wondy"]


def test_tokens_follow_their_text():
    # The token that completes a held prefix is released with it; tokens after a stop are dropped.
    out, tokens, why = run(["a", "b", "X", "c", "d"], ["Xc"])
    assert "".join(out) == "ab" and tokens == [1, 2] and why == "stop"
    out, tokens, _ = run(["a", "b", "X", "d"], ["Xc"])
    assert "".join(out) == "abXd" and tokens == [1, 2, 3, 4]


def test_window_decoder_equals_full_decode():
    """Decoding a few tokens at a time gives exactly the text of decoding everything (random ids,
    raw byte tokens that spell partial UTF-8, real text)."""
    import random

    from conftest import LLAMA2_TOKENIZER

    from nabla.tokenizer import load_tokenizer
    from nabla.tokenizer.base import IncrementalDecoder

    tok = load_tokenizer(LLAMA2_TOKENIZER)
    rng = random.Random(0)
    texts = ["Héllo wörld — naïve café 日本語のテキスト 🙂🙃 end", "a  b\n\n c\t d", "Once upon a time"]
    for trial in range(90):
        prompt = tok.encode(rng.choice(texts), bos=True, eos=False)
        gen = ([rng.randrange(3, 32000) for _ in range(30)], [rng.randrange(3, 259) for _ in range(30)],
               tok.encode(rng.choice(texts) + " " + rng.choice(texts), bos=False, eos=False))[trial % 3]
        d = IncrementalDecoder(tok, prompt)
        pieces = [d.push(t) for t in gen] + [d.flush()]
        assert "".join(pieces) == tok.decode(prompt + gen)[len(tok.decode(prompt)):]
