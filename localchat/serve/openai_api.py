"""The OpenAI wire format for `localchat serve`, requests: checking them, no I/O (the reply
bodies are in openai_replies.py).

Requests are checked strictly: an unknown field, a wrong type, or a feature we do not have
(n > 1, echo) is a 400 naming the field, never silently ignored. Sampling defaults are
`localchat run`'s, so the same request gives the same text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any

from localchat import settings
from localchat.engine.protocol import ReplyOptions, Sampling
from localchat.serve import tool_specs

# The sampling fields: the settings table's OpenAI names, and other servers' names for them.
SAMPLING_FIELDS: dict[str, settings.Setting] = {
    name: setting for setting in settings.in_scope("sampling")
    for name in (setting.openai, setting.openai_alias) if name}
_COMMON_FIELDS = frozenset({"model", "stream", "stream_options", "n", "user", "logit_bias",
                            "logprobs", *SAMPLING_FIELDS})
FIELDS = {
    "chat": _COMMON_FIELDS | {"messages", "top_logprobs", "response_format", "tools",
                              "tool_choice", "parallel_tool_calls", "chat_template_kwargs"},
    # max_completion_tokens is the chat API's newer name for max_tokens
    "text": _COMMON_FIELDS - {"max_completion_tokens"} | {"prompt", "echo", "suffix", "best_of"},
}
# OpenAI fields for features we lack: accepted only at the value that means "off".
_ONLY_OFF: dict[str, tuple[Any, ...]] = {
    "n": (1,), "best_of": (1,), "echo": (False,), "suffix": ("",),
}
MAX_TOP_LOGPROBS = 20  # OpenAI's limit for chat (5 for completions; llama-server allows more)
_OFF_HINTS = {
    "n": "send one request per reply",
}
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant",
          "tool": "tool"}


class ApiError(Exception):
    """A request the server answers with an OpenAI-style JSON error; the server stays up."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.kind = kind

    def body(self) -> dict[str, Any]:
        """The JSON body OpenAI's clients know how to read."""
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}


@dataclass(frozen=True)
class ResponseFormat:
    """`response_format`: "text", "json_object" (any JSON object) or "json_schema"."""

    type: str = "text"
    schema: dict[str, Any] | None = None  # json_schema only
    name: str | None = None


@dataclass(frozen=True)
class Request:
    """A checked request: chat messages or a raw prompt, sampling, and how to answer."""

    kind: str  # "chat" or "text"
    messages: list[dict[str, Any]] | None
    prompt: str | None
    sampling: Sampling
    stream: bool
    include_usage: bool
    model: str | None = None
    options: ReplyOptions = field(default_factory=ReplyOptions)  # tools, logit_bias, logprobs
    tool_choice: str = "auto"  # none | auto | required | function (then `tool_name`)
    tool_name: str | None = None
    response_format: ResponseFormat = field(default_factory=ResponseFormat)


def parse_request(kind: str, body: Any, defaults: Sampling) -> Request:
    """Check a /v1/chat/completions ("chat") or /v1/completions ("text") body.

    `defaults` fill the sampling fields a request leaves out: `localchat run`'s for this model.
    """
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    for name in body:
        if name not in FIELDS[kind]:
            raise ApiError(400, f"unknown field '{name}'", param=name, code="unknown_field")
    for name, allowed in _ONLY_OFF.items():
        value = body.get(name)
        # 0 and 0.0 are the same "off"; True is not 1.
        if value is not None and not any(
                value == ok and isinstance(value, bool) == isinstance(ok, bool) for ok in allowed):
            hint = _OFF_HINTS.get(name, "leave it out")
            raise ApiError(400, f"'{name}' = {json.dumps(value)} is not supported; {hint}",
                           param=name, code="unsupported_field")
    model = _check_type(body, "model", str)
    _check_type(body, "user", str)
    _check_type(body, "parallel_tool_calls", bool)
    stream = _check_type(body, "stream", bool) or False
    tools = _checked(tool_specs.definitions, body.get("tools"))
    tool_choice, tool_name = _checked(tool_specs.choice, body.get("tool_choice"), tools)
    sampling = _sampling(body, defaults)
    think = _template_switch(body.get("chat_template_kwargs"))
    return Request(
        kind=kind,
        messages=_messages(body.get("messages")) if kind == "chat" else None,
        prompt=_prompt(body.get("prompt")) if kind == "text" else None,
        sampling=sampling if think is None else replace(sampling, think=think),
        stream=stream,
        include_usage=_include_usage(body.get("stream_options"), stream),
        model=model,
        options=ReplyOptions(logit_bias=logit_bias(body.get("logit_bias")),
                             logprobs=_logprobs(kind, body),
                             tools=tools if tool_choice != "none" else ()),
        tool_choice=tool_choice, tool_name=tool_name,
        response_format=_response_format(body.get("response_format")),
    )


def _template_switch(raw: object) -> bool | None:
    """`chat_template_kwargs: {"enable_thinking": false}`, as llama-server and vLLM take it:
    the one template variable localchat passes (the thinking switch)."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ApiError(400, "'chat_template_kwargs' must be an object",
                       param="chat_template_kwargs")
    for key, value in raw.items():
        if key != "enable_thinking":
            raise ApiError(400, f"chat_template_kwargs.{key} is not supported; only "
                           "enable_thinking is", param=f"chat_template_kwargs.{key}",
                           code="unsupported_field")
        if not isinstance(value, bool):
            raise ApiError(400, "chat_template_kwargs.enable_thinking must be true or false",
                           param="chat_template_kwargs.enable_thinking")
    switch = raw.get("enable_thinking")
    return switch if isinstance(switch, bool) else None


def logit_bias(raw: Any, param: str = "logit_bias") -> dict[int, float]:
    """{"token id": bias in [-100, 100]} as {id: bias}; -100 bans a token, 100 all but forces
    it. Whether each id is in the model's vocabulary is checked by the engine."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ApiError(400, f"'{param}' must be an object of token ids to numbers", param=param)
    bias = {}
    for key, value in raw.items():
        token = key.strip() if isinstance(key, str) else ""
        if not token.isdigit() or len(token) > 9:
            raise ApiError(400, f"{param}: {settings.shown(key)} is not a token id", param=param)
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not number or not -100 <= value <= 100:
            raise ApiError(400, f"{param}[{token}] must be a number in [-100, 100] (got "
                           f"{settings.shown(value)})", param=param)
        bias[int(token)] = float(value)
    return bias


def _logprobs(kind: str, body: dict[str, Any]) -> int | None:
    """How many alternatives each token's logprobs carry, or None for no logprobs."""
    if kind == "text":  # completions: `logprobs` is the number of alternatives
        value = body.get("logprobs")
        if value is None:
            return None
        return _count(value, "logprobs")
    wanted = _check_type(body, "logprobs", bool)
    top = body.get("top_logprobs")
    if top is not None and not wanted:
        raise ApiError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    return _count(top, "top_logprobs") if top is not None else 0 if wanted else None


def _count(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) \
            or not 0 <= value <= MAX_TOP_LOGPROBS:
        raise ApiError(400, f"'{name}' must be an integer in [0, {MAX_TOP_LOGPROBS}] (got "
                       f"{settings.shown(value)})", param=name)
    return value


def _response_format(raw: Any) -> ResponseFormat:
    if raw is None:
        return ResponseFormat()
    kind = raw.get("type") if isinstance(raw, dict) else None
    if kind in ("text", "json_object"):
        return ResponseFormat(kind)
    if kind == "json_schema":
        spec = raw.get("json_schema")
        schema = spec.get("schema", {}) if isinstance(spec, dict) else None
        if not isinstance(schema, dict | bool):
            raise ApiError(400, "'response_format.json_schema.schema' must be a JSON schema",
                           param="response_format")
        name = spec.get("name") if isinstance(spec, dict) else None
        return ResponseFormat("json_schema", schema if isinstance(schema, dict) else {},
                              name if isinstance(name, str) else None)
    raise ApiError(400, "'response_format.type' must be text, json_object or json_schema",
                   param="response_format")


def _checked(check: Any, *args: Any) -> Any:
    """A `tool_specs` check, its complaint as a 400 naming the field."""
    try:
        return check(*args)
    except tool_specs.Invalid as problem:
        raise ApiError(400, problem.message, param=problem.param) from None


def _check_type(body: dict[str, Any], name: str, expected: type) -> Any:
    value = body.get(name)
    if value is not None and not isinstance(value, expected):
        raise ApiError(400, f"'{name}' must be {_TYPE_NAMES[expected]}", param=name)
    return value


_TYPE_NAMES = {str: "a string", bool: "true or false", int: "an integer", float: "a number"}


def _sampling(body: dict[str, Any], defaults: Sampling) -> Sampling:
    """Each sampling setting from its field, checked against the settings table; a field left
    out keeps `defaults`. A bad value is a 400 naming the field as the client spelled it."""
    values = {}
    for setting in settings.in_scope("sampling"):
        name, value = _field_of(body, setting)
        if value is None:
            values[setting.name] = getattr(defaults, setting.name)
            continue
        if setting.name == "top_k" and value == -1:
            value = 0  # vLLM's "off"
        if setting.kind == "list":
            value = [value] if isinstance(value, str) else value
            value = [item for item in value if item != ""] if isinstance(value, list) else value
        try:
            values[setting.name] = settings.checked(setting, value)
        except settings.Invalid as problem:
            raise ApiError(400, f"{name} {problem}", param=name) from None
    return Sampling(**values)


def _field_of(body: dict[str, Any], setting: settings.Setting) -> tuple[str | None, Any]:
    """The field that carries `setting` and its value; with both names given, they must agree."""
    names = [name for name in (setting.openai, setting.openai_alias)
             if name and body.get(name) is not None]
    if len(names) == 2 and body[names[0]] != body[names[1]]:
        raise ApiError(400, f"'{names[0]}' and '{names[1]}' disagree; send one", param=names[1])
    return (names[0], body[names[0]]) if names else (setting.openai, None)


# A reply's reasoning_content comes back when clients replay it: chat templates drop an earlier
# reply's thinking, and so do we.
_MESSAGE_KEYS = {"role", "content", "name", "tool_calls", "tool_call_id", "reasoning_content"}


def _messages(raw: Any) -> list[dict[str, Any]]:
    if not isinstance(raw, list) or not raw:
        raise ApiError(400, "'messages' must be a non-empty list", param="messages")
    messages = []
    for index, message in enumerate(raw):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise ApiError(400, f"{where} must be an object", param=where)
        for key, value in message.items():
            # Clients echo an earlier reply back with its empty extras; those are harmless.
            if key not in _MESSAGE_KEYS and value is not None:
                raise ApiError(400, f"{where}.{key} is not supported", param=f"{where}.{key}")
        role = message.get("role")
        role = _ROLES.get(role) if isinstance(role, str) else None  # a list is unhashable
        if role is None:
            raise ApiError(400, f"{where}.role must be one of system, developer, user, "
                           f"assistant, tool (got {json.dumps(message.get('role'))})",
                           param=f"{where}.role")
        calls = message.get("tool_calls")
        content = message.get("content")
        checked: dict[str, Any] = {"role": role, "content": "" if content is None and (
            calls or role == "assistant") else content_text(content, where)}
        if calls:
            if role != "assistant":
                raise ApiError(400, f"{where}.tool_calls: only assistant messages make calls",
                               param=f"{where}.tool_calls")
            checked["tool_calls"] = _checked(tool_specs.earlier_calls, calls, where)
        if role == "tool":
            call_id = message.get("tool_call_id")
            if call_id is not None and not isinstance(call_id, str):
                raise ApiError(400, f"{where}.tool_call_id must be a string",
                               param=f"{where}.tool_call_id")
            checked["tool_call_id"] = call_id or ""
            if isinstance(message.get("name"), str):
                checked["name"] = message["name"]
        messages.append(checked)
    return messages


def content_text(content: Any, where: str) -> str:
    """A message's content: a string, or a list of text parts (joined); `where` names it."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text"
                    and isinstance(part.get("text"), str)):
                raise ApiError(400, f"{where}.content: only text parts are supported",
                               param=f"{where}.content")
            texts.append(part["text"])
        return "".join(texts)
    raise ApiError(400, f"{where}.content must be a string or a list of text parts",
                   param=f"{where}.content")


def _prompt(raw: Any) -> str:
    if isinstance(raw, list) and len(raw) == 1:
        raw = raw[0]  # clients often wrap a single prompt in a list
    if not isinstance(raw, str):
        raise ApiError(400, "'prompt' must be a string (one prompt per request)", param="prompt")
    return raw


def _include_usage(raw: Any, stream: bool) -> bool:
    if raw is None:
        return False
    if not stream:
        raise ApiError(400, "'stream_options' is only for streamed replies ('stream': true)",
                       param="stream_options")
    if not isinstance(raw, dict) or set(raw) - {"include_usage"}:
        raise ApiError(400, "'stream_options' may only hold include_usage",
                       param="stream_options")
    value = raw.get("include_usage")
    if value is not None and not isinstance(value, bool):
        raise ApiError(400, "'stream_options.include_usage' must be true or false",
                       param="stream_options")
    return bool(value)
