"""The pool on a uvloop event loop (its pipe transports are not asyncio's classes)."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

import snakepool
from waiting import wait_until

uvloop = pytest.importorskip("uvloop")

ADAPTER = "sp_adapters:Basic"


def run_on_uvloop(main: object) -> None:
    assert callable(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())


def test_calls_streams_timeouts_and_crashes_on_uvloop() -> None:
    async def main() -> None:
        assert "uvloop" in type(asyncio.get_running_loop()).__module__
        async with snakepool.Pool(ADAPTER, size=2, worker_concurrency=2) as pool:
            assert await pool.call("add", {"a": 1, "b": 2}) == 3
            blob = await pool.call("blob", {"size": 2 * 2**20})  # a large frame both ways
            assert len(blob) == 2 * 2**20
            assert [i async for i in pool.stream("count", {"n": 5})] == list(range(5))
            results = await asyncio.gather(*(pool.call("add", {"a": i, "b": i}) for i in range(50)))
            assert results == [2 * i for i in range(50)]
            with pytest.raises(snakepool.CallTimeout):
                await pool.call("hang", timeout=0.2)
            victim = pool.statistics().workers[0].pid
            assert victim is not None
            os.kill(victim, signal.SIGKILL)
            await wait_until(
                lambda: (
                    pool.statistics().ready_workers == 2
                    and victim not in {w.pid for w in pool.statistics().workers}
                )
            )
            assert await pool.call("add", {"a": 2, "b": 2}) == 4

    run_on_uvloop(main)
