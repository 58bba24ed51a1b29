"""`localchat serve`: an OpenAI-compatible HTTP API in front of one LocalEngine.

Why not llama-cpp-python's own server (its `server` extra)? It loads the model itself, so the
file would skip our header validation, and it answers through `create_chat_completion`, with its
own template selection, sampler order and stop handling: greedy answers could differ from
`localchat run`, and we would lose the KV-prefix reuse and exact token counts. It also brings
FastAPI, uvicorn, sse-starlette and pydantic-settings. The standard library's threading server
over the same LocalEngine gives one engine path; a lock serves requests one at a time while the
others wait their turn.
"""

from __future__ import annotations

import errno
import hmac
import ipaddress
import itertools
import json
import select
import signal
import socket
import socketserver
import threading
import time
import uuid
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType
from typing import Any

from localchat.engine.local import EngineOptions, LocalEngine
from localchat.engine.protocol import Sampling
from localchat.engine.reasoning import ANSWER, REASONING, Part
from localchat.engine.remote import api_key_from
from localchat.errors import ContextOverflowError, ExitStatus, LocalchatError, UsageError
from localchat.serve import openai_api as api

MAX_BODY_BYTES = 16 * 1024 * 1024  # far above any context window's worth of text
IDLE_TIMEOUT_S = 120  # a keep-alive connection left idle this long frees its thread
SHUTDOWN_WAIT_S = 10  # how long Ctrl-C waits for the reply in progress to stop


@dataclass(frozen=True)
class ServeSettings:
    """Where to listen, who may ask, and the model id clients see."""

    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = field(default=None, repr=False)
    model_id: str = "local"
    sampling: Sampling = field(default_factory=Sampling)  # for fields a request leaves out


def serve_settings(host: str, port: int, api_key: str | None, model: str,
                   sampling: Sampling) -> ServeSettings:
    """Settings from `serve`'s flags: the key from --api-key or $LOCALCHAT_API_KEY."""
    if not 0 <= port <= 65535:
        raise UsageError(f"--port must be in 0..65535 (got {port})", "0 picks a free port")
    model_id = Path(model).stem if model.endswith(".gguf") else model
    return ServeSettings(host=host, port=port, api_key=api_key_from(api_key), model_id=model_id,
                         sampling=sampling)


def is_loopback(host: str) -> bool:
    """True when only this machine can reach `host`; an unknown name counts as reachable."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def serve_model(options: EngineOptions, settings: ServeSettings,
                log: Callable[[str], None]) -> int:
    """Listen, load the model through the one loader, and answer requests until Ctrl-C."""
    from localchat.engine.loader import load_engine

    server = ApiServer(settings, log)  # a busy port fails here, before a slow model load
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)  # `kill` and `docker stop` end us like Ctrl-C
    try:
        if not settings.api_key and not is_loopback(settings.host):
            log(f"warning: listening on {settings.host} without --api-key: anyone who can "
                "reach this port can use the model")
        server.engine = load_engine(options)
        key_note = ", API key required" if settings.api_key else ""
        log(f"serving {settings.model_id} at {server.base_url} "
            f"(context {server.engine.n_ctx} tokens{key_note}); Ctrl-C stops")
        server.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        return ExitStatus.INTERRUPTED  # Ctrl-C is how a server stops: 130, as for every command
    finally:
        server.stop()
    return ExitStatus.OK  # not reached: serve_forever ends only by an exception


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


class ApiServer(ThreadingHTTPServer):
    """The listening socket, the one engine, and the lock that queues requests for it."""

    daemon_threads = True

    def __init__(self, settings: ServeSettings, log: Callable[[str], None]) -> None:
        self.settings = settings
        self.log = log
        self.engine: LocalEngine | None = None
        self.engine_lock = threading.Lock()
        self.stopping = threading.Event()
        self.created = int(time.time())
        if ":" in settings.host:
            self.address_family = socket.AF_INET6
        try:
            super().__init__((settings.host.strip("[]"), settings.port), _Handler)
        except OSError as exc:
            raise _bind_error(exc, settings) from None

    def server_bind(self) -> None:
        """Bind without HTTPServer's reverse DNS lookup, which can stall for seconds offline."""
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.settings.host, self.server_address[1]

    @property
    def base_url(self) -> str:
        """The URL clients put in front of /chat/completions."""
        host = self.settings.host
        return f"http://{f'[{host}]' if ':' in host else host}:{self.server_address[1]}/v1"

    def stop(self) -> None:
        """Stop the reply in progress, close the socket, then free the model."""
        self.stopping.set()
        self.server_close()
        if self.engine is not None and self.engine_lock.acquire(timeout=SHUTDOWN_WAIT_S):
            self.engine.close()


def _bind_error(exc: OSError, settings: ServeSettings) -> LocalchatError:
    where = f"{settings.host}:{settings.port}"
    if exc.errno == errno.EADDRINUSE:
        return LocalchatError(f"port {settings.port} on {settings.host} is already in use",
                              "stop the program using it, or pick another with --port")
    if exc.errno == errno.EACCES:
        return LocalchatError(f"no permission to listen on {where}",
                              "ports below 1024 need privileges; pick another with --port")
    return LocalchatError(f"cannot listen on {where}: {exc.strerror or exc}",
                          "use an address of this machine, e.g. 127.0.0.1 or 0.0.0.0")


class _Handler(BaseHTTPRequestHandler):
    server: ApiServer
    protocol_version = "HTTP/1.1"
    server_version = "localchat"
    timeout = IDLE_TIMEOUT_S

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    do_DELETE = do_PATCH = do_PUT

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        """Silence http.server's access line: each request logs one line of its own."""

    def log_message(self, format: str, *args: Any) -> None:
        """Protocol-level faults http.server reports (a garbled request line, a timeout)."""
        self.server.log(f"{self.client_address[0]} {format % args}")

    def _dispatch(self, method: str) -> None:
        started = time.perf_counter()
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        note = ""
        try:
            if path == "/health":
                status = self._send_json(200, {"status": "ok"})
            else:
                self._check_key()
                status, note = self._route(method, path)
        except api.ApiError as exc:
            status = self._send_error(exc)
            note = exc.message
        except OSError:  # 499 is nginx's code for a client that left; nothing to send
            status, note = 499, "client went away"
            self.close_connection = True
        elapsed = time.perf_counter() - started
        self.server.log(f"{self.client_address[0]} {method} {path} {status} · {elapsed:.2f} s"
                        + (f" · {note}" if note else ""))

    def _check_key(self) -> None:
        expected = self.server.settings.api_key
        if not expected:
            return
        given = self.headers.get("Authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                                 expected.encode()):
            raise api.ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                               code="invalid_api_key")

    def _route(self, method: str, path: str) -> tuple[int, str]:
        model_id = self.server.settings.model_id
        if path == "/v1/models" or path.startswith("/v1/models/"):
            if method != "GET":
                raise api.ApiError(405, f"{method} is not allowed on {path}; use GET")
            entry = api.model_entry(model_id, self.server.created, self._engine().n_ctx)
            if path == "/v1/models":
                return self._send_json(200, {"object": "list", "data": [entry]}), ""
            if path.removeprefix("/v1/models/") != model_id:
                raise api.ApiError(404, f"no model '{path.removeprefix('/v1/models/')}' here; "
                                   f"this server has '{model_id}'", code="model_not_found")
            return self._send_json(200, entry), ""
        kind = {"/v1/chat/completions": "chat", "/v1/completions": "text"}.get(path)
        if kind is None:
            raise api.ApiError(404, f"no route {path}; try /v1/chat/completions, "
                               "/v1/completions or /v1/models", code="not_found")
        if method != "POST":
            raise api.ApiError(405, f"{method} is not allowed on {path}; use POST")
        request = api.parse_request(kind, self._read_json(), self.server.settings.sampling)
        return self._generate(request)

    def _engine(self) -> LocalEngine:
        if self.server.engine is None:
            raise api.ApiError(503, "the model is still loading; try again in a moment",
                               kind="server_error")
        return self.server.engine

    def _read_json(self) -> Any:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            raise api.ApiError(411, "send the body with a Content-Length, not chunked")
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise api.ApiError(411, "the request needs a Content-Length header") from None
        if not 0 <= length <= MAX_BODY_BYTES:
            raise api.ApiError(413, f"the body is {length} bytes; the limit is {MAX_BODY_BYTES}")
        return api.decode_json(self.rfile.read(length))

    def _generate(self, request: api.Request) -> tuple[int, str]:
        engine = self._engine()
        with self.server.engine_lock:  # one reply at a time; later requests wait here
            if self._client_gone():
                self.close_connection = True
                return 499, "client left while waiting"
            pieces = self._start(engine, request)
            meta = api.new_meta(request.kind, uuid.uuid4().hex[:24], self.server.settings.model_id)
            try:
                send = self._stream_events if request.stream else self._send_whole
                status = send(request, meta, engine, pieces)
            except OSError:  # the client's socket broke under a write
                self.close_connection = True
                status = 499
            finally:
                pieces.close()  # stops the decode loop at once if the reply was cut short
            stats = engine.last_stats
        if stats is None:
            return status, ""
        gone = "client went away, generation stopped · " if status == 499 else ""
        return status, (f"{gone}prompt {stats.prompt_tokens} tok ({stats.cached_tokens} cached)"
                        f" · reply {stats.completion_tokens} tok · {stats.finish_reason}")

    def _start(self, engine: LocalEngine, request: api.Request) -> Generator[Part, None, None]:
        """The engine's generator with its prompt checked: faults in the request become 400s."""
        engine.last_stats = None  # a generator closed before it starts leaves stats untouched
        try:
            if request.messages is not None:
                engine.count_tokens(request.messages)  # renders the template: bad roles fail here
                return engine.stream_parts(request.messages, request.sampling)
            return _as_answer(engine.stream_text(request.prompt or "", request.sampling))
        except ContextOverflowError as exc:  # OpenAI's code for it, which clients look for
            raise api.ApiError(400, exc.message, code="context_length_exceeded",
                               param="messages" if request.messages is not None else "prompt"
                               ) from None
        except LocalchatError as exc:
            raise api.ApiError(400, exc.message, code="invalid_prompt") from None

    def _pieces(self, pieces: Generator[Part, None, None]) -> Generator[Part, None, None]:
        """The reply's pieces until it ends, the client leaves or the server stops."""
        try:
            for piece in pieces:
                yield piece
                if self.server.stopping.is_set() or self._client_gone():
                    return
        except ContextOverflowError as exc:
            raise api.ApiError(400, exc.message, code="context_length_exceeded") from None
        except LocalchatError as exc:
            raise api.ApiError(500, exc.message, kind="server_error") from None

    def _send_whole(self, request: api.Request, meta: api.ReplyMeta, engine: LocalEngine,
                    pieces: Generator[Part, None, None]) -> int:
        parts = list(self._pieces(pieces))
        pieces.close()
        stats = engine.last_stats
        if stats is None or stats.finish_reason == "interrupted":
            return 499
        text = "".join(part.text for part in parts if part.kind == ANSWER)
        reasoning = "".join(part.text for part in parts if part.kind == REASONING)
        return self._send_json(200, api.whole_reply(meta, text, stats, reasoning))

    def _stream_events(self, request: api.Request, meta: api.ReplyMeta, engine: LocalEngine,
                       pieces: Generator[Part, None, None]) -> int:
        stream = self._pieces(pieces)
        first = next(stream, None)  # a bad prompt fails here, while a JSON error still fits
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")  # the body ends when the connection does
        self.end_headers()
        self.close_connection = True
        self._send_event(api.chunk(meta, opening=True))
        try:
            for part in itertools.chain([first] if first is not None else [], stream):
                self._send_event(api.chunk(meta, text=part.text) if part.kind == ANSWER
                                 else api.chunk(meta, reasoning=part.text))
        except api.ApiError as exc:  # the engine failed mid-reply: say so in the stream
            self._send_event(exc.body())
            return 500
        pieces.close()
        stats = engine.last_stats
        if stats is None or stats.finish_reason == "interrupted":
            return 499
        self._send_event(api.chunk(meta, finish=stats.finish_reason))
        if request.include_usage:
            self._send_event(api.usage_chunk(meta, stats))
        self.wfile.write(b"data: [DONE]\n\n")
        return 200

    def _send_event(self, payload: dict[str, Any]) -> None:
        # An unbuffered write per piece: a client that left makes the next write fail.
        data = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
        self.wfile.write(b"data: " + data.encode("utf-8") + b"\n\n")

    def _send_json(self, status: int, payload: dict[str, Any], *,
                   headers: dict[str, str] | None = None) -> int:
        data = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)
        return status

    def _send_error(self, error: api.ApiError) -> int:
        # The body may be unread or half-read: close rather than misparse the next request.
        self.close_connection = True
        extra = {"WWW-Authenticate": "Bearer"} if error.status == 401 else {}
        return self._send_json(error.status, error.body(), headers=extra)

    def _client_gone(self) -> bool:
        """True when the client has closed its side (a readable socket with nothing to read)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True


def _as_answer(pieces: Generator[str, None, None]) -> Generator[Part, None, None]:
    """Raw text completions as answer parts; closing this closes `pieces` (the decode loop)."""
    try:
        for piece in pieces:
            yield Part(ANSWER, piece)
    finally:
        pieces.close()
