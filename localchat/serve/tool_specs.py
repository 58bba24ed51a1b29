"""Tool definitions and earlier calls in a request, checked: OpenAI's shapes, which Ollama's
API shares. Pure; a problem is an `Invalid` naming the field, which each API words as its 400."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

_TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


class Invalid(ValueError):
    """A tools field that is wrong: what, and the field's path."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


def definitions(raw: Any) -> tuple[dict[str, Any], ...]:
    """`tools`: function definitions, each with a name and a JSON schema of its parameters."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise Invalid("'tools' must be a list", param="tools")
    tools: list[dict[str, Any]] = []
    for index, tool in enumerate(raw):
        where = f"tools[{index}]"
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" \
                or not isinstance(function, dict):
            raise Invalid(f"{where} must be {{\"type\": \"function\", \"function\": "
                           "{...}}", param=where)
        name = function.get("name")
        if not isinstance(name, str) or not _TOOL_NAME.fullmatch(name):
            raise Invalid(f"{where}.function.name must be 1-64 letters, digits, _ or -",
                           param=f"{where}.function.name")
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, dict):
            raise Invalid(f"{where}.function.parameters must be a JSON schema object",
                           param=f"{where}.function.parameters")
        description = function.get("description")
        if description is not None and not isinstance(description, str):
            raise Invalid(f"{where}.function.description must be a string",
                           param=f"{where}.function.description")
        # Templates read the description (Hermes 3's fails without one): "" when none is given.
        tools.append({"type": "function", "function": {
            "name": name, "description": description or "", "parameters": parameters}})
    names = [tool["function"]["name"] for tool in tools]
    if len(set(names)) != len(names):
        raise Invalid("two tools have the same name", param="tools")
    return tuple(tools)


def choice(raw: Any, tools: Sequence[dict[str, Any]]) -> tuple[str, str | None]:
    """`tool_choice`: none, auto, required, or one function (then its name)."""
    if raw is None:
        return ("auto" if tools else "none"), None
    if raw in ("none", "auto", "required"):
        if raw != "none" and not tools:
            raise Invalid(f"'tool_choice' is {raw!r} but no 'tools' were given",
                           param="tool_choice")
        return raw, None
    name = raw.get("function", {}).get("name") if isinstance(raw, dict) and isinstance(
        raw.get("function"), dict) else None
    if not isinstance(name, str):
        raise Invalid("'tool_choice' must be none, auto, required or {\"type\": "
                       "\"function\", \"function\": {\"name\": ...}}", param="tool_choice")
    if name not in {tool["function"]["name"] for tool in tools}:
        raise Invalid(f"'tool_choice' names {name!r}, which is not in 'tools'",
                       param="tool_choice")
    return "function", name


def earlier_calls(raw: Any, where: str) -> list[dict[str, Any]]:
    """An assistant's earlier calls as chat templates read them: arguments as an object (the
    wire's JSON text parsed), as Hugging Face's templates expect."""
    if not isinstance(raw, list):
        raise Invalid(f"{where}.tool_calls must be a list", param=f"{where}.tool_calls")
    calls = []
    for index, call in enumerate(raw):
        at = f"{where}.tool_calls[{index}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise Invalid(f"{at} must hold function.name", param=at)
        name, arguments = function["name"], function.get("arguments", "{}")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments or "{}")
            except ValueError:
                raise Invalid(f"{at}.function.arguments is not JSON",
                               param=f"{at}.function.arguments") from None
        calls.append({"id": call.get("id") or f"call_{index}", "type": "function",
                      "function": {"name": name, "arguments": arguments}})
    return calls
