"""Chat formats: a dialog (list of {"role", "content"}) to prompt token ids.

Llama 2's `[INST]` format is Meta's reference `chat_completion`, exactly:
the optional system message is folded into the first user turn inside
`<<SYS>>` tags, each finished user/assistant exchange is its own BOS...EOS
sequence (note the space before EOS), and the last user turn ends the prompt.

Llama 3's header format is Meta's llama3 `ChatFormat`; other models bring
their own Jinja template in tokenizer_config.json (`JinjaChatFormat`). A
tokenizer picks its format through a `chat_format` attribute.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Literal, TypedDict

from nabla.errors import InvalidRequestError, TokenizerError
from nabla.tokenizer.base import Tokenizer

Role = Literal["system", "user", "assistant"]


class Message(TypedDict):
    role: Role
    content: str


Dialog = list[Message]

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
SPECIAL_TAGS = [B_INST, E_INST, "<<SYS>>", "<</SYS>>"]
UNSAFE_ERROR = "Error: special tags are not allowed as part of the prompt."


def check_dialog(dialog, index: int = 0) -> None:
    """Raise InvalidRequestError unless dialog is [system?] user (assistant user)*."""
    where = f"dialog {index}"
    if not isinstance(dialog, (list, tuple)) or not dialog:
        raise InvalidRequestError(f"{where} must be a non-empty list of messages", "messages")
    for j, msg in enumerate(dialog):
        if not isinstance(msg, dict) or not isinstance(msg.get("content"), str) or "role" not in msg:
            raise InvalidRequestError(
                f"{where}, message {j}: each message must be a dict with a 'role' and a string 'content'",
                "messages")
    body = dialog[1:] if dialog[0]["role"] == "system" else dialog
    if not body:
        raise InvalidRequestError(f"{where} has only a system message; add a user message", "messages")
    for j, msg in enumerate(body):
        want = "user" if j % 2 == 0 else "assistant"
        if msg["role"] != want:
            raise InvalidRequestError(
                f"{where}: roles must be an optional 'system', then alternate 'user'/'assistant' "
                f"starting with 'user'; message {j + len(dialog) - len(body)} is {msg['role']!r}, "
                f"expected {want!r}", "messages")
    if body[-1]["role"] != "user":
        raise InvalidRequestError(f"{where} must end with a 'user' message", "messages")


# The variables nabla itself gives a template: chat_template_kwargs may not replace them.
TEMPLATE_OWN = ("messages", "tools", "add_generation_prompt", "bos_token", "eos_token")


def check_template_kwargs(kwargs, param: str = "chat_template_kwargs") -> dict:
    """chat_template_kwargs as a dict of extra template variables ({} for None), or InvalidRequestError."""
    if kwargs is None:
        return {}
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise InvalidRequestError(f"{param} must be an object of template variables, such as "
                                  f'{{"enable_thinking": false}}; got {type(kwargs).__name__}', param)
    own = [k for k in kwargs if k in TEMPLATE_OWN]
    if own:
        raise InvalidRequestError(f"{param} may not set {own[0]!r}: nabla gives the template its "
                                  f"{', '.join(TEMPLATE_OWN)} itself", param)
    return dict(kwargs)


def has_special_tags(dialog: Dialog) -> bool:
    return any(tag in msg["content"] for tag in SPECIAL_TAGS for msg in dialog)


def no_template(fmt, template_kwargs: dict | None) -> None:
    """Meta's chat formats are code, not a template: variables for one are an error, not ignored."""
    if template_kwargs:
        raise InvalidRequestError(
            f"this model's chat format is Meta's {fmt.name} format, not a Jinja chat template, so it takes no "
            f"chat_template_kwargs (got {sorted(template_kwargs)}); drop them, or give the model a "
            "tokenizer_config.json with a chat_template", "chat_template_kwargs")


class Llama2ChatFormat:
    """Meta's Llama 2 chat prompt."""

    name = "llama2"

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def encode_dialog(self, dialog: Dialog, template_kwargs: dict | None = None) -> list[int]:
        no_template(self, template_kwargs)
        check_dialog(dialog)
        if dialog[0]["role"] == "system":
            first = {"role": dialog[1]["role"],
                     "content": B_SYS + dialog[0]["content"] + E_SYS + dialog[1]["content"]}
            dialog = [first] + list(dialog[2:])
        tokens: list[int] = []
        for prompt, answer in zip(dialog[::2], dialog[1::2]):
            text = f"{B_INST} {prompt['content'].strip()} {E_INST} {answer['content'].strip()} "
            tokens += self.tokenizer.encode(text, bos=True, eos=True)
        tokens += self.tokenizer.encode(f"{B_INST} {dialog[-1]['content'].strip()} {E_INST}", bos=True, eos=False)
        return tokens


class Llama3ChatFormat:
    """Meta's Llama 3 chat prompt: a header per message, <|eot_id|> after each.

    <|begin_of_text|><|start_header_id|>role<|end_header_id|>\n\ncontent<|eot_id|>...
    then an open assistant header for the model to answer in.
    """

    name = "llama3"

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.special = tokenizer.special_tokens

    def encode_header(self, role: str) -> list[int]:
        return ([self.special["<|start_header_id|>"]] + self.tokenizer.encode(role, bos=False, eos=False)
                + [self.special["<|end_header_id|>"]] + self.tokenizer.encode("\n\n", bos=False, eos=False))

    def encode_message(self, message: Message) -> list[int]:
        return (self.encode_header(message["role"])
                + self.tokenizer.encode(message["content"].strip(), bos=False, eos=False)
                + [self.special["<|eot_id|>"]])

    def encode_dialog(self, dialog: Dialog, template_kwargs: dict | None = None) -> list[int]:
        no_template(self, template_kwargs)
        tokens = [self.special["<|begin_of_text|>"]]
        for message in dialog:
            tokens += self.encode_message(message)
        return tokens + self.encode_header("assistant")  # the model writes the answer next


class JinjaChatFormat:
    """A Hugging Face chat template (tokenizer_config.json `chat_template`), rendered as
    transformers renders it: a sandboxed Jinja environment with trim_blocks and
    lstrip_blocks, `raise_exception`, the messages, bos/eos tokens and
    add_generation_prompt=True. The text is then encoded with no second BOS
    added, the special tokens of the template's own text recognised; message
    content is always plain text, so that a user's "</s><s>" or
    "<|im_start|>" is characters, not the end of a turn and the start of a
    forged one. A dialog whose content holds no special token's text encodes
    exactly as the whole rendered text does.
    """

    name = "template"

    def __init__(self, tokenizer: Tokenizer, template: str, bos_token: str = "", eos_token: str = ""):
        from jinja2 import TemplateError
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise InvalidRequestError(f"the model's chat template refused the dialog: {message}", "messages")

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                              sort_keys=sort_keys)

        def strftime_now(fmt):
            return datetime.now().strftime(fmt)

        self.tokenizer = tokenizer
        self.bos_token, self.eos_token = bos_token, eos_token
        self.knows_tools = "tools" in template  # renders `tools` and tool-call turns itself
        self.tools: list[dict] | None = None
        self.variables: dict = {}  # chat_template_kwargs of the dialog being encoded
        # The special-token strings the rendered text is cut at, with their ids: all of them
        # for tokenizers that parse special tokens, else BOS and EOS (SentencePiece).
        if getattr(tokenizer, "encode_with_special", None) is not None:
            self.specials: dict[str, int] = dict(getattr(tokenizer, "special_tokens", {}))
        else:
            self.specials = {t: i for t, i in ((bos_token, tokenizer.bos_id), (eos_token, tokenizer.eos_id)) if t}
        names = sorted(self.specials, key=len, reverse=True)  # the longest token that matches
        self.special_pattern = re.compile("|".join(re.escape(t) for t in names) if names else "(?!)")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = tojson
        env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
        try:
            self.template = env.from_string(template)
        except TemplateError as e:
            raise TokenizerError(f"the chat template in tokenizer_config.json does not parse: {e}") from None

    def render(self, dialog: Dialog, add_generation_prompt: bool = True, template_kwargs: dict | None = None) -> str:
        """The template's text for a dialog; `template_kwargs` are further variables for the template
        (chat_template_kwargs: Qwen3's enable_thinking, say), as transformers' apply_chat_template(**kwargs)."""
        from jinja2 import TemplateError

        variables = check_template_kwargs(template_kwargs) if template_kwargs is not None else self.variables
        try:
            return self.template.render(**variables, messages=[dict(m) for m in dialog], bos_token=self.bos_token,
                                        eos_token=self.eos_token, add_generation_prompt=add_generation_prompt,
                                        **({"tools": self.tools} if self.tools else {}))
        except TemplateError as e:
            raise InvalidRequestError(f"the model's chat template failed on this dialog: {e}", "messages") from None

    def encode_dialog(self, dialog: Dialog, tools: list[dict] | None = None,
                      template_kwargs: dict | None = None) -> list[int]:
        """The dialog's prompt ids; `tools` (OpenAI function definitions) go to templates that render them,
        `template_kwargs` (chat_template_kwargs) are further variables for the template."""
        self.tools = [{"type": "function", "function": t} for t in tools] if tools else None
        self.variables = check_template_kwargs(template_kwargs)
        try:
            return self._encode_dialog(dialog)
        finally:
            self.tools, self.variables = None, {}

    def _encode_dialog(self, dialog: Dialog) -> list[int]:
        text = self.render(dialog)
        if not any(self.special_pattern.search(m["content"]) for m in dialog):
            return self._encode_rendered(text, [])
        # A message holds a special token's text ("</s><s>", "<|im_start|>"): it stays
        # characters, or a user could write turns of the conversation for the model.
        spans = self._content_spans(dialog, text)
        if spans is None:
            raise InvalidRequestError(
                "a message contains the text of a special token, and the model's chat template changes "
                "message content in a way nabla cannot follow to keep it plain text; remove it", "messages")
        return self._encode_rendered(text, spans)

    def _encode_rendered(self, text: str, plain: list[tuple[int, int]]) -> list[int]:
        """Encode rendered text; special tokens count only outside the `plain` spans (the
        messages' content). With no spans this is how the text was always encoded."""
        encode_text = getattr(self.tokenizer, "encode_with_special", None)
        if encode_text is not None and not plain:
            return encode_text(text)
        pattern = self.special_pattern
        cuts, start = [], 0
        for end, after in [*plain, (len(text), len(text))]:  # the template's text between contents
            cuts += [m.span() for m in pattern.finditer(text, start, end)]
            start = after
        encode_plain = getattr(self.tokenizer, "encode_plain", None)
        tokens: list[int] = []
        pos = 0
        for a, b in [*cuts, (len(text), len(text))]:
            if a > pos:
                piece = text[pos:a]
                tokens += (encode_plain(piece, at_start=pos == 0) if encode_plain is not None
                           else self.tokenizer.encode(piece, bos=False, eos=False))
            if b > a:
                tokens.append(self.specials[text[a:b]])
            pos = b
        return tokens

    def _content_spans(self, dialog: Dialog, text: str) -> list[tuple[int, int]] | None:
        """Where each message's content lies in the rendered `text`, in order, or None when
        the template's use of the content cannot be followed.

        The dialog is rendered a second time with each content replaced by a marker (a
        private-use character around the message's index); the text between markers is the
        template's own. The content itself may appear whole or stripped (`| trim`,
        `.strip()`), as many times as the template writes it.
        """
        contents = [m["content"] for m in dialog]
        seen = text + "".join(contents)
        mark = next((chr(c) for c in range(0xE000, 0xF900) if chr(c) not in seen), None)
        if mark is None:
            return None
        marked = self.render([{**m, "content": f"{mark}{i}{mark}"} for i, m in enumerate(dialog)])
        parts = re.split(f"{mark}([0-9]+){mark}", marked)
        if mark in "".join(parts[::2]) or any(int(i) >= len(contents) for i in parts[1::2]):
            return None

        def forms(c: str) -> list[str]:
            return list(dict.fromkeys([c, c.strip(), c.lstrip(), c.rstrip()]))

        # Depth-first over the forms each content took; stack entries: (part index, position, forms tried).
        # A state met again has failed before (the search stops at the first success).
        spans: list[tuple[int, int]] = []
        stack, seen_states = [(0, 0, 0)], set()
        while stack:
            k, pos, tried = stack.pop()
            del spans[k // 2:]
            if tried == 0:
                if (k, pos) in seen_states or not text.startswith(parts[k], pos):
                    continue
                seen_states.add((k, pos))
                if k == len(parts) - 1:
                    if pos + len(parts[k]) == len(text):
                        return spans
                    continue
            start = pos + len(parts[k])
            options = forms(contents[int(parts[k + 1])])
            while tried < len(options) and not text.startswith(options[tried], start):
                tried += 1
            if tried == len(options):
                continue
            stack.append((k, pos, tried + 1))
            stack.append((k + 2, start + len(options[tried]), 0))
            spans.append((start, start + len(options[tried])))
        return None


def chat_format_for(tokenizer: Tokenizer):
    """The chat format a model expects (Llama 2's unless the tokenizer says otherwise)."""
    fmt = getattr(tokenizer, "chat_format", None)
    return fmt(tokenizer) if fmt is not None else Llama2ChatFormat(tokenizer)
