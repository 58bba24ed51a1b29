"""The loaded models of a server: load on first use, queue the requests, unload the least used.

Each model file has a slot: its engine (when loaded), a lock that lets one request at a time use
it, and a count of the requests holding or waiting for it. A request past the bounded queue is
refused at once (`Busy`: 429 with Retry-After) rather than waiting for minutes. Loading goes
through the one loader; before it, the least recently used idle models are unloaded while
`max_loaded` models are loaded or the new one would not fit in the memory left. A model in use
is never unloaded: a load that needs its room waits until it is idle. Ollama's `keep_alive`
sets how long a model stays loaded after its last request.

The engine is not thread-safe and llama.cpp frees memory that a running reply still reads, so
a lease is released only when the worker thread that used it has finished (`release_after`).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import EllipsisType
from typing import Any

from localchat.engine.local import LocalEngine
from localchat.engine.options import EngineOptions
from localchat.serve.models import ServedModel, header_of

FOREVER = None  # keep_alive: stay loaded until evicted
# A keep_alive in seconds, FOREVER, or `...`: the request did not say (the model keeps its own).
KeepAlive = float | None | EllipsisType


class Busy(Exception):
    """The model's queue is full; `retry_after` is a fair guess in whole seconds."""

    def __init__(self, model: str, waiting: int, retry_after: int) -> None:
        super().__init__(f"{model} has {waiting} requests queued, the most this server takes; "
                         f"retry in {retry_after} s")
        self.retry_after = retry_after


@dataclass
class _Slot:
    served: ServedModel
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    engine: LocalEngine | None = None
    options: EngineOptions | None = None  # what the engine was loaded with
    users: int = 0  # requests using or waiting for it
    last_used: float = 0.0
    expires_at: float | None = None  # keep_alive's deadline once idle; None: no deadline
    keep_alive: float | None = FOREVER
    loaded_at: float = 0.0
    size_bytes: int = 0  # the memory it was estimated to take
    reply_s: float = 1.0  # a running average of how long one request holds it


@dataclass
class Lease:
    """One request's hold on a loaded model; `load_s` is what loading it cost this request."""

    registry: ModelRegistry
    slot: _Slot
    engine: LocalEngine
    load_s: float
    started: float = field(default_factory=time.monotonic)
    _released: bool = False

    def release(self, keep_alive: KeepAlive = ...) -> None:
        """Give the model back (once); `keep_alive` (seconds, None for ever) if the request set
        one."""
        if self._released:
            return
        self._released = True
        self.registry._release(self, keep_alive)

    def release_after(self, done: asyncio.Future[Any] | None,
                      keep_alive: KeepAlive = ...) -> None:
        """Release when the worker thread using the engine has finished (now if none)."""
        if done is None or done.done():
            self.release(keep_alive)
        else:
            done.add_done_callback(lambda _: self.release(keep_alive))


class ModelRegistry:
    """Loaded engines by model file, at most `max_loaded` of them, each with a bounded queue."""

    def __init__(self, load: Callable[[EngineOptions], LocalEngine], *, max_loaded: int,
                 queue_size: int, log: Callable[[str], None],
                 memory: Callable[[], int | None] | None = None) -> None:
        from localchat.engine.runtime import available_memory_bytes

        self._load = load
        self.max_loaded = max_loaded
        self.queue_size = queue_size
        self._log = log
        self._memory = memory or available_memory_bytes
        self._slots: dict[Path, _Slot] = {}
        self._room: asyncio.Condition | None = None  # made on the server's event loop
        self._waiting_loads = 0  # loads waiting for a busy model to go idle
        self._tasks: set[asyncio.Task[None]] = set()  # the loop keeps only weak references

    # ---- what is loaded ---------------------------------------------------------------------

    def loaded(self) -> list[tuple[ServedModel, LocalEngine, float | None, int]]:
        """(model, engine, expiry as Unix time or None, size estimate) for each loaded model."""
        now_wall, now = time.time(), time.monotonic()
        return [(slot.served, slot.engine, None if slot.expires_at is None or slot.users
                 else now_wall + slot.expires_at - now, slot.size_bytes)
                for slot in self._slots.values() if slot.engine is not None]

    def preload(self, served: ServedModel) -> LocalEngine:
        """Load a model before serving starts (`serve MODEL`); counts against `max_loaded`."""
        slot = self._slot(served)
        if slot.engine is None:
            self._install(slot, served.options, self._load(served.options))
        assert slot.engine is not None
        return slot.engine

    # ---- using a model ------------------------------------------------------------------------

    async def acquire(self, served: ServedModel, options: EngineOptions | None = None) -> Lease:
        """Wait for the model's turn, loading it first if needed; `Busy` when the queue is full.

        `options` replaces the model's load options (Ollama's `num_ctx`...): a loaded engine
        with others is loaded again with these, as Ollama does.
        """
        slot = self._slot(served)
        options = options or served.options
        while self._waiting_loads and slot.engine is not None and self._room is not None:
            # A load waits for a loaded model to go idle: queue behind it rather than keep that
            # model busy for ever (requests for it would otherwise starve the load).
            async with self._room:
                await self._room.wait()
        if slot.users > self.queue_size:  # one running, queue_size waiting
            retry = max(1, math.ceil(slot.reply_s * slot.users))
            raise Busy(served.id, slot.users - 1, retry)
        slot.users += 1
        try:
            await slot.lock.acquire()
        except BaseException:
            slot.users -= 1
            raise
        try:
            load_s = 0.0
            if slot.engine is None or slot.options != options:
                started = time.perf_counter()
                await self._load_into(slot, options)
                load_s = time.perf_counter() - started
        except BaseException:
            slot.users -= 1
            slot.lock.release()
            self._wake()
            raise
        assert slot.engine is not None
        return Lease(self, slot, slot.engine, load_s)

    def _release(self, lease: Lease, keep_alive: KeepAlive) -> None:
        slot = lease.slot
        held = time.monotonic() - lease.started
        slot.reply_s = 0.8 * slot.reply_s + 0.2 * held
        if not isinstance(keep_alive, EllipsisType):
            slot.keep_alive = keep_alive
        slot.last_used = time.monotonic()
        slot.expires_at = None if slot.keep_alive is None else slot.last_used + slot.keep_alive
        slot.users -= 1
        slot.lock.release()
        self._wake()

    async def unload(self, served: ServedModel) -> bool:
        """Unload a model now (Ollama's keep_alive 0), after the requests it has; False when it
        was not loaded."""
        slot = self._slots.get(served.path)
        if slot is None or slot.engine is None:
            return False
        async with slot.lock:
            await self._close(slot, "unloaded on request")
        self._wake()
        return True

    async def reap(self) -> None:
        """Unload the idle models whose keep_alive has run out; the server calls this often."""
        now = time.monotonic()
        for slot in list(self._slots.values()):
            if (slot.engine is not None and not slot.users and slot.expires_at is not None
                    and slot.expires_at <= now and not slot.lock.locked()):
                async with slot.lock:
                    if slot.engine is not None and not slot.users:
                        await self._close(slot, "keep_alive ran out")
                self._wake()

    def close_all(self) -> None:
        """Free every model at shutdown, once the event loop has stopped and the worker threads
        have finished (`generation.join_workers`)."""
        for slot in self._slots.values():
            if slot.engine is not None:
                slot.engine.close()
                slot.engine = None

    # ---- loading and unloading -----------------------------------------------------------------

    def _slot(self, served: ServedModel) -> _Slot:
        slot = self._slots.get(served.path)
        if slot is None:
            slot = self._slots[served.path] = _Slot(served)
        return slot

    async def _load_into(self, slot: _Slot, options: EngineOptions) -> None:
        """Load `slot` (its lock held) with `options`, unloading others first for room."""
        if slot.engine is not None:
            await self._close(slot, "reloaded with other load options")
        if self._room is None:
            self._room = asyncio.Condition()
        async with self._room:
            need = estimate_bytes(options)
            while True:
                loaded = [s for s in self._slots.values() if s.engine is not None]
                available = self._memory()
                over_count = len(loaded) >= self.max_loaded
                over_memory = available is not None and need > available and bool(loaded)
                if not over_count and not over_memory:
                    break
                idle = sorted((s for s in loaded if not s.users and not s.lock.locked()),
                              key=lambda s: s.last_used)
                if idle:
                    victim = idle[0]
                    async with victim.lock:
                        why = (f"--max-loaded {self.max_loaded}" if over_count else
                               f"memory: {slot.served.id} needs ~{need >> 20} MiB, "
                               f"{(available or 0) >> 20} MiB free")
                        await self._close(victim, f"to make room ({why})")
                    continue
                if not over_count:
                    break  # short of memory with nothing idle to unload: try, llama.cpp will say
                self._waiting_loads += 1  # a loaded model is busy: wait until one is idle
                try:
                    await self._room.wait()
                finally:
                    self._waiting_loads -= 1
                    self._room.notify_all()  # requests queued behind this load may go on
            engine = await asyncio.to_thread(self._load, options)
            self._install(slot, options, engine)

    def _install(self, slot: _Slot, options: EngineOptions, engine: LocalEngine) -> None:
        slot.engine, slot.options = engine, options
        slot.loaded_at = slot.last_used = time.monotonic()
        slot.size_bytes = estimate_bytes(options, engine.n_ctx)
        self._log(f"loaded {slot.served.id} in {engine.info.load_s:.2f} s "
                  f"(context {engine.n_ctx} tokens)")

    async def _close(self, slot: _Slot, why: str) -> None:
        engine, slot.engine, slot.options = slot.engine, None, None
        if engine is not None:
            await asyncio.to_thread(engine.close)
            self._log(f"unloaded {slot.served.id} ({why})")

    def _wake(self) -> None:
        """Tell a load waiting for room that a model went idle."""
        room = self._room
        if room is None:
            return

        async def notify() -> None:
            async with room:
                room.notify_all()

        with contextlib.suppress(RuntimeError):  # no event loop (a preload): nobody waits
            task = asyncio.get_running_loop().create_task(notify())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)


def estimate_bytes(options: EngineOptions, n_ctx: int | None = None) -> int:
    """Memory a model takes loaded: its weights (the file) and an f16 KV cache of its window."""
    try:
        stat = options.model_path.stat()
    except OSError:
        return 0
    info = header_of(options.model_path, stat.st_mtime)
    if info is None:
        return stat.st_size
    window = n_ctx or options.n_ctx or min(info.context_length or 4096, 4096)
    layers = info.block_count or 0
    heads = info.head_count or 1
    kv_heads = info.head_count_kv or heads
    head_size = (info.embedding_length or 0) // heads
    per_token = layers * kv_heads * ((info.key_length or head_size)
                                     + (info.value_length or head_size)) * 2
    return stat.st_size + window * per_token
