"""`localchat serve`: the OpenAI and Ollama APIs over the models on disk, on uvicorn/starlette.

Why not llama-cpp-python's own server (its `server` extra)? It loads the model itself, so the
file would skip our header validation, and it answers through `create_chat_completion`, with its
own template selection, sampler order and stop handling: greedy answers could differ from
`localchat run`, and we would lose the KV-prefix reuse and exact token counts. Here uvicorn and
starlette carry HTTP (streaming, disconnects, shutdown), and every reply goes through the one
loader and `LocalEngine.stream`, as `run` does.

What uvicorn leaves to us: a deadline for a request's head (it only times out idle keep-alive
connections), bounded bodies (`http.read_json`), one log line a request with no tracebacks for
a client's faults (`http.RequestLog`), and a file-descriptor limit that fits many connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import signal
import socket
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from localchat.engine.remote import api_key_from
from localchat.errors import ExitStatus, LocalchatError, UsageError

SHUTDOWN_GRACE_S = 5  # Ctrl-C: replies in flight get this long to finish, then they are stopped
SHUTDOWN_BACKSTOP_S = 10  # ... and what still runs this much later is cancelled by uvicorn
IDLE_TIMEOUT_S = 30  # a keep-alive connection idle this long is closed
CLIENT_TIMEOUT_S = 30.0  # a client has this long to send a request's head, and again its body
REAP_INTERVAL_S = 1.0  # how often keep_alive deadlines are checked
MAX_CONNECTIONS = 4096  # past this, uvicorn answers 503 (and the fd limit is raised to fit)


@dataclass(frozen=True)
class ServeSettings:
    """Where to listen, who may ask, and how many models and requests to hold."""

    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = field(default=None, repr=False)
    max_loaded: int = 1
    queue_size: int = 32  # requests waiting for one model beyond the one it answers
    client_timeout: float = CLIENT_TIMEOUT_S
    verbose: bool = False


def serve_settings(host: str, port: int, api_key: str | None, *, max_loaded: int = 1,
                   queue_size: int = 32, client_timeout: float = CLIENT_TIMEOUT_S,
                   verbose: bool = False) -> ServeSettings:
    """Settings from `serve`'s flags: the key from --api-key or $LOCALCHAT_API_KEY."""
    if not 0 <= port <= 65535:
        raise UsageError(f"--port must be in 0..65535 (got {port})", "0 picks a free port")
    if max_loaded < 1:
        raise UsageError(f"--max-loaded must be 1 or more (got {max_loaded})")
    if queue_size < 0:
        raise UsageError(f"--queue must be 0 or more (got {queue_size})")
    if not client_timeout > 0:
        raise UsageError(f"--client-timeout must be above 0 (got {client_timeout:g})")
    return ServeSettings(host=host, port=port, api_key=api_key_from(api_key),
                         max_loaded=max_loaded, queue_size=queue_size,
                         client_timeout=client_timeout, verbose=verbose)


def is_loopback(host: str) -> bool:
    """True when only this machine can reach `host`; an unknown name counts as reachable."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def serve(directory: Any, preload: Sequence[Any], settings: ServeSettings,
          log: Callable[[str], None]) -> int:
    """Listen, load the `preload` models through the one loader, and answer requests until
    Ctrl-C or SIGTERM (exit 130): replies in flight get SHUTDOWN_GRACE_S to finish."""
    from localchat.engine.loader import load_engine
    from localchat.serve.generation import join_workers
    from localchat.serve.registry import ModelRegistry
    from localchat.serve.serving import Serving

    sock = _bind(settings)  # a busy port fails here, before a slow model load
    registry = ModelRegistry(load_engine, max_loaded=settings.max_loaded,
                             queue_size=settings.queue_size, log=log)
    serving = Serving(models=directory, registry=registry, log=log, api_key=settings.api_key,
                      verbose=settings.verbose, client_timeout=settings.client_timeout)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)  # `kill` and `docker stop` end us like Ctrl-C
    try:
        if not settings.api_key and not is_loopback(settings.host):
            log(f"warning: listening on {settings.host} without --api-key: anyone who can "
                "reach this port can use the models")
        for model in preload:
            registry.preload(model)
        log(_serving_line(serving, preload, sock, settings))
        _run(serving, sock, settings)
    except KeyboardInterrupt:
        return ExitStatus.INTERRUPTED  # Ctrl-C is how a server stops: 130, as for every command
    finally:
        serving.stopping.set()
        sock.close()
        if join_workers(timeout=10):  # never free a model under a reply still decoding
            registry.close_all()
    return ExitStatus.INTERRUPTED  # uvicorn returns after a signal it re-raised


def _serving_line(serving: Any, preload: Sequence[Any], sock: socket.socket,
                  settings: ServeSettings) -> str:
    base = base_url(settings.host, sock.getsockname()[1])
    named = ", ".join(model.id for model in preload)
    on_disk = len(serving.models.list())
    what = named or (f"{on_disk} models on disk" if on_disk else
                     "no models yet (none on disk: `localchat pull smollm2` gets one)")
    key = ", API key required" if settings.api_key else ""
    return (f"serving {what} at {base}/v1 (OpenAI) and {base}/api (Ollama); models load on "
            f"first request, {settings.max_loaded} at a time{key}; Ctrl-C stops")


def base_url(host: str, port: int) -> str:
    """The server's URL, without a path."""
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _run(serving: Any, sock: socket.socket, settings: ServeSettings) -> None:
    import uvicorn

    _route_library_logs(serving.log, settings.verbose)
    _raise_fd_limit()
    config = uvicorn.Config(
        create_app(serving), http=_protocol(settings.client_timeout), ws="none",
        lifespan="on", log_config=None, access_log=False, server_header=False,
        timeout_keep_alive=IDLE_TIMEOUT_S,
        timeout_graceful_shutdown=SHUTDOWN_GRACE_S + SHUTDOWN_BACKSTOP_S,
        limit_concurrency=MAX_CONNECTIONS)

    class Server(uvicorn.Server):
        async def shutdown(self, sockets: Any = None) -> None:
            """uvicorn's shutdown (no new connections; wait for the requests in flight), with
            the grace period ended by stopping the replies: each ends at its next token, and a
            request still queued gets 503, so nothing needs cancelling."""
            timer = asyncio.get_running_loop().call_later(SHUTDOWN_GRACE_S,
                                                          serving.stopping.set)
            try:
                await super().shutdown(sockets)
            finally:
                timer.cancel()

    Server(config).run(sockets=[sock])


def create_app(serving: Any) -> Any:
    """The ASGI app: the OpenAI and Ollama routes behind the key check and the request log."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    from localchat.serve import ollama_routes, openai_routes
    from localchat.serve.http import RequestLog, key_matches, ollama_error, openai_error
    from localchat.serve.openai_api import ApiError

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    def errors_for(path: str) -> Callable[..., Response]:
        return ollama_error if path.startswith("/api/") else openai_error

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        path = request.url.path
        if exc.status_code == 405:
            error = ApiError(405, f"{request.method} is not allowed on {path}")
        else:
            error = ApiError(exc.status_code, f"no route {path}; try /v1/chat/completions, "
                             "/v1/completions, /v1/models, /api/chat or /api/tags",
                             code="not_found")
        return errors_for(path)(error)

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        reaper = asyncio.create_task(_reap(serving))
        try:
            yield
        finally:
            reaper.cancel()

    app = Starlette(routes=[Route("/health", health, methods=["GET"]),
                            *openai_routes.routes(), *ollama_routes.routes()],
                    exception_handlers={HTTPException: http_error}, lifespan=lifespan)
    app.state.serving = serving

    async def guarded(scope: Any, receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and path not in ("/", "/health") and not key_matches(
                Request(scope), serving.api_key):
            error = ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                             code="invalid_api_key")
            scope.setdefault("state", {})["log_note"] = "missing or wrong API key"
            await errors_for(path)(error)(scope, receive, send)
            return
        await app(scope, receive, send)

    return RequestLog(guarded, serving.log, serving.verbose)


async def _reap(serving: Any) -> None:
    while True:
        await asyncio.sleep(REAP_INTERVAL_S)
        await serving.registry.reap()


def _protocol(head_timeout: float) -> type:
    """uvicorn's HTTP/1.1 protocol with a deadline for each request's head: a client that
    connects and then sends nothing, or half its headers, is disconnected after `head_timeout`
    seconds (uvicorn only times out connections idle between requests)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._watch_head()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._watch_head()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._watch_head()

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_watch()
            super().connection_lost(exc)

        def _watch_head(self) -> None:
            waiting = self.cycle is None or self.cycle.response_complete
            if waiting and self._head_timer is None and not self.transport.is_closing():
                self._head_timer = self.loop.call_later(head_timeout, self._head_expired)
            elif not waiting:
                self._stop_watch()

        def _stop_watch(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_expired(self) -> None:
            self._head_timer = None
            if self.cycle is None or self.cycle.response_complete:
                self.transport.close()  # no request in progress: nothing to answer

    return Protocol


class _OneLine(logging.Handler):
    """uvicorn's and asyncio's log records as one line each in the server's log: a client's
    fault there (a malformed request, a reset connection) never prints a traceback."""

    def __init__(self, log: Callable[[str], None]) -> None:
        super().__init__()
        self.log = log

    def emit(self, record: logging.LogRecord) -> None:
        text = " ".join(record.getMessage().split())
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            text += f": {type(exc).__name__}: {exc}"
        self.log(text)


def _route_library_logs(log: Callable[[str], None], verbose: bool) -> None:
    handler = _OneLine(log)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "asyncio"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.propagate = False
        logger.setLevel(logging.INFO if verbose else logging.WARNING)


def _raise_fd_limit() -> None:
    """Room for MAX_CONNECTIONS sockets: raise the soft limit of open files (as Go programs,
    Ollama among them, do at start)."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        wanted = MAX_CONNECTIONS + 256
        if soft != resource.RLIM_INFINITY and soft < wanted:
            new = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    except (ImportError, ValueError, OSError):
        pass  # not POSIX, or not allowed: the default limit then bounds the connections


def _bind(settings: ServeSettings) -> socket.socket:
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((settings.host.strip("[]"), settings.port))
        sock.listen(2048)
    except OSError as exc:  # socket.gaierror too: a host name that does not resolve
        sock.close()
        raise _bind_error(exc, settings) from None
    sock.set_inheritable(True)
    return sock


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
