"""Llama 3 header format and Hugging Face Jinja templates; the model's tokenizer picks the format."""

import json
import shutil

import pytest
import torch
from conftest import LLAMA2_TOKENIZER, LLAMA3_TOKENIZER, TINYLLAMA_DIR, random_state

from nabla import Llama
from nabla.errors import InvalidRequestError
from nabla.tokenizer import load_tokenizer
from nabla.tokenizer.chat import JinjaChatFormat, Llama2ChatFormat, Llama3ChatFormat, chat_format_for

DIALOGS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello world"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": " What is 2+2?\n"}],
]


@pytest.fixture(scope="module")
def llama3():
    return load_tokenizer(LLAMA3_TOKENIZER)


@pytest.fixture(scope="module")
def tinyllama():
    return load_tokenizer(TINYLLAMA_DIR / "tokenizer.json")


def test_llama3_known_ids(llama3):
    fmt = chat_format_for(llama3)
    assert isinstance(fmt, Llama3ChatFormat)
    ids = fmt.encode_dialog([{"role": "user", "content": "Hello world"}])
    # <|begin_of_text|> <|start_header_id|> user <|end_header_id|> \n\n Hello world <|eot_id|>
    # <|start_header_id|> assistant <|end_header_id|> \n\n
    assert ids == [128000, 128006, 882, 128007, 271, 9906, 1917, 128009, 128006, 78191, 128007, 271]
    ids = fmt.encode_dialog([{"role": "system", "content": " Hello world "}, {"role": "user", "content": "Hi"}])
    assert ids[:8] == [128000, 128006, 9125, 128007, 271, 9906, 1917, 128009]  # content is stripped


def test_llama3_equals_meta_text_rendering(llama3):
    """Meta's format as text, encoded with special tokens allowed, gives the same ids."""
    dialog = DIALOGS[1]
    text = "<|begin_of_text|>" + "".join(
        f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>" for m in dialog
    ) + "<|start_header_id|>assistant<|end_header_id|>\n\n"
    assert chat_format_for(llama3).encode_dialog(dialog) == llama3.encode_with_special(text)


def test_llama2_format_unchanged():
    fmt = chat_format_for(load_tokenizer(LLAMA2_TOKENIZER))
    assert isinstance(fmt, Llama2ChatFormat)
    assert fmt.encode_dialog([{"role": "user", "content": "Hi"}])[:5] == [1, 518, 25580, 29962, 6324]


def test_tinyllama_template_text(tinyllama):
    fmt = chat_format_for(tinyllama)
    assert isinstance(fmt, JinjaChatFormat)
    assert fmt.render(DIALOGS[0]) == "<|user|>\nHi</s>\n<|assistant|>\n"
    ids = fmt.encode_dialog(DIALOGS[0])
    assert ids[0] != tinyllama.bos_id  # the template adds no BOS, and neither do we
    assert ids.count(2) == 1  # </s> is the EOS token, not text


def test_tinyllama_equals_transformers(tinyllama):
    try:
        from transformers import AutoTokenizer

        ref = AutoTokenizer.from_pretrained(str(TINYLLAMA_DIR), local_files_only=True)
    except Exception as e:  # pragma: no cover - depends on the installed transformers
        pytest.skip(f"transformers cannot load the tokenizer offline: {e}")
    fmt = chat_format_for(tinyllama)
    for dialog in DIALOGS:
        want = ref.apply_chat_template(dialog, add_generation_prompt=True, tokenize=True)
        if not isinstance(want, list):
            want = want["input_ids"]
        assert fmt.encode_dialog(dialog) == list(want)


def test_template_raise_exception(tinyllama):
    fmt = JinjaChatFormat(tinyllama, "{{ raise_exception('roles must alternate') }}")
    with pytest.raises(InvalidRequestError, match="roles must alternate"):
        fmt.encode_dialog(DIALOGS[0])


def test_template_with_sentencepiece_splits_special_tokens(tmp_path):
    """A SentencePiece folder with a chat template: BOS/EOS strings in the text become their ids."""
    shutil.copy(LLAMA2_TOKENIZER, tmp_path / "tokenizer.model")
    config = json.loads((TINYLLAMA_DIR / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(tmp_path / "tokenizer.model")
    ids = chat_format_for(tok).encode_dialog(DIALOGS[0])
    assert ids.count(2) == 1 and ids[-1] != 2


def test_chat_completion_picks_the_format(tmp_path):
    """A Llama 3 Meta folder: chat prompts use headers, and <|eot_id|> stops generation."""
    from nabla.checkpoint.meta import args_from_params

    params = dict(dim=32, n_layers=1, n_heads=2, vocab_size=128256, multiple_of=32, rope_theta=500000.0)
    (tmp_path / "params.json").write_text(json.dumps(params))
    torch.save(random_state(args_from_params(params), seed=1), tmp_path / "consolidated.00.pth")
    shutil.copy(LLAMA3_TOKENIZER, tmp_path / "tokenizer.model")
    llama = Llama.build(tmp_path, None, max_seq_len=64, max_batch_size=2)
    assert isinstance(llama.chat_format, Llama3ChatFormat) and 128009 in llama.stop_ids
    dialog = [{"role": "user", "content": "Hello world"}]
    assert llama.encode_chat(dialog)[-4:] == [128006, 78191, 128007, 271]
    out = llama.chat_completion([dialog], temperature=0.0, max_gen_len=8)
    assert out[0]["generation"]["role"] == "assistant"
