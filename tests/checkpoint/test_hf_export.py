"""`nabla convert --to hf` writes a folder transformers opens as it is: AutoTokenizer gives nabla's
token ids and AutoModelForCausalLM nabla's greedy continuation (the built-in model, a Llama 2
SentencePiece and a Llama 3 tiktoken tokenizer); tokenizer.json built offline equals the source."""

import json
from pathlib import Path

import pytest
import torch
from conftest import LLAMA2_TOKENIZER, LLAMA3_TOKENIZER, STORY_TEXT, TINY_GQA, TINYLLAMA_DIR, random_state

import nabla
from checkpoint.helpers import hf_folder, meta_folder, tiny_args
from nabla import Llama
from nabla.checkpoint.convert import convert_checkpoint
from nabla.cli import main
from nabla.tokenizer import load_tokenizer
from nabla.tokenizer.hf_export import hf_tokenizer

transformers = pytest.importorskip("transformers")

STORIES = Path(nabla.__file__).parent / "assets" / "stories"
TEXTS = [
    "Once upon a time, there was a little girl named Lily.",
    "Hello world",
    " leading space",
    "  two  spaces   and three ",
    "line\nbreak\n\n\ndouble\ttab\r\nwindows",
    "naïve café — “quotes” ‘x’ …",
    "日本語のテキスト 中文 한국어",
    "emoji 😀🦙 and math 𝔘𝔫𝔦 ∑∫ ǅ",  # byte fallback in small vocabularies
    "",
    " ",
    "\n",
    "x" * 40 + " 1234567 3.14159",
]
PROMPTS = ["Once upon a time", " Lily and Tom went", "The dog said:\n\n“Hello"]


def story_lines(n=60):
    return [line for line in STORY_TEXT.read_text(encoding="utf-8").split("\n") if line][:n]


def hf_load(folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True).float().eval()
    return tok, model


def check_folder(folder, texts, prompts, n=32):
    """AutoTokenizer's ids (with its BOS) and decoding, and generate()'s greedy continuation, equal nabla's."""
    ref_tok, ref = hf_load(folder)
    llama = Llama.build(folder, None, max_seq_len=128, max_batch_size=1)
    tok = llama.tokenizer
    for text in texts:
        want = tok.encode(text, bos=True, eos=False)
        got = ref_tok(text)["input_ids"]
        assert list(got) == want, text
        assert ref_tok.decode(want, skip_special_tokens=True) == tok.decode(want), text
    for prompt in prompts:
        ids = tok.encode(prompt, bos=True, eos=False)
        out, _ = llama.generate([ids], max_gen_len=n, temperature=0.0)
        with torch.no_grad():
            gen = ref.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                               attention_mask=torch.ones(1, len(ids), dtype=torch.long))
        got = gen[0, len(ids):].tolist()
        stops = set(tok.stop_ids)
        while got and got[-1] in stops and len(got) > len(out[0]):  # transformers keeps the stop token
            got.pop()
        assert got == out[0], prompt


def test_builtin_model_round_trip(tmp_path):
    out = tmp_path / "hf"
    assert main(["convert", "--model", str(STORIES), "--out", str(out), "--to", "hf"]) == 0
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).is_file(), name
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["bos_token"] == "<s>" and config["eos_token"] == "</s>" and config["add_bos_token"] is True
    assert config["model_max_length"] == json.loads((out / "config.json").read_text())["max_position_embeddings"]
    assert "[INST]" in config["chat_template"]
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["bos_token_id"] == 1 and gen["eos_token_id"] == 2
    check_folder(out, TEXTS + story_lines(), PROMPTS)


def test_builtin_model_chat_prompt_equals_nabla(tmp_path):
    """The exported template is Meta's Llama 2 format: transformers renders nabla's chat prompt."""
    from nabla.tokenizer.chat import Llama2ChatFormat

    out = tmp_path / "hf"
    convert_checkpoint(STORIES, out, "hf")
    ref_tok, _ = hf_load(out)
    nabla_tok = load_tokenizer(STORIES / "tokenizer.model")
    dialog = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Tell a story."},
              {"role": "assistant", "content": " Once upon a time. "}, {"role": "user", "content": "More!"}]
    want = Llama2ChatFormat(nabla_tok).encode_dialog(dialog)
    got = ref_tok.apply_chat_template(dialog, add_generation_prompt=True, tokenize=True)
    got = got["input_ids"] if not isinstance(got, list) else got
    assert list(got) == want
    # nabla reading the exported folder back uses the template, with the same ids
    assert Llama.build(out, None, max_seq_len=64, max_batch_size=1).encode_chat(dialog) == want


def test_llama2_tokenizer_round_trip(tmp_path):
    params = dict(TINY_GQA, vocab_size=32000)
    src = meta_folder(tmp_path / "meta", params, random_state(tiny_args(params), seed=41))
    convert_checkpoint(src, tmp_path / "hf", "hf")
    check_folder(tmp_path / "hf", TEXTS + story_lines(30), PROMPTS)


def test_llama3_tiktoken_round_trip(tmp_path):
    params = dict(TINY_GQA, vocab_size=128256, dim=32, n_heads=2, n_kv_heads=1, n_layers=1)
    src = meta_folder(tmp_path / "meta", params, random_state(tiny_args(params), seed=42),
                      tokenizer=LLAMA3_TOKENIZER)
    out = tmp_path / "hf"
    convert_checkpoint(src, out, "hf")
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["bos_token"] == "<|begin_of_text|>" and "<|start_header_id|>" in config["chat_template"]
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [128001, 128009]
    check_folder(out, TEXTS + story_lines(20), PROMPTS, n=8)
    # the chat template is Meta's Llama 3 format, as nabla encodes it
    ref_tok, _ = hf_load(out)
    nabla_tok = load_tokenizer(LLAMA3_TOKENIZER)
    dialog = [{"role": "system", "content": " Be brief. "}, {"role": "user", "content": "Hi\n"}]
    from nabla.tokenizer.chat import chat_format_for

    got = ref_tok.apply_chat_template(dialog, add_generation_prompt=True, tokenize=True)
    got = got["input_ids"] if not isinstance(got, list) else got
    assert list(got) == chat_format_for(nabla_tok).encode_dialog(dialog)


def test_hf_source_keeps_its_tokenizer_files(tmp_path):
    path, _, _ = hf_folder(tmp_path / "src", TINY_GQA, seed=43)
    convert_checkpoint(path, tmp_path / "hf", "hf")
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (tmp_path / "hf" / name).read_bytes() == (TINYLLAMA_DIR / name).read_bytes(), name


def test_hf_source_without_configs_gets_them(tmp_path):
    path, _, _ = hf_folder(tmp_path / "src", TINY_GQA, seed=44)
    for name in ("tokenizer_config.json", "generation_config.json", "special_tokens_map.json"):
        (path / name).unlink()
    convert_checkpoint(path, tmp_path / "hf", "hf")
    config = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert config["bos_token"] == "<s>" and config["eos_token"] == "</s>"
    assert json.loads((tmp_path / "hf" / "generation_config.json").read_text())["eos_token_id"] == 2


@pytest.mark.parametrize("path", [STORIES / "tokenizer.model", LLAMA2_TOKENIZER, LLAMA3_TOKENIZER],
                         ids=["stories", "llama2", "llama3"])
def test_tokenizer_json_encodes_as_the_source(path):
    """Without transformers: the built tokenizers.Tokenizer gives the source's ids and text on a story."""
    tok = load_tokenizer(path)
    tk = hf_tokenizer(tok)
    text = STORY_TEXT.read_text(encoding="utf-8")[:20000]
    for piece in [*TEXTS, text]:
        ids = tok.encode(piece, bos=False, eos=False)
        assert tk.encode(piece, add_special_tokens=False).ids == ids, piece[:40]
        assert tk.decode(ids, skip_special_tokens=True) == tok.decode(ids), piece[:40]
