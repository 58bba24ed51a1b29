"""One reply generated on a worker thread and read on the server's event loop as it comes.

llama.cpp's decode loop blocks (it releases the GIL while it computes), so each reply runs on a
thread of its own and hands its pieces to the event loop. The loop side can stop it at any time
(`cancel`: a client that left, a server shutting down): the thread notices before its next
token, closes the engine's generator (which records the stats, finish reason `interrupted`) and
ends. `finished` resolves only when the thread has stopped touching the engine, so the model's
lease is released then and never earlier.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import weakref
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any

from localchat.engine.local import LocalEngine
from localchat.engine.protocol import GenerationStats, TokenLogprob
from localchat.engine.reasoning import ANSWER, Part

_workers: weakref.WeakSet[threading.Thread] = weakref.WeakSet()


@dataclass(frozen=True)
class Piece:
    """A piece of the reply's text, thinking or answer, and the logprobs of the tokens that
    made it (if asked)."""

    text: str
    logprobs: tuple[TokenLogprob, ...] = field(default=())
    kind: str = ANSWER  # or REASONING: a thinking model's thinking


class Reply:
    """A reply in progress: `await next()` gives pieces, then None; `stats` is set at the end."""

    def __init__(self, engine: LocalEngine,
                 start: Callable[[], Generator[str, None, None] | Generator[Part, None, None]],
                 stopping: threading.Event) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._engine = engine
        self._start = start
        self._stopping = stopping
        self.cancel = threading.Event()
        self.finished: asyncio.Future[None] = self._loop.create_future()
        self.stats: GenerationStats | None = None
        thread = threading.Thread(target=self._work, name="localchat-reply", daemon=True)
        _workers.add(thread)
        thread.start()

    async def next(self) -> Piece | None:
        """The next piece, or None at the end; the engine's errors are raised here."""
        kind, value = await self._queue.get()
        if isinstance(value, Piece):
            return value
        if kind == "error":
            raise value
        self.stats = value
        return None

    def stop(self) -> None:
        """Ask the worker to stop before its next token."""
        self.cancel.set()

    async def close(self) -> GenerationStats | None:
        """Stop the reply and wait for the worker; its stats (finish reason `interrupted` when
        it was cut short), or None when it failed."""
        self.stop()
        await asyncio.shield(self.finished)
        while not self._queue.empty():
            kind, value = self._queue.get_nowait()
            if kind == "end":
                self.stats = value
        return self.stats

    def _work(self) -> None:
        outcome: tuple[str, Any] = ("end", None)
        try:
            pieces = self._start()
            try:
                taken = 0
                for item in pieces:
                    fresh = tuple(self._engine.token_logprobs[taken:])
                    taken += len(fresh)
                    text, kind = (item, ANSWER) if isinstance(item, str) else (item.text,
                                                                              item.kind)
                    self._put(("piece", Piece(text, fresh, kind)))
                    if self.cancel.is_set() or self._stopping.is_set():
                        break
            finally:
                pieces.close()  # stops the decode loop and records the stats
            outcome = ("end", self._engine.last_stats)
        except BaseException as exc:  # handed to the event loop, which words the reply
            outcome = ("error", exc)
        finally:
            self._put(outcome)
            self._call(self._finish)

    def _finish(self) -> None:
        if not self.finished.done():
            self.finished.set_result(None)

    def _put(self, item: tuple[str, Any]) -> None:
        self._call(self._queue.put_nowait, item)

    def _call(self, function: Callable[..., Any], *args: Any) -> None:
        # RuntimeError: the event loop is gone (the server stopped): nobody is reading
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(function, *args)


def join_workers(timeout: float) -> bool:
    """Wait for every reply thread to finish (at shutdown); False if some did not in time."""
    import time

    deadline = time.monotonic() + timeout
    for thread in list(_workers):
        thread.join(max(0.0, deadline - time.monotonic()))
    return not any(thread.is_alive() for thread in list(_workers))
