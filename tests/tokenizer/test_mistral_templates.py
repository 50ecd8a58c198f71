"""Mistral Instruct's published chat templates (tests/tokenizer/family_templates.py) with tokenizers made
like Mistral's: nabla's rendered prompt and token ids equal transformers' apply_chat_template.

- v0.1/v0.2: a Llama 2 SentencePiece vocabulary, "legacy" (a space piece after <s>): nabla reads
  tests/data/llama2/tokenizer.model, transformers reads the same vocabulary as tokenizer.json (TinyLlama's).
- v0.3: [INST], [/INST] and the tool markers are control tokens (one id each), as in v0.3's vocabulary.
- Roles that do not alternate: the template's own raise_exception is a nabla InvalidRequestError on
  'messages' carrying the template's words (the server's 400: tests/server/test_chat_template_kwargs.py).
"""

import json
import shutil

import pytest
from conftest import LLAMA2_TOKENIZER, TINYLLAMA_DIR

from nabla.errors import InvalidRequestError
from nabla.tokenizer import load_tokenizer
from nabla.tokenizer.chat import chat_format_for
from tokenizer.family_templates import MISTRAL_V1, MISTRAL_V3

CONTROL = ["[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
           "[/TOOL_RESULTS]"]
DIALOGS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": " 4. "},
     {"role": "user", "content": "And  3+3? 日本語 😀\n"}],
    [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hello"},
     {"role": "assistant", "content": "Hi! How can I help?"}, {"role": "user", "content": "A joke, please."}],
]
WEATHER = {"name": "get_weather", "description": "The weather in a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


def config(template: str, legacy: bool | None) -> dict:
    c = json.loads((TINYLLAMA_DIR / "tokenizer_config.json").read_text())
    c.update(chat_template=template, legacy=legacy)
    if legacy is None:
        del c["legacy"]
    return c


def reference(folder, template: str, legacy: bool, control: bool = False):
    """transformers' tokenizer: TinyLlama's tokenizer.json (Llama 2's vocabulary), Mistral's template."""
    transformers = pytest.importorskip("transformers")
    folder.mkdir(exist_ok=True)
    shutil.copy(TINYLLAMA_DIR / "special_tokens_map.json", folder)
    if control:
        from tokenizers import AddedToken
        from tokenizers import Tokenizer as Lib

        lib = Lib.from_file(str(TINYLLAMA_DIR / "tokenizer.json"))
        lib.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in CONTROL])
        lib.save(str(folder / "tokenizer.json"))
    else:
        shutil.copy(TINYLLAMA_DIR / "tokenizer.json", folder)
    c = config(template, legacy)
    if control:  # declared in tokenizer_config.json too, as Mistral's files do
        base = len(json.loads((TINYLLAMA_DIR / "tokenizer.json").read_text())["model"]["vocab"])
        c["added_tokens_decoder"].update({str(base + i): dict(content=t, lstrip=False, normalized=False, rstrip=False,
                                                              single_word=False, special=True)
                                          for i, t in enumerate(CONTROL)})
    (folder / "tokenizer_config.json").write_text(json.dumps(c))
    ref = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    if control:  # one id each, as in Mistral v0.3's vocabulary
        assert [ref.convert_tokens_to_ids(t) for t in CONTROL] == list(range(base, base + len(CONTROL)))
    return ref


def ref_ids(ref, dialog, **kw) -> list[int]:
    ids = ref.apply_chat_template(dialog, add_generation_prompt=True, tokenize=True, **kw)
    return list(ids["input_ids"] if not isinstance(ids, list) else ids)


@pytest.fixture(scope="module")
def v1(tmp_path_factory):
    """(nabla's chat format on the SentencePiece model, transformers' tokenizer), Mistral v0.1/v0.2."""
    folder = tmp_path_factory.mktemp("mistral-v1")
    shutil.copy(LLAMA2_TOKENIZER, folder / "tokenizer.model")
    (folder / "tokenizer_config.json").write_text(json.dumps(config(MISTRAL_V1, legacy=True)))
    fmt = chat_format_for(load_tokenizer(folder / "tokenizer.model"))
    return fmt, reference(folder / "ref", MISTRAL_V1, legacy=True)


@pytest.fixture(scope="module", params=[True, None], ids=["legacy", "legacy-unset"])
def v3(request, tmp_path_factory):
    """(nabla's chat format, transformers' tokenizer), Mistral v0.3: control tokens in the vocabulary,
    beside a Mistral config.json, so that transformers 5's AutoTokenizer picks the class it picks for a
    Mistral folder (the tokenizer.json as written, as nabla reads it).

    Left out, because nabla and transformers 5 differ there: "legacy": false in a Mistral folder
    (transformers 5 ignores it for this class, nabla prepends "▁" only at the start as transformers
    does for Llama folders), and Llama-class folders with legacy true or unset (transformers 5 rebuilds
    them with a Metaspace pre-tokenizer: "[INST] Hi" is [INST] ▁Hi, not the file's [INST] ▁ ▁Hi)."""
    folder = tmp_path_factory.mktemp("mistral-v3")
    (folder / "tok").mkdir()
    mistral = {"model_type": "mistral", "vocab_size": 32000 + len(CONTROL)}
    (folder / "tok" / "config.json").write_text(json.dumps(mistral))
    ref = reference(folder / "tok", MISTRAL_V3, legacy=request.param, control=True)
    return chat_format_for(load_tokenizer(folder / "tok" / "tokenizer.json")), ref


@pytest.mark.parametrize("i", range(2))  # v0.1/v0.2 have no system role (see the refusal test)
def test_v1_sentencepiece_equals_transformers(v1, i):
    fmt, ref = v1
    dialog = DIALOGS[i]
    assert fmt.render(dialog) == ref.apply_chat_template(dialog, add_generation_prompt=True, tokenize=False)
    ids = fmt.encode_dialog(dialog)
    assert ids == ref_ids(ref, dialog)
    assert ids[:2] == [1, 518]  # <s> then "▁[": the legacy space after BOS, as Mistral's v1 tokenizer has it


@pytest.mark.parametrize("i", range(len(DIALOGS)))
def test_v3_control_tokens_equal_transformers(v3, i):
    fmt, ref = v3
    dialog = DIALOGS[i]
    text = fmt.render(dialog)
    assert text == ref.apply_chat_template(dialog, add_generation_prompt=True, tokenize=False)
    if dialog[0]["role"] == "system":  # v0.3 puts the system message in the last user turn
        assert text.endswith("[INST] Be kind.\n\nA joke, please.[/INST]")
    ids = fmt.encode_dialog(dialog)
    assert ids == ref_ids(ref, dialog)
    inst, end = (ref.convert_tokens_to_ids(t) for t in ("[INST]", "[/INST]"))
    assert ids.count(inst) == ids.count(end) == sum(m["role"] == "user" for m in dialog)


def test_v3_tools_equal_transformers(v3):
    fmt, ref = v3
    dialog = [{"role": "user", "content": "Weather in Paris?"}]
    ids = fmt.encode_dialog(dialog, tools=[WEATHER])
    assert ids == ref_ids(ref, dialog, tools=[{"type": "function", "function": WEATHER}])
    assert ids[1] == ref.convert_tokens_to_ids("[AVAILABLE_TOOLS]")


NOT_ALTERNATING = [
    [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "assistant", "content": "c"}],
    [{"role": "system", "content": "s"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
]


@pytest.mark.parametrize("dialog", NOT_ALTERNATING, ids=["user-user", "assistant-assistant", "assistant-first"])
def test_roles_not_alternating_are_the_templates_error(v1, v3, dialog):
    words = "conversation roles must alternate user/assistant/user/assistant"
    for fmt, ref in (v1, v3):
        with pytest.raises(Exception, match="(?i)" + words):  # transformers: the template's own exception
            ref.apply_chat_template(dialog, add_generation_prompt=True, tokenize=False)
        with pytest.raises(InvalidRequestError, match="(?i)chat template refused the dialog: .*" + words) as e:
            fmt.encode_dialog(dialog)
        assert e.value.param == "messages"
