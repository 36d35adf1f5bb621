"""The contenders: snakepool, the stdlib process pools and loky (the raw loop is
in ``_raw``), each behind the same ``Peer`` interface."""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib
import importlib.util
import multiprocessing
import multiprocessing.pool
from collections.abc import Callable
from typing import Any

from ..pool import Pool
from ._common import Peer
from ._raw import RawLoopPeer


def _echo(value: Any) -> Any:
    """The no-op every peer runs (module level, so every start method can pickle it)."""
    return value


class SnakepoolPeer(Peer):
    def __init__(self, workers: int, worker_concurrency: int = 1) -> None:
        self.pool = Pool(
            "generic",
            name="bench",
            size=workers,
            worker_concurrency=worker_concurrency,
            startup_timeout=300.0,
            call_timeout=300.0,
            queue_size=100_000,
        )
        self.how = (
            f"Pool('generic', size={workers}, worker_concurrency={worker_concurrency}); "
            "await pool.call('echo', {'value': x})"
        )

    async def start(self) -> None:
        await self.pool.start()

    async def call(self, value: Any) -> Any:
        return await self.pool.call("echo", {"value": value})

    async def aclose(self) -> None:
        await self.pool.aclose()


class _ExecutorPeer(Peer):
    """ProcessPoolExecutor or loky: ``asyncio.wrap_future(executor.submit(...))``."""

    def __init__(self, make: Callable[[], concurrent.futures.Executor], how: str) -> None:
        self._make = make
        self.executor: concurrent.futures.Executor | None = None
        self.how = how

    async def start(self) -> None:
        self.executor = self._make()

    async def call(self, value: Any) -> Any:
        assert self.executor is not None
        return await asyncio.wrap_future(self.executor.submit(_echo, value))

    async def aclose(self) -> None:
        executor, self.executor = self.executor, None
        if executor is None:
            return
        shutdown: Any = executor.shutdown
        if type(executor).__module__.startswith("loky"):
            await asyncio.to_thread(shutdown, wait=True, kill_workers=True)
            return
        await asyncio.to_thread(shutdown, wait=True, cancel_futures=True)


class _MultiprocessingPeer(Peer):
    """``multiprocessing.Pool.apply_async`` resolving an asyncio future from its callback."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.pool: multiprocessing.pool.Pool | None = None
        self.how = (
            f"multiprocessing.Pool({workers}).apply_async(echo, (x,), callback=...) -> "
            "loop.call_soon_threadsafe(future.set_result, ...)"
        )

    async def start(self) -> None:
        self.pool = multiprocessing.Pool(self.workers)

    async def call(self, value: Any) -> Any:
        assert self.pool is not None
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()

        def resolve(result: Any) -> None:
            if not future.done():
                future.set_result(result)

        def fail(exc: BaseException) -> None:
            if not future.done():
                future.set_exception(exc)

        self.pool.apply_async(
            _echo,
            (value,),
            callback=lambda r: loop.call_soon_threadsafe(resolve, r),
            error_callback=lambda e: loop.call_soon_threadsafe(fail, e),
        )
        return await future

    async def aclose(self) -> None:
        pool, self.pool = self.pool, None
        if pool is None:
            return

        def stop() -> None:
            pool.close()
            pool.join()

        try:
            await asyncio.wait_for(asyncio.to_thread(stop), 30.0)
        except (TimeoutError, Exception):
            pool.terminate()
            pool.join()


def make_peer(name: str, workers: int) -> Peer | str:
    """The peer called ``name``, or why it cannot run."""
    if name == "snakepool":
        return SnakepoolPeer(workers, worker_concurrency=1)
    if name == "snakepool_c8":
        return SnakepoolPeer(workers, worker_concurrency=8)
    if name == "process_pool_executor":
        return _ExecutorPeer(
            lambda: concurrent.futures.ProcessPoolExecutor(max_workers=workers),
            f"ProcessPoolExecutor(max_workers={workers}); "
            "await asyncio.wrap_future(executor.submit(echo, x)) (= run_in_executor)",
        )
    if name == "multiprocessing_pool":
        return _MultiprocessingPeer(workers)
    if name == "loky":
        if importlib.util.find_spec("loky") is None:
            return "loky is not installed (pip install loky)"
        loky: Any = importlib.import_module("loky")

        def make() -> concurrent.futures.Executor:
            executor: concurrent.futures.Executor = loky.get_reusable_executor(
                max_workers=workers, timeout=600
            )
            return executor

        return _ExecutorPeer(
            make,
            f"loky.get_reusable_executor(max_workers={workers}); "
            "await asyncio.wrap_future(executor.submit(echo, x))",
        )
    if name == "raw_loop":
        return RawLoopPeer(workers)
    raise ValueError(f"unknown peer {name!r}")
