"""Tool calls: the chat templates that render tools, and the calls a reply makes in them.

The template renders the tool definitions (as `apply_chat_template(tools=...)` does); the model
then answers in its family's style, which we parse back into calls:

- Hermes (Qwen2.5, Hermes 2 and 3, many fine-tunes): each call is
  `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, after any text;
- Llama 3.1 and later: the whole answer is one JSON object `{"name": ..., "parameters": {...}}`.

A template that never reads `tools` cannot show them to the model: the request is refused
rather than the tools silently dropped. `CallFilter` streams the text before a call and holds
the call back until it is whole.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from localchat.engine.grammar import OutputGrammar, from_schema
from localchat.engine.templates import ChatTemplate, renders_tools

HERMES = "hermes"
LLAMA3 = "llama3"
_OPEN, _CLOSE = "<tool_call>", "</tool_call>"
_PYTHON_TAG = "<|python_tag|>"


@dataclass(frozen=True)
class ToolCall:
    """One call the model made: the function's name and its arguments as JSON text."""

    name: str
    arguments: str
    id: str = ""

    def openai(self) -> dict[str, object]:
        """The call in OpenAI's shape (arguments as a JSON string)."""
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}

    def ollama(self) -> dict[str, object]:
        """The call in Ollama's shape (arguments as an object)."""
        return {"function": {"name": self.name, "arguments": json.loads(self.arguments)}}


def style_of(template: ChatTemplate) -> str | None:
    """How the model behind `template` writes calls, or None when the template has no tools."""
    text = template.text
    if text is None or not renders_tools(template):
        return None
    if _OPEN in text:
        return HERMES
    if "<|start_header_id|>" in text and "parameters" in text:
        return LLAMA3
    return None


def no_tools_reason(template: ChatTemplate) -> str:
    """Why a model cannot take tools, for the 400."""
    if template.text is None or not renders_tools(template):
        return (f"this model's chat template ({template.source}) does not render tools, so the "
                "model would never see them")
    return (f"this model's chat template ({template.source}) renders tools, but in a style "
            "localchat cannot parse calls from (it knows Hermes/Qwen <tool_call> and Llama 3.1 "
            "JSON)")


def call_grammar(style: str, tools: Sequence[Mapping[str, Any]], only: str | None = None,
                 lazy: bool = False) -> OutputGrammar:
    """The grammar of one call in `style` to one of `tools` (or to `only`), its arguments
    valid against that tool's parameters: the call always parses. Lazy, the model writes
    freely until it opens a call, and the grammar holds from there (tool_choice auto)."""
    key = "arguments" if style == HERMES else "parameters"
    calls = [{"type": "object", "required": ["name", key],
              "properties": {"name": {"const": tool["function"]["name"]},
                             key: tool["function"]["parameters"]}}
             for tool in tools if only in (None, tool["function"]["name"])]
    schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
    # The converter names its top rule `root`; inside our own root it is the call.
    body = _renamed(from_schema(schema, "tools").gbnf, "root", _CALL)
    if style == HERMES:
        root = f'root ::= "<tool_call>\\n" {_CALL} "\\n</tool_call>"'
        triggers = (r"[\s\S]*?(<tool_call>)[\s\S]*",)
    else:
        root = f"root ::= {_CALL}"
        triggers = (r"\s*(\{)[\s\S]*",)
    return OutputGrammar("gbnf", f"{root}\n{body}", "tools", triggers=triggers if lazy else ())


_CALL = "localchat-tool-call"  # no property name makes this rule name
# GBNF's literals ("...", [...]) apart from rule names, which may be renamed between them.
_LITERAL = re.compile(r'"(?:[^"\\]|\\.)*"|\[(?:[^\]\\]|\\.)*\]')


def _renamed(gbnf: str, old: str, new: str) -> str:
    """`gbnf` with the rule `old` called `new`, in its definition and every reference (never
    inside a literal: a property may be called "root")."""
    name = re.compile(rf"(?<![\w-]){re.escape(old)}(?![\w-])")
    parts = []
    position = 0
    for literal in _LITERAL.finditer(gbnf):
        parts += [name.sub(new, gbnf[position:literal.start()]), literal.group()]
        position = literal.end()
    return "".join(parts) + name.sub(new, gbnf[position:])


def parse_calls(text: str, style: str, names: frozenset[str]) -> tuple[str, list[ToolCall]]:
    """The reply's text without its calls, and the calls to the tools called `names`.

    What does not parse as a call to a known tool stays text: without a grammar a small model
    may write something call-like that is not one.
    """
    if style == HERMES:
        return _hermes_calls(text, names)
    body = text.strip().removeprefix(_PYTHON_TAG).strip()
    call = _call_from(body, names, ("parameters", "arguments")) if body.startswith("{") else None
    return ("", [call]) if call else (text, [])


def _hermes_calls(text: str, names: frozenset[str]) -> tuple[str, list[ToolCall]]:
    calls: list[ToolCall] = []
    kept: list[str] = []
    position = 0
    for match in re.finditer(re.escape(_OPEN) + r"(.*?)(?:" + re.escape(_CLOSE) + r"|$)", text,
                             re.DOTALL):
        call = _call_from(match.group(1).strip(), names, ("arguments", "parameters"))
        if call is None:
            continue
        kept.append(text[position:match.start()])
        position = match.end()
        calls.append(call)
    kept.append(text[position:])
    return "".join(kept).strip() if calls else text, calls


def _call_from(body: str, names: frozenset[str], keys: tuple[str, ...]) -> ToolCall | None:
    try:
        value = json.loads(body)
    except ValueError:
        return None
    if not isinstance(value, dict) or value.get("name") not in names:
        return None
    arguments: object = next((value[key] for key in keys if key in value), {})
    if isinstance(arguments, str):  # some models write the arguments as JSON text
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall(value["name"], json.dumps(arguments, ensure_ascii=False),
                    "call_" + secrets.token_hex(12))


class CallFilter:
    """Streamed text with the calls held back: `feed` gives what can be shown now, `finish`
    the rest of the text and the calls."""

    def __init__(self, style: str, names: frozenset[str]) -> None:
        self.style = style
        self.names = names
        self._shown = ""  # text already given out
        self._held = ""  # text that may be (the start of) a call
        self._calling = False

    def feed(self, text: str) -> str:
        """The part of `text` that is surely no call."""
        if self._calling:
            self._held += text
            return ""
        pending = self._held + text
        if self.style == LLAMA3:  # a Llama 3.1 call is the whole answer: look at its start
            head = pending.lstrip()
            if self._shown or not (head.startswith(("{", _PYTHON_TAG))
                                   or _PYTHON_TAG.startswith(head)):
                self._held = ""
                return self._give(pending)
            self._held = pending
            self._calling = head.startswith(("{", _PYTHON_TAG))
            return ""
        if _OPEN in pending:
            at = pending.index(_OPEN)
            self._calling, self._held = True, pending[at:]
            return self._give(pending[:at])
        keep = _prefix_length(pending, _OPEN) if self.style == HERMES else 0
        self._held = pending[len(pending) - keep:] if keep else ""
        return self._give(pending[:len(pending) - keep])

    def finish(self) -> tuple[str, list[ToolCall]]:
        """The text not yet given and the calls, once the reply has ended."""
        if not self._held:
            return "", []
        text, calls = parse_calls(self._held, self.style, self.names)
        if not calls:
            return self._held, []
        return text if self.style == HERMES else "", calls

    def _give(self, text: str) -> str:
        self._shown += text
        return text


def _prefix_length(text: str, marker: str) -> int:
    """Length of the longest tail of `text` that begins `marker`."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0
