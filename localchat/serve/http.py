"""What every route shares: bounded bodies, the API key, error bodies, one log line a request.

A client's fault (a bad body, a stall, leaving early) is an answer and one log line, never a
traceback: requests are read with bounds on size, nesting and time, and the log middleware turns
anything unexpected into a 500 with one line (the traceback only with --verbose).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
import traceback
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from localchat.serve.openai_api import ApiError

MAX_BODY_BYTES = 16 * 1024 * 1024  # far above any context window's worth of text
MAX_NESTING = 64  # arrays and objects inside each other; real requests (schemas too) use < 20


class ClientGone(Exception):
    """The client closed its connection before the answer was ready (logged as 499)."""


async def read_json(request: Request, timeout: float) -> Any:
    """The body as JSON, read with bounds: size (413), time (408) and nesting (400)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, "Content-Length must be a number of bytes")
        if int(declared) > MAX_BODY_BYTES:
            raise ApiError(413, f"the body is {int(declared)} bytes; the limit is "
                           f"{MAX_BODY_BYTES}")
    body = bytearray()
    try:
        async with asyncio.timeout(timeout):
            async for part in request.stream():
                body += part
                if len(body) > MAX_BODY_BYTES:
                    raise ApiError(413, f"the body is over the limit of {MAX_BODY_BYTES} bytes")
    except TimeoutError:
        raise ApiError(408, f"the body did not arrive within {timeout:g} s") from None
    except ClientDisconnect:
        raise ClientGone from None
    return decode_json(bytes(body))


def decode_json(raw: bytes) -> Any:
    """JSON with no NaN or Infinity and at most MAX_NESTING levels; anything else is a 400."""
    def reject(constant: str) -> None:
        raise ValueError(f"{constant} is not valid JSON")

    if not raw.strip():
        raise ApiError(400, "the body is empty; send a JSON object", code="invalid_json")
    try:
        value = json.loads(raw.decode("utf-8"), parse_constant=reject)
    except RecursionError:
        value = None
    except (UnicodeDecodeError, ValueError) as exc:
        raise ApiError(400, f"the body is not valid JSON: {exc}", code="invalid_json") from None
    else:
        if _depth_within(value, MAX_NESTING):
            return value
    raise ApiError(400, f"the body nests arrays and objects more than {MAX_NESTING} deep",
                   code="invalid_json")


def _depth_within(value: Any, limit: int) -> bool:
    """True when `value` nests containers at most `limit` deep (iteratively: no recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(
            item, list) else None
        if children is None:
            continue
        if depth > limit:
            return False
        stack.extend((child, depth + 1) for child in children
                     if isinstance(child, dict | list))
    return True


def key_matches(request: Request, expected: str | None) -> bool:
    """True without a key, or with `Authorization: Bearer KEY` (compared in constant time)."""
    if not expected:
        return True
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(),
                                                              expected.encode())


def note(request: Request, text: str) -> None:
    """What the request's log line adds after its status and time."""
    request.scope.setdefault("state", {})["log_note"] = text


def openai_error(error: ApiError, headers: dict[str, str] | None = None) -> Response:
    """OpenAI's error body."""
    extra = {"WWW-Authenticate": "Bearer"} if error.status == 401 else {}
    return JSONResponse(error.body(), status_code=error.status, headers={**extra,
                                                                         **(headers or {})})


def ollama_error(error: ApiError, headers: dict[str, str] | None = None) -> Response:
    """Ollama's error body: {"error": "..."}."""
    return JSONResponse({"error": error.message}, status_code=error.status, headers=headers)


class ClosingStream(StreamingResponse):
    """A streamed body whose generator is closed as soon as the response ends, also when the
    client left (Starlette only cancels the task that was sending): the generator's `finally`
    stops the reply before the request's log line is written."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        import anyio

        try:
            await super().__call__(scope, receive, send)
        finally:
            close = getattr(self.body_iterator, "aclose", None)
            if close is not None:
                with anyio.CancelScope(shield=True):
                    await close()


Handler = Callable[[Request], Awaitable[Response]]


def guarded(handler: Handler, errors: Callable[..., Response]) -> Handler:
    """A route whose ApiErrors become `errors(...)` responses and whose log line has a note."""

    async def route(request: Request) -> Response:
        try:
            return await handler(request)
        except ApiError as exc:
            note(request, exc.message)
            retry = getattr(exc, "retry_after", None)
            close = {"Connection": "close"} if exc.status in (408, 413) else {}
            return errors(exc, {**close, **({"Retry-After": str(retry)} if retry else {})})
        except ClientGone:
            request.scope.setdefault("state", {})["client_gone"] = True
            return Response(status_code=499)

    return route


class RequestLog:
    """ASGI middleware: one line a request, and no traceback for anything a client does."""

    def __init__(self, app: ASGIApp, log: Callable[[str], None], verbose: bool) -> None:
        self.app = app
        self.log = log
        self.verbose = verbose

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status: list[int] = []

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            try:
                await send(message)
            except OSError:  # the client's socket broke under a write
                scope.setdefault("state", {})["client_gone"] = True
                raise ClientGone from None

        problem = ""
        try:
            await self.app(scope, receive, sending)
        except ClientGone:
            pass
        except asyncio.CancelledError:  # uvicorn's last resort at shutdown: the task ends here
            problem = "cancelled: the server stopped"
        except Exception as exc:  # a bug of ours: one line, a 500 if nothing was sent yet
            problem = f"internal error: {type(exc).__name__}: {exc}"
            if self.verbose:
                problem += "\n" + traceback.format_exc().rstrip()
            if not status:
                body = ApiError(500, "internal server error", kind="server_error").body()
                with contextlib.suppress(ClientGone):
                    await JSONResponse(body, status_code=500)(scope, receive, sending)
        state = scope.get("state", {})
        code = 499 if state.get("client_gone") else status[0] if status else 500
        text = problem or state.get("log_note", "")
        client = (scope.get("client") or ("-", 0))[0]
        path = scope.get("path", "")
        self.log(f"{client} {scope.get('method', '-')} {path} {code} · "
                 f"{time.perf_counter() - started:.2f} s" + (f" · {text}" if text else ""))
