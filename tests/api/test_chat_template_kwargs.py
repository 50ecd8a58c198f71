"""chat_template_kwargs in the Python API: further variables for a model's Jinja chat template (Qwen3's
enable_thinking), checked against transformers' apply_chat_template(..., enable_thinking=False)."""

import pytest
from conftest import LLAMA2_TOKENIZER
from hf_families import save_family, set_chat_template, template_ids
from tokenizer.family_templates import QWEN3

from nabla import Llama
from nabla.errors import InvalidRequestError
from nabla.tokenizer import load_tokenizer
from nabla.tokenizer.chat import chat_format_for

DIALOG = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
NO_THINKING = {"enable_thinking": False}


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    """(nabla's Llama, transformers' tokenizer) of a tiny transformers-saved Qwen3 with Qwen3's template."""
    pytest.importorskip("transformers")
    path, _ = save_family(tmp_path_factory.mktemp("qwen3"), "qwen3")
    ref = set_chat_template(path, QWEN3)
    return Llama.build(path, None, max_seq_len=128, max_batch_size=2, dtype="fp32", device="cpu"), ref


def test_enable_thinking_equals_transformers(qwen3):
    llama, ref = qwen3
    off = llama.encode_chat(DIALOG, NO_THINKING)
    assert off == template_ids(ref, DIALOG, enable_thinking=False)
    on = llama.encode_chat(DIALOG)
    assert on == template_ids(ref, DIALOG)
    assert off != on  # the variable reached the template: an empty think block closes the prompt
    assert ref.decode(off).endswith("<think>\n\n</think>\n\n") and not ref.decode(on).endswith("</think>\n\n")
    assert llama.encode_chat(DIALOG, {"enable_thinking": True}) == on


def test_chat_completion_answers_the_prompt_the_variables_make(qwen3):
    llama, ref = qwen3
    out = llama.chat_completion([DIALOG], temperature=0.0, max_gen_len=6, chat_template_kwargs=NO_THINKING)
    (tokens,), _ = llama.generate([template_ids(ref, DIALOG, enable_thinking=False)], 6, temperature=0.0)
    assert out[0]["generation"]["content"] == llama.tokenizer.decode(tokens)


@pytest.mark.parametrize("bad, words", [
    ("enable_thinking=false", "must be an object"), ([["enable_thinking", False]], "must be an object"),
    ({"messages": []}, "may not set 'messages'"), ({"add_generation_prompt": False}, "may not set"),
])
def test_bad_kwargs_name_the_parameter(qwen3, bad, words):
    llama, _ = qwen3
    with pytest.raises(InvalidRequestError, match=words) as e:
        llama.chat_completion([DIALOG], max_gen_len=2, chat_template_kwargs=bad)
    assert e.value.param == "chat_template_kwargs"


def test_meta_chat_formats_take_no_kwargs():
    """Llama 2's and 3's formats are code, not a template: variables for one are an error, not ignored."""
    fmt = chat_format_for(load_tokenizer(LLAMA2_TOKENIZER))
    with pytest.raises(InvalidRequestError, match="takes no chat_template_kwargs") as e:
        fmt.encode_dialog(DIALOG[1:], template_kwargs=NO_THINKING)
    assert e.value.param == "chat_template_kwargs"
    assert fmt.encode_dialog(DIALOG[1:], template_kwargs={}) == fmt.encode_dialog(DIALOG[1:])
