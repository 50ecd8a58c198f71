"""Chat formats: a dialog (list of {"role", "content"}) to prompt token ids.

Llama 2's `[INST]` format is Meta's reference `chat_completion`, exactly:
the optional system message is folded into the first user turn inside
`<<SYS>>` tags, each finished user/assistant exchange is its own BOS...EOS
sequence (note the space before EOS), and the last user turn ends the prompt.
"""

from __future__ import annotations

from typing import Literal, TypedDict

from nabla.errors import InvalidRequestError
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


def has_special_tags(dialog: Dialog) -> bool:
    return any(tag in msg["content"] for tag in SPECIAL_TAGS for msg in dialog)


class Llama2ChatFormat:
    """Meta's Llama 2 chat prompt."""

    name = "llama2"

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def encode_dialog(self, dialog: Dialog) -> list[int]:
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


def chat_format_for(tokenizer: Tokenizer):
    """The chat format a model expects (Llama 2's unless the tokenizer says otherwise)."""
    fmt = getattr(tokenizer, "chat_format", None)
    return fmt(tokenizer) if fmt is not None else Llama2ChatFormat(tokenizer)
