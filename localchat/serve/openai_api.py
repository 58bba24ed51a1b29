"""The OpenAI wire format for `localchat serve`: request checking and reply bodies, no I/O.

Requests are checked strictly: an unknown field, a wrong type, or a feature we do not have
(n > 1, tools, logprobs) is a 400 naming the field, never silently ignored. Sampling defaults
are `localchat run`'s, so the same request gives the same text.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from localchat import settings
from localchat.engine.protocol import GenerationStats, Sampling

T = TypeVar("T")  # the type a request field is checked to have

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
    "n": (1,), "best_of": (1,), "logprobs": (False,), "top_logprobs": (0,), "echo": (False,),
    "suffix": ("",), "logit_bias": ({},), "tools": ([],), "tool_choice": ("none", "auto"),
    "response_format": ({"type": "text"},),
}
_OFF_HINTS = {
    "n": "send one request per reply",
}
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


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
class Request:
    """A checked request: chat messages or a raw prompt, sampling, and how to answer."""

    kind: str  # "chat" or "text"
    messages: list[dict[str, str]] | None
    prompt: str | None
    sampling: Sampling
    stream: bool
    include_usage: bool


@dataclass(frozen=True)
class ReplyMeta:
    """What every chunk of one reply repeats."""

    kind: str
    id: str
    created: int
    model: str


def decode_json(raw: bytes) -> Any:
    """The body as JSON; anything else (including NaN and Infinity) is a 400."""
    def reject(constant: str) -> None:
        raise ValueError(f"{constant} is not valid JSON")

    try:
        return json.loads(raw.decode("utf-8"), parse_constant=reject)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ApiError(400, f"the body is not valid JSON: {exc}", code="invalid_json") from None


def parse_request(kind: str, body: object, defaults: Sampling) -> Request:
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
    _check_type(body, "model", str)
    _check_type(body, "user", str)
    _check_type(body, "parallel_tool_calls", bool)
    stream = _check_type(body, "stream", bool) or False
    sampling = _sampling(body, defaults)
    think = _template_switch(body.get("chat_template_kwargs"))
    return Request(
        kind=kind,
        messages=_messages(body.get("messages")) if kind == "chat" else None,
        prompt=_prompt(body.get("prompt")) if kind == "text" else None,
        sampling=sampling if think is None else replace(sampling, think=think),
        stream=stream,
        include_usage=_include_usage(body.get("stream_options")),
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


def _check_type(body: dict[str, Any], name: str, expected: type[T]) -> T | None:
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


def _messages(raw: object) -> list[dict[str, str]]:
    if not isinstance(raw, list) or not raw:
        raise ApiError(400, "'messages' must be a non-empty list", param="messages")
    messages = []
    for index, message in enumerate(raw):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise ApiError(400, f"{where} must be an object", param=where)
        for key, value in message.items():
            # Clients echo an earlier reply back with its empty extras; those are harmless.
            # A reply's reasoning_content comes back too: the template drops it, and so do we.
            if key not in ("role", "content", "name", "reasoning_content") and value is not None:
                raise ApiError(400, f"{where}.{key} is not supported", param=f"{where}.{key}")
        role = message.get("role")
        role = _ROLES.get(role) if isinstance(role, str) else None  # a list is unhashable
        if role is None:
            raise ApiError(400, f"{where}.role must be one of system, developer, user, "
                           f"assistant (got {json.dumps(message.get('role'))})",
                           param=f"{where}.role")
        messages.append({"role": role, "content": _content(message.get("content"), where)})
    return messages


def _content(content: object, where: str) -> str:
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


def _prompt(raw: object) -> str:
    if isinstance(raw, list) and len(raw) == 1:
        raw = raw[0]  # clients often wrap a single prompt in a list
    if not isinstance(raw, str):
        raise ApiError(400, "'prompt' must be a string (one prompt per request)", param="prompt")
    return raw


def _include_usage(raw: object) -> bool:
    if raw is None:
        return False
    if not isinstance(raw, dict) or set(raw) - {"include_usage"}:
        raise ApiError(400, "'stream_options' may only hold include_usage",
                       param="stream_options")
    value = raw.get("include_usage")
    if value is not None and not isinstance(value, bool):
        raise ApiError(400, "'stream_options.include_usage' must be true or false",
                       param="stream_options")
    return bool(value)


def model_entry(model_id: str, created: int, n_ctx: int) -> dict[str, Any]:
    """One /v1/models entry; max_model_len is vLLM's name for the context window."""
    return {"id": model_id, "object": "model", "created": created, "owned_by": "localchat",
            "max_model_len": n_ctx}


def usage(stats: GenerationStats) -> dict[str, Any]:
    """OpenAI's token counts, with the KV-cache reuse where OpenAI reports cached tokens."""
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.completion_tokens,
            "total_tokens": stats.prompt_tokens + stats.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": stats.cached_tokens},
            "completion_tokens_details": {"reasoning_tokens": stats.reasoning_tokens}}


def new_meta(kind: str, id_suffix: str, model: str) -> ReplyMeta:
    """The id, time and model one reply's body or chunks carry."""
    prefix = "chatcmpl" if kind == "chat" else "cmpl"
    return ReplyMeta(kind=kind, id=f"{prefix}-{id_suffix}", created=int(time.time()), model=model)


def finish_reason(reason: str) -> str:
    """OpenAI's word for how a reply ended: a full context window is its `length` too, and so
    is running out of tokens while thinking."""
    return "length" if reason in ("context", "thinking") else reason


def whole_reply(meta: ReplyMeta, text: str, stats: GenerationStats,
                reasoning: str = "") -> dict[str, Any]:
    """The non-streaming answer; a thinking model's thinking in `reasoning_content`, as
    llama-server and DeepSeek's API put it."""
    if meta.kind == "chat":
        message = {"role": "assistant", "content": text}
        if reasoning:
            message["reasoning_content"] = reasoning
        choice = {"index": 0, "message": message,
                  "logprobs": None, "finish_reason": finish_reason(stats.finish_reason)}
    else:
        choice = {"index": 0, "text": text, "logprobs": None,
                  "finish_reason": finish_reason(stats.finish_reason)}
    return {**_head(meta, streaming=False), "choices": [choice], "usage": usage(stats)}


def chunk(meta: ReplyMeta, text: str | None = None, finish: str | None = None,
          opening: bool = False, reasoning: str | None = None) -> dict[str, Any]:
    """One streamed event: the opening role, a piece of text or of thinking
    (`delta.reasoning_content`), or the closing finish reason."""
    if meta.kind == "chat":
        delta: dict[str, str] = {"role": "assistant", "content": ""} if opening else {}
        if text is not None:
            delta["content"] = text
        if reasoning is not None:
            delta["reasoning_content"] = reasoning
        choice: dict[str, Any] = {"index": 0, "delta": delta}
    else:
        choice = {"index": 0, "text": text or ""}
    choice.update(logprobs=None, finish_reason=finish_reason(finish) if finish else None)
    return {**_head(meta, streaming=True), "choices": [choice]}


def usage_chunk(meta: ReplyMeta, stats: GenerationStats) -> dict[str, Any]:
    """The last event when the client asked for `stream_options.include_usage`."""
    return {**_head(meta, streaming=True), "choices": [], "usage": usage(stats)}


def _head(meta: ReplyMeta, streaming: bool) -> dict[str, Any]:
    if meta.kind == "chat":
        kind = "chat.completion.chunk" if streaming else "chat.completion"
    else:
        kind = "text_completion"
    return {"id": meta.id, "object": kind, "created": meta.created, "model": meta.model}
