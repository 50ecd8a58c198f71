"""Tool calls: checking tools and tool messages, the prompt they make, and the calls in a reply.

`plan` checks `tools`, `tool_choice` and the messages' `tool_calls` / `role:
"tool"` turns (each mistake a 400 naming its parameter path) and says how
the reply is made: free text ("none"), free text parsed for the model's own
call syntax ("auto"), or a call constrained by a grammar ("forced", under
`required` or a named function), whose arguments then always validate
against the function's `parameters`. `dialog` turns the messages into what
the chat format renders: a template that knows tools gets them as they are
(and `tools=`); any other format gets the definitions in the system message
and calls and results as text. `parse_calls` reads Llama 3.1's JSON
(`{"name", "parameters"}`), Qwen/Hermes `<tool_call>...</tool_call>` and
Mistral `[TOOL_CALLS] [...]` calls out of a reply; text that is not a call
stays text.

Leaves out: streaming the arguments of a call piece by piece (a call goes out
in one delta when it is complete), the legacy `functions` parameters.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from nabla.errors import InvalidRequestError
from nabla.generation.constraints import check_schema

MARKERS = ("<tool_call>", "[TOOL_CALLS]", "<|python_tag|>", "{", "[")
"""How a reply that is a call can begin (after whitespace): until it cannot, streamed text is held back."""


@dataclass
class ToolPlan:
    mode: str  # "none", "auto" or "forced"
    tools: list[dict]
    schema: dict | None = None
    """forced: the JSON schema of the reply, a list of {"name", "parameters"} calls."""


def plan(req) -> ToolPlan:
    tools = [t.function.model_dump(exclude_none=True) for t in req.tools or []]
    names = [t["name"] for t in tools]
    for i, t in enumerate(tools):
        if "parameters" in t:
            check_schema(t["parameters"], f"tools[{i}].function.parameters")
    _check_messages(req.messages)
    choice = req.tool_choice
    if choice is not None and not tools:
        raise InvalidRequestError("tool_choice is only allowed when 'tools' are given", "tool_choice")
    if choice is None:
        choice = "auto" if tools else "none"
    if isinstance(choice, dict):
        fn = choice.get("function") if choice.get("type") == "function" else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str):
            raise InvalidRequestError("tool_choice must be 'none', 'auto', 'required' or "
                                      "{\"type\": \"function\", \"function\": {\"name\": ...}}", "tool_choice")
        if name not in names:
            raise InvalidRequestError(f"tool_choice names the function '{name}', which is not in tools "
                                      f"({', '.join(names)})", "tool_choice.function.name")
        return ToolPlan("forced", tools, call_schema([t for t in tools if t["name"] == name], False))
    if choice not in ("none", "auto", "required"):
        raise InvalidRequestError("tool_choice must be 'none', 'auto', 'required' or a named function",
                                  "tool_choice")
    if choice == "required":
        return ToolPlan("forced", tools, call_schema(tools, req.parallel_tool_calls is not False))
    return ToolPlan(choice if tools else "none", tools)


def _check_messages(messages) -> None:
    called: set[str] = set()
    for i, m in enumerate(messages):
        for j, call in enumerate(m.tool_calls or []):
            where = f"messages[{i}].tool_calls[{j}]"
            if m.role != "assistant":
                raise InvalidRequestError("only assistant messages carry tool_calls", where)
            try:
                args = json.loads(call.function.arguments)
            except json.JSONDecodeError as e:
                raise InvalidRequestError(f"the arguments of a tool call must be JSON text ({e})",
                                          where + ".function.arguments") from None
            if not isinstance(args, dict):
                raise InvalidRequestError("the arguments of a tool call must be a JSON object",
                                          where + ".function.arguments")
            called.add(call.id)
        if m.role == "tool" and m.tool_call_id not in called:
            raise InvalidRequestError(
                f"a 'tool' message must answer an earlier assistant tool call; tool_call_id "
                f"{m.tool_call_id!r} matches none", f"messages[{i}].tool_call_id")


def call_schema(tools: list[dict], parallel: bool) -> dict:
    """A list of calls, each {"name": one of tools, "parameters": its parameters}."""
    options = [{"type": "object", "properties": {"name": {"const": t["name"]},
                                                 "parameters": t.get("parameters") or {"type": "object"}},
                "required": ["name", "parameters"], "additionalProperties": False} for t in tools]
    items = options[0] if len(options) == 1 else {"anyOf": options}
    return {"type": "array", "items": items, "minItems": 1, **({} if parallel else {"maxItems": 1})}


def dialog(messages, tools: list[dict], knows_tools: bool) -> list[dict]:
    """The messages as the chat format renders them (see the module docstring)."""
    out = []
    for m in messages:
        role = "system" if m.role == "developer" else m.role
        msg = {"role": role, "content": m.text()}
        if knows_tools:
            if m.tool_calls:
                msg["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                    "name": c.function.name, "arguments": json.loads(c.function.arguments)}} for c in m.tool_calls]
            if m.tool_call_id is not None:
                msg["tool_call_id"] = m.tool_call_id
        elif m.tool_calls:
            calls = [{"name": c.function.name, "parameters": json.loads(c.function.arguments)} for c in m.tool_calls]
            msg["content"] = (msg["content"] + "\n" if msg["content"] else "") + json.dumps(calls)
        elif role == "tool":
            msg = {"role": "user", "content": f"Result of tool call {m.tool_call_id}: {msg['content']}"}
        if out and out[-1]["role"] == msg["role"] and not knows_tools:
            out[-1]["content"] += "\n\n" + msg["content"]  # a call's results and the next question: one turn
        else:
            out.append(msg)
    if tools and not knows_tools:
        text = ("You can call these functions. To call one, answer with only a JSON list of calls, "
                "[{\"name\": ..., \"parameters\": {...}}]:\n" + "\n".join(json.dumps(t) for t in tools))
        if out[0]["role"] == "system":
            out[0]["content"] += "\n\n" + text
        else:
            out.insert(0, {"role": "system", "content": text})
    return out


def _as_calls(value, names: set[str]) -> list[dict] | None:
    items = value if isinstance(value, list) else [value]
    calls = []
    for it in items:
        if not isinstance(it, dict) or it.get("name") not in names:
            return None
        args = it.get("parameters", it.get("arguments", {}))
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                return None
        if not isinstance(args, dict):
            return None
        calls.append({"name": it["name"], "arguments": args})
    return calls or None


def parse_calls(text: str, tools: list[dict]) -> tuple[str | None, list[dict]]:
    """(content, calls) of a reply: calls as {"name", "arguments" (a dict)}; the text alone when none."""
    names = {t["name"] for t in tools}
    tagged = re.findall(r"<tool_call>\s*(.*?)\s*</tool_call>", text, re.S)
    if tagged:
        calls = []
        for body in tagged:
            try:
                found = _as_calls(json.loads(body), names)
            except json.JSONDecodeError:
                found = None
            if found is None:
                return text, []
            calls += found
        rest = re.sub(r"<tool_call>.*?</tool_call>", "", text, flags=re.S).strip()
        return rest or None, calls
    body = text.strip()
    for prefix in ("[TOOL_CALLS]", "<|python_tag|>"):
        body = body.removeprefix(prefix).strip()
    try:
        calls = _as_calls(json.loads(body), names)
    except json.JSONDecodeError:
        calls = None
    return (None, calls) if calls else (text, [])


def may_be_call(text: str) -> bool:
    """Whether text (so far) could still turn out to be a call: then streaming holds it back."""
    s = text.lstrip()
    return not s or any(s.startswith(m) or m.startswith(s) for m in MARKERS)


def openai_calls(calls: list[dict]) -> list[dict]:
    """Calls in OpenAI's shape (arguments as JSON text), each with a fresh id."""
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)}}
            for c in calls]


def forced_calls(text: str) -> list[dict]:
    """The calls of a grammar-constrained reply (a JSON list of {"name", "parameters"})."""
    return [{"name": c["name"], "arguments": c["parameters"]} for c in json.loads(text)]
