"""The server's loaded models, with stand-in engines: LRU unloading by count and by memory,
the bounded queue, loads that wait for a busy model, keep_alive, and reloads with new options."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from types import SimpleNamespace

import pytest

from localchat.engine.options import EngineOptions
from localchat.engine.protocol import Sampling
from localchat.serve.models import ServedModel
from localchat.serve.registry import Busy, ModelRegistry


class FakeEngine:
    def __init__(self, options: EngineOptions) -> None:
        self.options = options
        self.closed = False
        self.n_ctx = options.n_ctx or 4096
        self.info = SimpleNamespace(load_s=0.0, gpu_layers=0)

    def close(self) -> None:
        self.closed = True


def served(tmp_path: Path, name: str) -> ServedModel:
    path = tmp_path / f"{name}.gguf"
    path.write_bytes(b"x" * 1000)
    return ServedModel(id=name, path=path, options=EngineOptions(model_path=path),
                       sampling=Sampling())


def registry(max_loaded: int = 1, queue_size: int = 4, memory: int | None = None
             ) -> tuple[ModelRegistry, list[str], list[FakeEngine]]:
    lines: list[str] = []
    engines: list[FakeEngine] = []

    def load(options: EngineOptions) -> FakeEngine:
        engines.append(FakeEngine(options))
        return engines[-1]

    return (ModelRegistry(load, max_loaded=max_loaded, queue_size=queue_size, log=lines.append,
                          memory=lambda: memory), lines, engines)


def loaded_ids(models: ModelRegistry) -> list[str]:
    return sorted(model.id for model, *_ in models.loaded())


def test_the_least_recently_used_model_is_unloaded_for_the_next(tmp_path):
    a, b, c = (served(tmp_path, name) for name in "abc")

    async def scenario() -> None:
        models, lines, engines = registry(max_loaded=2)
        for model in (a, b, a, c):  # b is now the least recently used
            lease = await models.acquire(model)
            assert not lease.engine.closed
            lease.release()
        assert loaded_ids(models) == ["a", "c"]
        assert [engine.options.model_path.stem for engine in engines if engine.closed] == ["b"]
        assert any("unloaded b (to make room (--max-loaded 2))" in line for line in lines)

    asyncio.run(scenario())


def test_a_full_queue_is_busy_with_a_retry_time(tmp_path):
    a = served(tmp_path, "a")

    async def scenario() -> None:
        models, _, _ = registry(queue_size=1)
        first = await models.acquire(a)
        waiting = asyncio.ensure_future(models.acquire(a))
        await asyncio.sleep(0.01)
        with pytest.raises(Busy) as caught:
            await models.acquire(a)
        assert caught.value.retry_after >= 1
        first.release()
        second = await waiting
        second.release()
        third = await models.acquire(a)  # the queue drained: taken again
        third.release()

    asyncio.run(scenario())


def test_a_load_waits_for_a_busy_model_then_unloads_it(tmp_path):
    a, b = served(tmp_path, "a"), served(tmp_path, "b")

    async def scenario() -> None:
        models, _, engines = registry(max_loaded=1)
        holding = await models.acquire(a)
        other = asyncio.ensure_future(models.acquire(b))
        await asyncio.sleep(0.05)
        assert not other.done() and not holding.engine.closed  # never freed under a reply
        late = asyncio.ensure_future(models.acquire(a))  # queues behind the load, not before
        await asyncio.sleep(0.05)
        holding.release()
        lease_b = await other
        assert holding.engine.closed and loaded_ids(models) == ["b"]
        lease_b.release()
        lease_a = await late
        assert loaded_ids(models) == ["a"] and len(engines) == 3
        lease_a.release()

    asyncio.run(scenario())


def test_memory_short_unloads_an_idle_model_below_the_count(tmp_path):
    a, b = served(tmp_path, "a"), served(tmp_path, "b")

    async def scenario() -> None:
        models, lines, _ = registry(max_loaded=4, memory=10)  # 10 bytes free: nothing fits
        (await models.acquire(a)).release()
        (await models.acquire(b)).release()
        assert loaded_ids(models) == ["b"]
        assert any("memory" in line and "unloaded a" in line for line in lines)

    asyncio.run(scenario())


def test_keep_alive_zero_unloads_after_the_request_and_reap_honours_deadlines(tmp_path):
    a, b = served(tmp_path, "a"), served(tmp_path, "b")

    async def scenario() -> None:
        models, _, _ = registry(max_loaded=2)
        (await models.acquire(a)).release(keep_alive=0)
        (await models.acquire(b)).release(keep_alive=3600)
        await models.reap()
        assert loaded_ids(models) == ["b"]
        _, _, expires, _ = models.loaded()[0]
        assert expires is not None
        assert await models.unload(b) and loaded_ids(models) == []

    asyncio.run(scenario())


def test_other_load_options_reload_the_model(tmp_path):
    a = served(tmp_path, "a")

    async def scenario() -> None:
        models, _, engines = registry()
        (await models.acquire(a)).release()
        lease = await models.acquire(a, dataclasses.replace(a.options, n_ctx=512))
        assert lease.engine.n_ctx == 512 and engines[0].closed and lease.load_s >= 0
        lease.release()
        same = await models.acquire(a, dataclasses.replace(a.options, n_ctx=512))
        assert same.engine is lease.engine  # the same options: no reload
        same.release()

    asyncio.run(scenario())


def test_a_cancelled_wait_leaves_the_queue_as_it_was(tmp_path):
    a = served(tmp_path, "a")

    async def scenario() -> None:
        models, _, _ = registry(queue_size=1)
        first = await models.acquire(a)
        waiting = asyncio.ensure_future(models.acquire(a))
        await asyncio.sleep(0.01)
        waiting.cancel()
        await asyncio.sleep(0.01)
        again = asyncio.ensure_future(models.acquire(a))  # room again in the queue
        await asyncio.sleep(0.01)
        first.release()
        (await again).release()

    asyncio.run(scenario())


def test_release_after_waits_for_the_worker(tmp_path):
    a = served(tmp_path, "a")

    async def scenario() -> None:
        models, _, _ = registry()
        lease = await models.acquire(a)
        done = asyncio.get_running_loop().create_future()
        lease.release_after(done)
        nxt = asyncio.ensure_future(models.acquire(a))
        await asyncio.sleep(0.02)
        assert not nxt.done()  # the worker still has the engine
        done.set_result(None)
        (await nxt).release()

    asyncio.run(scenario())
