"""One reply's life on the server, shared by the OpenAI and Ollama routes.

Find the model (404 naming it), wait for its turn (429 when its queue is full, 499 when the
client leaves while waiting), start the reply on a worker thread with its prompt checked (a bad
prompt is a 400 while a JSON error still fits), and stop it when the client leaves.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from starlette.requests import Request

from localchat.engine.grammar import OutputGrammar
from localchat.engine.local import LocalEngine
from localchat.engine.options import EngineOptions
from localchat.engine.protocol import ReplyOptions, Sampling
from localchat.engine.reasoning import ANSWER, REASONING, Part
from localchat.errors import ContextOverflowError, LocalchatError
from localchat.serve.generation import Piece, Reply
from localchat.serve.http import ClientGone, note
from localchat.serve.models import ModelDirectory, NotServed, ServedModel
from localchat.serve.openai_api import ApiError
from localchat.serve.registry import Busy, KeepAlive, Lease, ModelRegistry
from localchat.serve.tools import CallFilter, ToolCall

T = TypeVar("T")


class RetryLater(ApiError):
    """429: the model's queue is full."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(429, message, code="rate_limit_exceeded", kind="rate_limit_error")
        self.retry_after = retry_after


@dataclass(frozen=True)
class Asked:
    """What a request of either API asks the engine for: messages (the thinking kept apart) or a
    plain prompt, its sampling, and what it adds (tools, logit_bias, logprobs)."""

    messages: list[dict[str, Any]] | None
    prompt: str | None
    sampling: Sampling
    options: ReplyOptions

    def stream(self, engine: LocalEngine, grammar: OutputGrammar | None
               ) -> Generator[str, None, None] | Generator[Part, None, None]:
        """The reply, under `grammar` (the request's format or a tool call's, or None)."""
        sampling = replace(self.sampling, grammar=grammar)
        if self.messages is not None:  # a thinking model's thinking apart from the answer
            return engine.stream_parts(self.messages, sampling, self.options)
        return engine.stream_text(self.prompt or "", sampling, self.options)


@dataclass
class Serving:
    """What every route reads: the models, the loaded engines, the key and the log."""

    models: ModelDirectory
    registry: ModelRegistry
    log: Callable[[str], None]
    api_key: str | None = None
    verbose: bool = False
    client_timeout: float = 30.0  # for a request's body (its head: the protocol's deadline)
    stopping: threading.Event = field(default_factory=threading.Event)
    created: int = field(default_factory=lambda: int(time.time()))

    def find(self, name: str | None) -> ServedModel:
        """The model a request names (the first one `serve` named when it names none)."""
        if not name:
            if self.models.default is None:
                raise ApiError(400, "'model' is required: this server has several models",
                               param="model")
            return self.models.default
        try:
            return self.models.find(name)
        except NotServed as exc:
            raise ApiError(404, str(exc), param="model", code="model_not_found") from None

    async def lease(self, request: Request, served: ServedModel,
                    options: EngineOptions | None = None) -> Lease:
        """The model, loaded and ours until released; waits in its queue."""
        try:
            lease = await until_gone(request, self.registry.acquire(served, options),
                                     on_late_result=lambda lease: lease.release())
        except ClientGone:
            note(request, f"client went away while waiting for {served.id}")
            raise
        except Busy as exc:
            raise RetryLater(str(exc), exc.retry_after) from None
        except LocalchatError as exc:  # the file would not load: say so, the server stays up
            raise ApiError(500, f"{served.id} could not be loaded: {exc}",
                           kind="server_error") from None
        if self.stopping.is_set():  # queued until the server began to stop
            lease.release()
            raise ApiError(503, "the server is stopping", kind="server_error")
        if lease.load_s:
            note(request, f"loaded {served.id} in {lease.load_s:.2f} s")
        return lease

    async def open_reply(self, request: Request, served: ServedModel, asked: Asked,
                         check: Callable[[LocalEngine], tuple[str | None, OutputGrammar | None]],
                         param: str, options: EngineOptions | None = None,
                         keep_alive: KeepAlive = ...) -> tuple[Shown, Lease]:
        """Both APIs' way into a reply: the model leased, what the request asks of it checked
        (`check` gives the tool-call style and the grammar, or a 400 that releases the model),
        then the reply started under that grammar and shown as the request's tools need."""
        lease = await self.lease(request, served, options)
        try:
            style, constraint = check(lease.engine)
        except ApiError:
            lease.release()
            raise
        reply, first = await self.start(lease, lambda engine: asked.stream(engine, constraint),
                                        param, keep_alive)
        return Shown(reply, first, style, asked.options.tools), lease

    async def start(self, lease: Lease,
                    start: Callable[[LocalEngine], Generator[str, None, None]
                                    | Generator[Part, None, None]],
                    param: str, keep_alive: KeepAlive = ...) -> tuple[Reply, Piece | None]:
        """Start a reply and wait for its first piece, so faults in the prompt are a 400:
        `context_length_exceeded` (OpenAI's code, which clients look for) or `invalid_prompt`.

        The lease is released when the worker is done with the engine, not when the client has
        read the reply: a slow reader holds its connection, never the model."""
        reply = Reply(lease.engine, lambda: start(lease.engine), self.stopping)
        lease.release_after(reply.finished, keep_alive)
        try:
            first = await reply.next()
        except ContextOverflowError as exc:
            raise ApiError(400, exc.message, code="context_length_exceeded",
                           param=param) from None
        except LocalchatError as exc:
            raise ApiError(400, str(exc), code="invalid_prompt", param=param) from None
        except BaseException:
            reply.stop()
            raise
        return reply, first


async def until_gone(request: Request, work: Awaitable[T],
                     on_late_result: Callable[[T], Any] | None = None) -> T:
    """`work`'s result, or ClientGone when the client closes its connection first (then `work`
    is cancelled, and a result it still produced goes to `on_late_result`)."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(disconnected(request))
    answered = False
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            answered = True
            return task.result()
        raise ClientGone
    finally:
        gone.cancel()
        if not answered and on_late_result is not None:
            if task.done():
                _late(task, on_late_result)
            else:
                task.add_done_callback(lambda t: _late(t, on_late_result))
        task.cancel()


def _late(task: asyncio.Future[T], handle: Callable[[T], Any]) -> None:
    if not task.cancelled() and task.exception() is None:
        handle(task.result())


async def disconnected(request: Request) -> None:
    """Returns when the client has closed its connection (the body already read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def gone_note(stats: Any, stopping: bool) -> str:
    """The log note of a reply that was cut short."""
    why = "server stopping" if stopping else "client went away"
    return f"{why}, generation stopped · {reply_note(stats)}" if stats else why


def reply_note(stats: Any) -> str:
    """The log note of a reply: tokens in and out, and how it ended."""
    if stats is None:
        return ""
    return (f"prompt {stats.prompt_tokens} tok ({stats.cached_tokens} cached) · reply "
            f"{stats.completion_tokens} tok · {stats.finish_reason}")


class Shown:
    """A reply's pieces as a client sees them: with tools, text that may begin a call is held
    back until the reply ends and `calls` holds what it called; logprobs of held text travel
    with the next piece shown."""

    def __init__(self, reply: Reply, first: Piece | None, style: str | None,
                 tools: Sequence[Mapping[str, Any]]) -> None:
        self.reply = reply
        self._first = first
        names = frozenset(tool["function"]["name"] for tool in tools)
        self._filter = CallFilter(style, names) if style and tools else None
        self.calls: list[ToolCall] = []

    async def __aiter__(self) -> AsyncIterator[Piece]:
        held: list[Any] = []
        piece = self._first
        while piece is not None:
            if piece.kind != ANSWER:  # thinking: never a call
                yield piece
                piece = await self.reply.next()
                continue
            text = self._filter.feed(piece.text) if self._filter else piece.text
            held += piece.logprobs
            if text:
                yield Piece(text, tuple(held))
                held = []
            piece = await self.reply.next()
        if self._filter is not None:
            rest, self.calls = self._filter.finish()
            if rest or held:
                yield Piece(rest, tuple(held))


@dataclass
class Whole:
    """A whole reply: the answer, the thinking apart, the logprobs and the stats."""

    text: str
    reasoning: str
    logprobs: list[Any]
    stats: Any


async def whole(shown: Shown) -> tuple[str, str, list[Any]]:
    """A reply's answer, thinking and logprobs, all of it; an engine failure mid-reply is a
    500."""
    texts: dict[str, list[str]] = {ANSWER: [], REASONING: []}
    logprobs: list[Any] = []
    try:
        async for piece in shown:
            texts.setdefault(piece.kind, []).append(piece.text)
            logprobs.extend(piece.logprobs)
    except ApiError:
        raise
    except LocalchatError as exc:
        raise ApiError(500, str(exc), kind="server_error") from None
    return "".join(texts[ANSWER]), "".join(texts[REASONING]), logprobs


async def whole_or_gone(request: Request, serving: Serving, shown: Shown) -> Whole:
    """`whole`, stopped when the client leaves (ClientGone; the log says what was cut)."""
    reply = shown.reply
    try:
        text, reasoning, logprobs = await until_gone(request, whole(shown))
    except ClientGone:
        stats = await reply.close()
        note(request, gone_note(stats, serving.stopping.is_set()))
        raise
    except BaseException:
        await reply.close()
        raise
    stats = reply.stats
    if stats is None or stats.finish_reason == "interrupted":  # the server is stopping
        raise ApiError(503, "the server is stopping", kind="server_error")
    note(request, reply_note(stats))
    return Whole(text, reasoning, logprobs, stats)
