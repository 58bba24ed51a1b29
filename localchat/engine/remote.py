"""`RemoteEngine`: the local engine's interface in front of any OpenAI-compatible server.

vLLM, SGLang, llama-server, Ollama and `localchat serve` all speak `/v1/chat/completions`
with server-sent events. We talk to them with the standard library's http.client (no new
dependency), one connection per reply, so closing the generator closes the socket and a
well-behaved server stops generating. The API key goes into one header and nowhere else.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import socket
import ssl
import time
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, overload
from urllib.parse import urlsplit

from localchat import __version__
from localchat.engine.options import DEFAULT_CONTEXT
from localchat.engine.protocol import GenerationStats, Sampling, answer_only
from localchat.engine.reasoning import REASONING, Part, Splitter, Thinking, family_named
from localchat.errors import EngineError, UsageError

API_KEY_ENV = "LOCALCHAT_API_KEY"
DEFAULT_TIMEOUT_S = 120.0  # per socket operation: a big prompt on a busy server is slow to start
CHARS_PER_TOKEN = 4  # what BPE vocabularies average on English text; only for estimates
MAX_EVENT_BYTES = 4 * 1024 * 1024  # one server-sent event; more means the stream is garbage
_SAMPLING_DEFAULTS = Sampling()


@dataclass(frozen=True)
class RemoteOptions:
    """Where the server is and how to talk to it; the key never appears in a repr."""

    endpoint: str  # base URL, normally ending in /v1
    model: str | None = None  # None: the first model the server lists
    api_key: str | None = field(default=None, repr=False)
    timeout_s: float = DEFAULT_TIMEOUT_S


@dataclass(frozen=True)
class RemoteInfo:
    """The remote counterpart of `LoadInfo`, with the same field names callers print."""

    endpoint: str
    model: str
    load_s: float  # the /models handshake
    n_ctx: int
    n_ctx_known: bool  # False: the server did not say, and n_ctx is our default guess
    n_ctx_train: int
    threads: int | None = None  # not ours to know
    gpu_layers: int | None = None
    backend: str = "remote"
    chat_format: str = "server-side"
    chat_format_source: str = "applied by the server"
    use_mmap: bool = False

    @property
    def model_path(self) -> str:
        """Where the model lives, for the lines that print a local model's path."""
        return f"{self.model} at {self.endpoint}"


def api_key_from(flag: str | None) -> str | None:
    """The API key: `--api-key`, else $LOCALCHAT_API_KEY, else none."""
    key = (flag if flag is not None else os.environ.get(API_KEY_ENV)) or ""
    return key.strip() or None


def remote_options(endpoint: str, model: str | None, api_key: str | None,
                   timeout_s: float = DEFAULT_TIMEOUT_S) -> RemoteOptions:
    """Options for `--endpoint`: the URL checked and normalized, the key from flag or env."""
    return RemoteOptions(endpoint=normalize_endpoint(endpoint), model=model or None,
                         api_key=api_key_from(api_key), timeout_s=timeout_s)


def normalize_endpoint(url: str) -> str:
    """An http(s) base URL without a trailing slash; a bare host gets the usual /v1."""
    parts = urlsplit(url.strip())
    hint = "give the server's base URL, e.g. http://127.0.0.1:8080/v1"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"--endpoint must be an http:// or https:// URL (got '{url}')", hint)
    if parts.username or parts.password:
        raise UsageError("--endpoint must not contain a user name or password",
                         f"pass the key with --api-key or ${API_KEY_ENV}")
    if parts.query or parts.fragment:
        raise UsageError(f"--endpoint must not have a query or fragment (got '{url}')", hint)
    try:
        parts.port  # noqa: B018 - raises on a port outside 0..65535
    except ValueError as exc:
        raise UsageError(f"--endpoint has a bad port: {exc}", hint) from exc
    path = parts.path.rstrip("/") or "/v1"
    return f"{parts.scheme}://{parts.netloc}{path}"


@dataclass
class _Progress:
    """One reply's bookkeeping, shared between the event loop and its `finally`."""

    started: float
    pieces: int = 0
    first_at: float | None = None
    last_at: float | None = None
    finish_reason: str | None = None
    usage: dict[str, Any] = field(default_factory=dict)
    reasoning: int = 0  # pieces of thinking

    def stats(self, estimated_prompt_tokens: int) -> GenerationStats:
        """Counts from the server's `usage` where it sent one, times from our clock."""
        usage = self.usage
        details = usage.get("prompt_tokens_details")
        cached = details.get("cached_tokens") if isinstance(details, dict) else None
        ttft = (self.first_at - self.started) if self.first_at else 0.0
        counted = all(_count(usage.get(name), -1) >= 0
                      for name in ("prompt_tokens", "completion_tokens"))
        return GenerationStats(
            prompt_tokens=_count(usage.get("prompt_tokens"), estimated_prompt_tokens),
            cached_tokens=_count(cached, 0),
            completion_tokens=_count(usage.get("completion_tokens"), self.pieces),
            ttft_s=ttft,
            prefill_s=ttft,  # the server's prefill and the network, as seen from here
            decode_s=(self.last_at - self.first_at) if self.first_at and self.last_at else 0.0,
            finish_reason=self.finish_reason or "interrupted",
            tokens_estimated=not counted,  # ~4 characters a prompt token, a piece a reply token
            reasoning_tokens=_count(_reasoning_tokens(usage), self.reasoning),
        )


def _reasoning_tokens(usage: dict[str, Any]) -> Any:
    """OpenAI's count of thinking tokens, in `usage.completion_tokens_details`."""
    details = usage.get("completion_tokens_details")
    return details.get("reasoning_tokens") if isinstance(details, dict) else None


def _tokens(pieces: int) -> str:
    """The pieces of a reply so far, as tokens: OpenAI-compatible servers stream one per event."""
    return f"{pieces} token" + ("" if pieces == 1 else "s")


def _count(value: object, fallback: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 \
        else fallback


_Exchange = tuple[http.client.HTTPConnection, http.client.HTTPResponse]  # a request, its answer


class RemoteEngine:
    """A model on an OpenAI-compatible server, behind the same interface as `LocalEngine`."""

    def __init__(self, options: RemoteOptions) -> None:
        """Ask the server which models it has: a wrong URL or key fails here, not mid-reply."""
        self.options = options
        parts = urlsplit(options.endpoint)
        self._https = parts.scheme == "https"
        self._host = parts.hostname or ""
        self._port = parts.port
        self._base_path = parts.path
        self.last_stats: GenerationStats | None = None
        started = time.perf_counter()
        listed = self._list_models()
        model = options.model or (listed[0].get("id") if listed else None)
        if not isinstance(model, str) or not model:
            raise UsageError(f"{options.endpoint} lists no models to pick from",
                             "name one: localchat run --endpoint URL MODEL PROMPT")
        entry = next((item for item in listed if item.get("id") == model), {})
        n_ctx = _context_length(entry)
        self.info = RemoteInfo(
            endpoint=options.endpoint, model=model, load_s=time.perf_counter() - started,
            n_ctx=n_ctx or DEFAULT_CONTEXT, n_ctx_known=n_ctx is not None,
            n_ctx_train=n_ctx or DEFAULT_CONTEXT,
        )

    @property
    def n_ctx(self) -> int:
        """The server's context window when it says, else the local default (a guess)."""
        return self.info.n_ctx

    def count_tokens(self, messages: Sequence[dict[str, str]]) -> int:
        """APPROXIMATE: ~4 characters a token, plus a few a message (no shared tokenizer API)."""
        return 3 + sum(4 + math.ceil(len(m.get("content") or "") / CHARS_PER_TOKEN)
                       for m in messages)

    # The server's template decides whether the model thinks; what it says comes apart in
    # `reasoning_content` (llama-server, DeepSeek, localchat serve) or inside the content.
    thinking: Thinking | None = None

    def stream(self, messages: Sequence[dict[str, str]], sampling: Sampling
               ) -> Generator[str, None, None]:
        """Yield the reply's answer as the server streams it; `last_stats` is set when it ends."""
        return answer_only(self.stream_parts(messages, sampling))

    def stream_parts(self, messages: Sequence[dict[str, str]], sampling: Sampling
                     ) -> Generator[Part, None, None]:
        """Yield the reply as the server streams it, thinking apart from the answer (the
        server's `reasoning_content`, or a <think> block at the start of the content);
        `last_stats` is set however it ends.

        A stream that breaks off keeps what arrived: `last_stats.finish_reason` is
        'interrupted' and an EngineError says what happened.
        """
        sampling.validate()
        body = self._chat_body(messages, sampling)
        progress = _Progress(started=time.perf_counter())
        try:
            yield from self._events(body, progress)
        finally:
            self.last_stats = progress.stats(self.count_tokens(messages))

    def close(self) -> None:
        """Nothing to free: each reply has its own connection, closed when the reply ends."""

    def _chat_body(self, messages: Sequence[dict[str, str]], sampling: Sampling) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.info.model,
            "messages": [{"role": m["role"], "content": m["content"]} for m in messages],
            "stream": True,
            "stream_options": {"include_usage": True},
            "temperature": sampling.temperature,
        }
        # Fields outside OpenAI's schema go only when they differ from our defaults, so
        # strict servers still accept a plain request and lax ones keep their own defaults.
        if sampling.temperature > 0:
            body["top_p"] = sampling.top_p
            if sampling.top_k != _SAMPLING_DEFAULTS.top_k:
                body["top_k"] = sampling.top_k
            if sampling.min_p != _SAMPLING_DEFAULTS.min_p:
                body["min_p"] = sampling.min_p
        if sampling.repeat_penalty != 1.0:
            # llama-server and Ollama read the first name, vLLM and SGLang the second.
            body["repeat_penalty"] = body["repetition_penalty"] = sampling.repeat_penalty
        for penalty in ("presence_penalty", "frequency_penalty"):  # OpenAI's own fields
            if getattr(sampling, penalty):
                body[penalty] = getattr(sampling, penalty)
        if sampling.seed is not None:
            body["seed"] = sampling.seed
        if sampling.max_tokens is not None:
            body["max_tokens"] = sampling.max_tokens
        if sampling.stop:
            body["stop"] = list(sampling.stop)
        if sampling.ignore_eos:
            body["ignore_eos"] = True
        if sampling.think is not None:  # llama-server's, vLLM's and localchat serve's switch
            body["chat_template_kwargs"] = {"enable_thinking": sampling.think}
        if sampling.think_budget is not None:
            body["think_budget"] = sampling.think_budget
        return body

    def _events(self, body: dict[str, Any], progress: _Progress) -> Iterator[Part]:
        connection, response = self._request("POST", "/chat/completions", body)
        content = Splitter(family_named("think"))  # a server that leaves the markers in
        try:
            content_type = response.getheader("Content-Type", "")
            chunks = (_whole_reply(response) if content_type.startswith("application/json")
                      else _sse_chunks(response))
            for chunk in chunks:
                if chunk is None:
                    return  # [DONE]
                if "error" in chunk:
                    raise EngineError(f"{self.options.endpoint} failed mid-reply: "
                                      f"{_error_text(chunk, self.options.api_key)}",
                                      "see the server's log")
                if isinstance(chunk.get("usage"), dict):
                    progress.usage = chunk["usage"]
                for choice in chunk.get("choices") or []:
                    thought, text = _choice_reasoning(choice), _choice_text(choice)
                    if thought or text:
                        progress.last_at = time.perf_counter()
                        progress.first_at = progress.first_at or progress.last_at
                        progress.pieces += 1
                    if thought:
                        progress.reasoning += 1
                        yield Part(REASONING, thought, progress.reasoning)
                    if text:
                        yield from content.feed(text)
                    if isinstance(choice, dict) and choice.get("finish_reason"):
                        progress.finish_reason = str(choice["finish_reason"])
            yield from content.finish()
            if progress.finish_reason is None:
                raise EngineError(
                    f"{self.options.endpoint} closed the stream halfway "
                    f"(after {_tokens(progress.pieces)}); the partial reply is kept",
                    "the server may have stopped or restarted; see its log")
        except (OSError, http.client.HTTPException) as exc:
            raise self._transport_error(exc, f"after {_tokens(progress.pieces)}") from exc
        finally:
            connection.close()

    def _list_models(self) -> list[dict[str, Any]]:
        """The server's /models entries, or [] when it has no such route."""
        answer = self._request("GET", "/models", None, missing_ok=True)
        if answer is None:
            return []
        connection, response = answer
        try:
            data = json.loads(response.read(MAX_EVENT_BYTES))
        except (OSError, http.client.HTTPException) as exc:
            raise self._transport_error(exc, "while listing models") from exc
        except ValueError:
            return []
        finally:
            connection.close()
        items = data.get("data") if isinstance(data, dict) else None
        return [item for item in items if isinstance(item, dict)] if isinstance(items, list) else []

    @overload
    def _request(self, method: str, path: str, body: dict[str, Any] | None) -> _Exchange: ...
    @overload
    def _request(self, method: str, path: str, body: dict[str, Any] | None,
                 missing_ok: bool) -> _Exchange | None: ...

    def _request(self, method: str, path: str, body: dict[str, Any] | None,
                 missing_ok: bool = False) -> _Exchange | None:
        """Send one request and return (connection, response).

        An HTTP error status becomes an EngineError in the server's words; with `missing_ok`,
        a route the server lacks (404, 405) returns None instead.
        """
        kind = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        connection = kind(self._host, self._port, timeout=self.options.timeout_s)
        headers = {"User-Agent": f"localchat/{__version__}",
                   "Accept": "text/event-stream, application/json"}
        if self.options.api_key:
            headers["Authorization"] = f"Bearer {self.options.api_key}"
        data = None
        if body is not None:
            data = json.dumps(body, ensure_ascii=False).encode("utf-8")
            headers["Content-Type"] = "application/json"
        try:
            connection.request(method, self._base_path + path, body=data, headers=headers)
            response = connection.getresponse()
            if missing_ok and response.status in (404, 405):
                connection.close()
                return None
            if response.status >= 400:
                raise self._status_error(response.status, path, response.read(65536))
        except (OSError, http.client.HTTPException) as exc:
            connection.close()
            raise self._transport_error(exc) from exc
        except EngineError:
            connection.close()
            raise
        return connection, response

    def _status_error(self, status: int, path: str, raw: bytes) -> EngineError:
        where = self.options.endpoint
        detail = _error_text(_json_or_text(raw), self.options.api_key)
        said = f"HTTP {status}: {detail}" if detail else f"HTTP {status}"
        if status in (401, 403):
            if self.options.api_key:
                return EngineError(f"{where} refused the API key ({said})",
                                   f"check the key given with --api-key or ${API_KEY_ENV}")
            return EngineError(f"{where} wants an API key ({said})",
                               f"pass it with --api-key or ${API_KEY_ENV}")
        if status == 404:
            return EngineError(f"{where}{path} was not found ({said})",
                               "the URL usually ends in /v1, and MODEL must be one the server "
                               "lists at /v1/models")
        if status == 429:
            return EngineError(f"{where} is rate-limiting us ({said})", "wait and try again")
        if status >= 500:
            return EngineError(f"{where} failed ({said})", "see the server's log")
        return EngineError(f"{where} rejected the request ({said})",
                           "check MODEL and the sampling options")

    def _transport_error(self, exc: BaseException, when: str = "") -> EngineError:
        where = self.options.endpoint
        suffix = f" {when}" if when else ""
        if isinstance(exc, ConnectionRefusedError):
            return EngineError(f"cannot connect to {where}: connection refused",
                               "is the server running? check the host and port")
        if isinstance(exc, TimeoutError):
            return EngineError(f"no answer from {where} within {self.options.timeout_s:g} s"
                               f"{suffix}", "the server may be overloaded, or the URL wrong")
        if isinstance(exc, socket.gaierror):
            return EngineError(f"cannot find the host '{self._host}': {exc.strerror}",
                               "check the --endpoint URL")
        if isinstance(exc, ssl.SSLError):
            return EngineError(f"TLS with {where} failed: {exc.reason or exc}",
                               "check the URL's scheme and the server's certificate")
        if isinstance(exc, ConnectionError | http.client.IncompleteRead):
            return EngineError(f"{where} closed the connection{suffix}",
                               "the server may have stopped or restarted; see its log")
        if isinstance(exc, http.client.HTTPException):
            return EngineError(f"{where} did not answer in HTTP{suffix}: "
                               f"{type(exc).__name__}", "check the host and port")
        reason = getattr(exc, "strerror", None) or exc
        return EngineError(f"cannot talk to {where}{suffix}: {reason}",
                           "check the --endpoint URL and your network")


def _context_length(entry: dict[str, Any]) -> int | None:
    """The context window from a /models entry, under the names servers use for it."""
    meta = entry.get("meta")
    if not isinstance(meta, dict):
        meta = {}
    for value in (entry.get("max_model_len"), entry.get("context_length"),
                  entry.get("context_window"), meta.get("n_ctx"), meta.get("n_ctx_train")):
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _choice_reasoning(choice: object) -> str | None:
    """The thinking in a chunk: DeepSeek's and llama-server's field, or vLLM's newer name."""
    if not isinstance(choice, dict):
        return None
    for holder in (choice.get("delta"), choice.get("message")):
        if isinstance(holder, dict):
            for name in ("reasoning_content", "reasoning"):
                value = holder.get(name)
                if isinstance(value, str):
                    return value
    return None


def _choice_text(choice: object) -> str | None:
    if not isinstance(choice, dict):
        return None
    for holder in (choice.get("delta"), choice.get("message")):
        content = holder.get("content") if isinstance(holder, dict) else None
        if isinstance(content, str):
            return content
    text = choice.get("text")
    return text if isinstance(text, str) else None


def _sse_chunks(response: http.client.HTTPResponse) -> Iterator[dict[str, Any] | None]:
    """JSON objects from a server-sent event stream; None for the closing [DONE]."""
    data: list[str] = []
    while True:
        line = response.readline(MAX_EVENT_BYTES)
        if not line:
            return  # end of stream; an event without its blank line is dropped, as SSE says
        if not line.endswith(b"\n") and len(line) >= MAX_EVENT_BYTES:
            raise EngineError("the server sent an event over 4 MiB", "see the server's log")
        text = line.decode("utf-8", errors="replace").rstrip("\r\n")
        if text.startswith("data:"):
            data.append(text[5:].removeprefix(" "))
        elif not text and data:
            payload = "\n".join(data)
            data = []
            if payload.strip() == "[DONE]":
                yield None
                return
            chunk = _json_or_text(payload.encode("utf-8"))
            if not isinstance(chunk, dict):
                raise EngineError(f"the server sent an event that is not a JSON object: "
                                  f"{_printable(payload)}", "is this an OpenAI-compatible server?")
            yield chunk
        # comments (":" keep-alives), "event:" and "id:" lines carry nothing we use


def _whole_reply(response: http.client.HTTPResponse) -> Iterator[dict[str, Any] | None]:
    """A server that ignored `stream` sent one JSON body: treat it as a single chunk."""
    chunk = _json_or_text(response.read())
    if not isinstance(chunk, dict):
        raise EngineError("the server's reply is not a JSON object",
                          "is this an OpenAI-compatible server?")
    yield chunk
    yield None


def _json_or_text(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode("utf-8", errors="replace")


def _error_text(body: object, api_key: str | None) -> str:
    """The server's error message, one printable line, with our key blanked if it was echoed."""
    text = body
    if isinstance(text, dict) and "error" in text:
        text = text["error"]  # OpenAI, vLLM and llama-server nest it; some send a bare string
    if isinstance(text, dict):
        text = text.get("message") or text.get("detail") or ""
    text = _printable(str(text or ""))
    return text.replace(api_key, "***") if api_key else text


def _printable(text: str, limit: int = 200) -> str:
    flat = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"
