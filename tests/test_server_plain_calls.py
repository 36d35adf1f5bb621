"""A plain call through the socket server (no session): it takes its pool's
route with no task, its request being the call's waiter. Each way the pool
can wake that waiter is answered, and a call leaves nothing behind.
"""

from __future__ import annotations

import gc
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

import snakepool
from snakepool import CallTimeout, PoolClosed, UnknownCommand
from snakepool.pool._calls import PendingCall
from snakepool.server import SocketServer
from snakepool.server._inflight import Request
from waiting import fill_worker, wait_until

pytestmark = pytest.mark.anyio

ADAPTER = "sp_adapters:Basic"


@pytest.fixture
def workdir() -> Iterator[Path]:
    # Unix socket paths must be short (108 bytes): pytest's tmp_path can be too long.
    directory = Path(tempfile.mkdtemp(prefix="sp-"))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


async def test_each_way_a_plain_call_ends_is_answered(workdir: Path) -> None:
    """An answer, a failure, its deadline: each is the caller's answer, and
    the connection and the pool carry on."""
    timed_out = workdir / "timed-out"
    async with snakepool.Pool(ADAPTER, size=1, name="general") as pool:
        server = SocketServer({"general": pool}, socket_path=workdir / "s.sock")
        async with anyio.create_task_group() as tg:
            await tg.start(server.serve)
            async with snakepool.connect(workdir / "s.sock") as client:
                general = client["general"]
                assert await general.call("add", {"a": 2, "b": 3}) == 5
                with pytest.raises(UnknownCommand):
                    await general.call("nope")
                with pytest.raises(CallTimeout, match=r"did not finish within 0\.3s"):
                    await general.call("hold_sync", {"release": str(timed_out)}, timeout=0.3)
                timed_out.touch()  # (it did not see its cancel: let it finish)

                assert await general.call("add", {"a": 1, "b": 1}) == 2
            tg.cancel_scope.cancel()


async def test_a_plain_call_queued_when_its_pool_closes_is_answered_pool_closed(
    workdir: Path,
) -> None:
    release = workdir / "release"
    pool = snakepool.Pool(ADAPTER, size=1, name="general", drain_grace=30)
    async with pool:
        server = SocketServer({"general": pool}, socket_path=workdir / "s.sock")
        async with anyio.create_task_group() as tg:
            await tg.start(server.serve)
            async with snakepool.connect(workdir / "s.sock") as client:
                general = client["general"]
                outcome: dict[str, object] = {}

                async def call(name: str, command: str, args: dict[str, object]) -> None:
                    try:
                        outcome[name] = await general.call(command, args)
                    except PoolClosed as exc:
                        outcome[name] = exc

                async with anyio.create_task_group() as busy:
                    await fill_worker(pool, busy, release)
                    busy.start_soon(call, "queued", "echo", {"value": 1})
                    await wait_until(lambda: pool.statistics().queued == 1)
                    busy.start_soon(pool.aclose)
                    await wait_until(lambda: "queued" in outcome)
                    assert isinstance(outcome["queued"], PoolClosed)
                    release.touch()  # (the calls the worker took finish within the drain)
                assert pool.statistics().closed
            tg.cancel_scope.cancel()


async def test_plain_calls_leave_nothing_for_the_cyclic_gc(workdir: Path) -> None:
    """A request is its call's waiter: once answered, neither keeps the other
    (a cycle per call is work for the cyclic GC on every call; it was 13% of
    the server's CPU)."""
    async with snakepool.Pool(ADAPTER, size=2, name="general") as pool:
        server = SocketServer({"general": pool}, socket_path=workdir / "s.sock")
        async with anyio.create_task_group() as tg:
            await tg.start(server.serve)
            async with snakepool.connect(workdir / "s.sock") as client:
                general = client["general"]

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
            tg.cancel_scope.cancel()
