"""A plain call through the socket server (no session): it takes its pool's
route with no task, its request being the call's waiter. Each way the pool
can wake that waiter is answered, and a call leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

import snakepool
from snakepool import CallTimeout, PoolClosed, UnknownCommand
from snakepool.pool._calls import PendingCall
from snakepool.server import RemotePool, SocketServer
from snakepool.server._inflight import Request
from waiting import fill_worker, wait_until

pytestmark = pytest.mark.anyio

ADAPTER = "sp_adapters:Basic"


@contextlib.asynccontextmanager
async def served(pool: snakepool.Pool, workdir: Path) -> AsyncIterator[RemotePool]:
    """``pool`` behind a real socket server, through the Python client."""
    server = SocketServer({pool.name: pool}, socket_path=workdir / "s.sock")
    async with anyio.create_task_group() as tg:
        await tg.start(server.serve)
        async with snakepool.connect(workdir / "s.sock") as client:
            yield client[pool.name]
        tg.cancel_scope.cancel()


async def test_each_way_a_plain_call_ends_is_answered(workdir: Path) -> None:
    """An answer, a failure, its deadline: each is the caller's answer, and
    the connection and the pool carry on."""
    timed_out = workdir / "timed-out"
    async with (
        snakepool.Pool(ADAPTER, size=1, name="general") as pool,
        served(pool, workdir) as general,
    ):
        assert await general.call("add", {"a": 2, "b": 3}) == 5
        with pytest.raises(UnknownCommand):
            await general.call("nope")
        with pytest.raises(CallTimeout, match=r"did not finish within 0\.3s"):
            await general.call("hold_sync", {"release": str(timed_out)}, timeout=0.3)
        timed_out.touch()  # (it did not see its cancel: let it finish)
        assert await general.call("add", {"a": 1, "b": 1}) == 2


async def test_a_plain_call_queued_when_its_pool_closes_is_answered_pool_closed(
    workdir: Path,
) -> None:
    release = workdir / "release"
    outcome: dict[str, object] = {}
    async with (
        snakepool.Pool(ADAPTER, size=1, name="general", drain_grace=30) as pool,
        served(pool, workdir) as general,
    ):

        async def queued() -> None:
            try:
                outcome["queued"] = await general.call("echo", {"value": 1})
            except PoolClosed as exc:
                outcome["queued"] = exc

        async with anyio.create_task_group() as busy:
            await fill_worker(pool, busy, release)
            busy.start_soon(queued)
            await wait_until(lambda: pool.statistics().queued == 1)
            busy.start_soon(pool.aclose)
            await wait_until(lambda: "queued" in outcome)
            assert isinstance(outcome["queued"], PoolClosed)
            release.touch()  # (the calls the worker took finish within the drain)
        assert pool.statistics().closed


async def test_plain_calls_leave_nothing_for_the_cyclic_gc(workdir: Path) -> None:
    """A request is its call's waiter: once answered, neither keeps the other
    (a cycle per call is work for the cyclic GC on every call; it was 13% of
    the server's CPU)."""
    async with (
        snakepool.Pool(ADAPTER, size=2, name="general") as pool,
        served(pool, workdir) as general,
    ):

        async def calls(n: int) -> None:
            for _ in range(n):
                assert await general.call("echo", {"value": 1}) == 1

        async with anyio.create_task_group() as warm:
            for _ in range(8):
                warm.start_soon(calls, 10)
        gc.collect()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            async with anyio.create_task_group() as callers:
                for _ in range(8):
                    callers.start_soon(calls, 50)
            gc.collect()
            left = [o for o in gc.garbage if isinstance(o, Request | PendingCall)]
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
        assert left == []
