"""Ollama's wire format for `localchat serve`: request checking and reply bodies, no I/O.

Options are the Ollama column of the settings table (`num_ctx`, `num_predict`, `temperature`...,
as Ollama's `api/types.go` Options): sampling rows change one reply, load rows reload the model
with them, as Ollama does. Ollama options we do not have are accepted only at the value that
means "off"; an unknown one is a 400 naming it. Errors are Ollama's `{"error": "..."}`.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import EllipsisType
from typing import Any

from localchat import settings
from localchat.engine.protocol import GenerationStats, Sampling, TokenLogprob
from localchat.serve import tool_specs
from localchat.serve.openai_api import ApiError, content_text, logit_bias

# The Ollama release whose API this server follows: clients gate features on /api/version.
API_VERSION = "0.12.0"

_OPTIONS = {setting.ollama: setting for setting in settings.SETTINGS if setting.ollama}
# Ollama options for features we lack: accepted at the value that means "off", or inert.
_ONLY_OFF: dict[str, tuple[Any, ...]] = {
    "typical_p": (1.0,), "tfs_z": (1.0,), "mirostat": (0,), "numa": (False,),
    "low_vram": (False,), "vocab_only": (False,), "main_gpu": (0,), "f16_kv": (True,),
    "logits_all": (False,), "repeat_last_n": (64,), "num_keep": (), "num_batch": (512,),
    "penalize_newline": (), "mirostat_tau": (), "mirostat_eta": (),  # (): any value is inert
}
_ROLES = ("system", "user", "assistant", "tool")
_DURATION = re.compile(r"(-?\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


@dataclass(frozen=True)
class Request:
    """A checked /api/chat or /api/generate body."""

    kind: str  # "chat" or "generate"
    model: str
    messages: list[dict[str, Any]] | None  # chat, or generate with a template
    prompt: str | None  # generate with raw: the text itself
    sampling: Sampling
    load: dict[str, Any]  # load rows by setting name (num_ctx -> ctx), to reload with
    stream: bool
    keep_alive: float | None | EllipsisType = ...  # seconds, None for ever; ...: not given
    format: Any = None  # None, "json", or a JSON schema
    think: bool | None = None
    tools: tuple[dict[str, Any], ...] = ()
    logprobs: int | None = None
    logit_bias: dict[int, float] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        """No prompt and no messages: Ollama's way to load (or, keep_alive 0, unload) a model."""
        return not self.messages and not self.prompt


def parse_chat(body: Any, defaults: Sampling) -> Request:
    """Check an /api/chat body."""
    body = _object(body)
    _known(body, {"model", "messages", "tools", "format", "options", "stream", "keep_alive",
                  "think", "logprobs", "top_logprobs"})
    raw = body.get("messages") or []
    if not isinstance(raw, list):
        raise ApiError(400, "messages must be a list")
    return _request("chat", body, defaults, [_message(m, i) for i, m in enumerate(raw)], None)


def parse_generate(body: Any, defaults: Sampling) -> Request:
    """Check an /api/generate body: `prompt` (and `system`) through the chat template, or as
    it is with `raw`."""
    body = _object(body)
    _known(body, {"model", "prompt", "suffix", "system", "template", "context", "stream", "raw",
                  "format", "options", "keep_alive", "images", "think", "logprobs",
                  "top_logprobs"})
    for name, what in (("suffix", "fill-in-the-middle"), ("template", "a template per request"),
                       ("context", "context token lists (send the conversation to /api/chat)"),
                       ("images", "images")):
        if body.get(name):
            raise ApiError(400, f"{name}: {what} is not supported by localchat")
    prompt, system = _text(body, "prompt"), _text(body, "system")
    raw = _typed(body, "raw", bool) or False
    if raw or not prompt:
        messages = None
    else:
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}]
    return _request("generate", body, defaults, messages, prompt if raw else None)


def _request(kind: str, body: dict[str, Any], defaults: Sampling,
             messages: list[dict[str, Any]] | None, prompt: str | None) -> Request:
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise ApiError(400, "model is required")
    sampling, load, bias = _options(body.get("options"), defaults)
    stream = _typed(body, "stream", bool)
    think = body.get("think")
    if think is not None and not isinstance(think, bool | str):
        raise ApiError(400, "think must be true, false, or a level (low, medium, high)")
    if think is not None:  # the template's switch; "low"/"high" levels: on, as localchat has none
        sampling = dataclasses.replace(sampling, think=bool(think))
    return Request(
        kind=kind, model=model, messages=messages or None, prompt=prompt, sampling=sampling,
        load=load, stream=True if stream is None else stream,
        keep_alive=keep_alive(body["keep_alive"]) if "keep_alive" in body else ...,
        format=_format(body.get("format")), think=None if think is None else bool(think),
        tools=_tools(body.get("tools")), logprobs=_logprobs(body), logit_bias=bias)


def keep_alive(value: Any) -> float | None:
    """Ollama's keep_alive as seconds: a number of seconds or a Go duration ("5m", "1h30m");
    negative means for ever (None), 0 means unload after this request."""
    if isinstance(value, bool):
        raise ApiError(400, "keep_alive must be a duration such as \"5m\", or seconds")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and value.strip():
        text = value.strip()
        parts = _DURATION.findall(text)
        if text.lstrip("-").replace(".", "", 1).isdigit():
            seconds = float(text)
        elif parts and "".join(n + u for n, u in parts) == text:
            seconds = sum(float(n) * _UNITS[u] for n, u in parts)
        else:
            raise ApiError(400, f"keep_alive {json.dumps(value)} is not a duration (\"5m\", "
                           "\"1h\", \"30s\", -1 for ever)")
    else:
        raise ApiError(400, "keep_alive must be a duration such as \"5m\", or seconds")
    return None if seconds < 0 else seconds


def _options(raw: Any, defaults: Sampling) -> tuple[Sampling, dict[str, Any], dict[int, float]]:
    """Sampling, load rows (by setting name) and logit bias from Ollama's `options`."""
    if raw is None:
        return defaults, {}, {}
    if not isinstance(raw, dict):
        raise ApiError(400, "options must be an object")
    sampling: dict[str, Any] = {}
    load: dict[str, Any] = {}
    bias: dict[int, float] = {}
    for name, value in raw.items():
        if value is None:
            continue
        setting = _OPTIONS.get(name)
        if setting is None:
            if name == "logit_bias":
                bias = logit_bias(value, "options.logit_bias")
                continue
            allowed = _ONLY_OFF.get(name)
            if allowed is None:
                raise ApiError(400, f"unknown option {name!r}")
            if allowed and not any(value == ok and isinstance(value, bool) == isinstance(ok, bool)
                                   for ok in allowed):
                raise ApiError(400, f"option {name} = {json.dumps(value)} is not supported; "
                               "leave it out")
            continue
        if setting.kind == "list" and isinstance(value, str):
            value = [value]
        if name == "num_predict" and isinstance(value, int) and value < 0:
            continue  # Ollama's -1 (no limit) and -2 (fill the context): no limit
        try:
            checked = settings.checked(setting, value)
        except settings.Invalid as problem:
            raise ApiError(400, f"option {name} {problem}") from None
        (sampling if setting.scope == "sampling" else load)[setting.name] = checked
    fields = {s.name: getattr(defaults, s.name) for s in settings.in_scope("sampling")}
    return Sampling(**{**fields, **sampling}), load, bias


def _message(raw: Any, index: int) -> dict[str, Any]:
    where = f"messages[{index}]"
    if not isinstance(raw, dict):
        raise ApiError(400, f"{where} must be an object")
    role = raw.get("role")
    if role not in _ROLES:
        raise ApiError(400, f"{where}.role must be one of {', '.join(_ROLES)} "
                       f"(got {json.dumps(role)})")
    if raw.get("images"):
        raise ApiError(400, f"{where}.images: localchat serves text models only")
    content = raw.get("content")
    message: dict[str, Any] = {"role": role,
                               "content": "" if content is None else content_text(content, where)}
    calls = raw.get("tool_calls")
    if calls:
        if not isinstance(calls, list) or not all(
                isinstance(c, dict) and isinstance(c.get("function"), dict)
                and isinstance(c["function"].get("name"), str) for c in calls):
            raise ApiError(400, f"{where}.tool_calls must be a list of "
                           "{\"function\": {\"name\": ..., \"arguments\": {...}}}")
        message["tool_calls"] = [
            {"id": f"call_{n}", "type": "function",
             "function": {"name": c["function"]["name"],
                          "arguments": c["function"].get("arguments") or {}}}
            for n, c in enumerate(calls)]
    name = raw.get("tool_name") or raw.get("name")
    if role == "tool" and isinstance(name, str):
        message["name"] = name
    return message


def _tools(raw: Any) -> tuple[dict[str, Any], ...]:
    try:
        return tool_specs.definitions(raw)
    except tool_specs.Invalid as problem:
        raise ApiError(400, problem.message) from None


def _format(raw: Any) -> Any:
    if raw in (None, ""):
        return None
    if raw == "json" or isinstance(raw, dict):
        return raw
    raise ApiError(400, "format must be \"json\" or a JSON schema object")


def _logprobs(body: dict[str, Any]) -> int | None:
    wanted = _typed(body, "logprobs", bool)
    top = body.get("top_logprobs")
    if top is not None and (isinstance(top, bool) or not isinstance(top, int)
                            or not 0 <= top <= 20):
        raise ApiError(400, "top_logprobs must be an integer in [0, 20]")
    return (top or 0) if wanted else None


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    return body


def _known(body: dict[str, Any], names: set[str]) -> None:
    for name in body:
        if name not in names:
            raise ApiError(400, f"unknown field {name!r}")


def _typed(body: dict[str, Any], name: str, kind: type) -> Any:
    value = body.get(name)
    if value is not None and not isinstance(value, kind):
        raise ApiError(400, f"{name} must be {'true or false' if kind is bool else 'text'}")
    return value


def _text(body: dict[str, Any], name: str) -> str:
    return _typed(body, name, str) or ""


# ---- replies ------------------------------------------------------------------------------------

def now() -> str:
    """Ollama's timestamps: RFC 3339 in UTC."""
    return _time(datetime.datetime.now(datetime.UTC))


def _time(moment: datetime.datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def unix_time(seconds: float | None) -> str:
    """A Unix time as Ollama writes it; None (for ever) as the far future Ollama uses."""
    if seconds is None:
        return "2318-01-01T00:00:00Z"
    return _time(datetime.datetime.fromtimestamp(seconds, datetime.UTC))


def done_reason(reason: str) -> str:
    """Ollama's done_reason: stop or length (a full context window is length too, and so is a
    limit reached while thinking)."""
    return "stop" if reason == "stop" else "length" if reason in (
        "length", "context", "thinking") else reason


def part(kind: str, model: str, text: str = "", *,
         tool_calls: Sequence[dict[str, Any]] = (),
         logprobs: Sequence[TokenLogprob] | None = None, thinking: str = "") -> dict[str, Any]:
    """One streamed line, or the text of a whole reply before `final` adds the counts; a
    thinking model's thinking in `thinking`, as Ollama sends it."""
    body: dict[str, Any] = {"model": model, "created_at": now()}
    if kind == "chat":
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if thinking:
            message["thinking"] = thinking
        if tool_calls:
            message["tool_calls"] = list(tool_calls)
        body["message"] = message
    else:
        body["response"] = text
        if thinking:
            body["thinking"] = thinking
    if logprobs:
        body["logprobs"] = [_logprob(entry) for entry in logprobs]
    body["done"] = False
    return body


def final(body: dict[str, Any], stats: GenerationStats | None, total_s: float, load_s: float,
          reason: str | None = None) -> dict[str, Any]:
    """The closing line: done, why, and the counts and durations in nanoseconds."""
    body = {**body, "done": True,
            "done_reason": reason or done_reason(stats.finish_reason if stats else "stop"),
            "total_duration": _ns(total_s), "load_duration": _ns(load_s)}
    if stats is not None:
        body.update(prompt_eval_count=stats.prompt_tokens,
                    prompt_eval_duration=_ns(stats.prefill_s),
                    eval_count=stats.completion_tokens, eval_duration=_ns(stats.decode_s))
    return body


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


def _logprob(entry: TokenLogprob) -> dict[str, Any]:
    def one(token: bytes, logprob: float) -> dict[str, Any]:
        return {"token": token.decode("utf-8", errors="replace"), "logprob": logprob,
                "bytes": list(token)}

    return {**one(entry.token, entry.logprob),
            "top_logprobs": [one(token, logprob) for token, logprob in entry.top]}


def details(family: str | None, parameters: str | None, quant: str | None) -> dict[str, Any]:
    """A model's `details` in /api/tags, /api/show and /api/ps."""
    return {"parent_model": "", "format": "gguf", "family": family or "",
            "families": [family] if family else None, "parameter_size": parameters or "",
            "quantization_level": quant or ""}


def parameters_text(sampling: Sampling) -> str:
    """/api/show's `parameters`: the model's defaults as a Modelfile's PARAMETER lines."""
    lines = []
    for setting in settings.in_scope("sampling"):
        value = getattr(sampling, setting.name)
        if setting.ollama is None or value is None or value == ():
            continue
        values = value if isinstance(value, tuple) else (value,)
        lines += [f"{setting.ollama:<20} {json.dumps(v) if isinstance(v, str) else v}"
                  for v in values]
    return "\n".join(lines)


def size_label(parameter_count: int) -> str:
    """135M, 1.5B: Ollama's parameter_size."""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if parameter_count >= size:
            return f"{parameter_count / size:.3g}{unit}"
    return str(parameter_count)


def model_info(metadata: Mapping[str, Any], parameter_count: int) -> dict[str, Any]:
    """/api/show's `model_info`: the GGUF header's scalar keys (no vocabularies)."""
    info = {key: value for key, value in metadata.items()
            if isinstance(value, str | int | float | bool) and not key.startswith("tokenizer.")
            and not (isinstance(value, str) and len(value) > 4096)}
    info["general.parameter_count"] = parameter_count
    return info
