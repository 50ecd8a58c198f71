"""Each family's published chat template (tests/tokenizer/family_templates.py): nabla's rendered prompt
and token ids equal transformers' apply_chat_template on the same tokenizer (TinyLlama's tokenizer.json
with the template swapped in; the rendering is what is compared)."""

import json
import shutil

import pytest
from conftest import TINYLLAMA_DIR

from nabla.errors import InvalidRequestError
from nabla.tokenizer import load_tokenizer
from nabla.tokenizer.chat import chat_format_for
from tokenizer.family_templates import NO_SYSTEM, TEMPLATES

DIALOGS = {
    "system": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi there"}],
    "turns": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": " 4. "},
              {"role": "user", "content": "And  3+3?\n"}],
    "system-turns": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hello"},
                     {"role": "assistant", "content": "Hi! How can I help?"},
                     {"role": "user", "content": "Tell me a joke — in 日本語 😀"}],
}


@pytest.fixture(scope="module", params=sorted(TEMPLATES))
def family(request, tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp(request.param)
    for name in ("tokenizer.json", "special_tokens_map.json"):
        shutil.copy(TINYLLAMA_DIR / name, folder / name)
    config = json.loads((TINYLLAMA_DIR / "tokenizer_config.json").read_text())
    config["chat_template"] = TEMPLATES[request.param]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    ref = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    return request.param, chat_format_for(load_tokenizer(folder / "tokenizer.json")), ref


@pytest.mark.parametrize("dialog", sorted(DIALOGS))
@pytest.mark.parametrize("generation_prompt", [True, False], ids=["gen", "nogen"])
def test_rendering_and_ids_equal_transformers(family, dialog, generation_prompt):
    name, fmt, ref = family
    messages = DIALOGS[dialog]
    if name in NO_SYSTEM and messages[0]["role"] == "system":
        with pytest.raises(InvalidRequestError, match=NO_SYSTEM[name]):
            fmt.render(messages)
        with pytest.raises(Exception, match=NO_SYSTEM[name]):
            ref.apply_chat_template(messages, tokenize=False)
        return
    want = ref.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)
    assert fmt.render(messages, add_generation_prompt=generation_prompt) == want
    if generation_prompt:  # nabla encodes prompts to answer
        ids = ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if not isinstance(ids, list) else ids
        assert fmt.encode_dialog(messages) == list(ids)
