"""The one call route on both event loops anyio runs on: asyncio (every other
test) and trio, here (calls, streams, casts, sessions, a timeout, a queue)."""

from __future__ import annotations

import anyio
import pytest

import snakepool

pytest.importorskip("trio")


async def _exercise() -> dict[str, object]:
    found: dict[str, object] = {}
    async with snakepool.Pool("generic", size=2, queue_size=1000) as pool:
        found["call"] = await pool.call("echo", {"value": 3})
        found["stream"] = [item async for item in pool.stream("count", {"n": 3})]
        async with pool.session() as session:
            await session.variables.define("t", "float", 0.5)
            found["session"] = await session.call("echo", {"value": "s"})
        with pytest.raises(snakepool.CallTimeout) as timed_out:
            await pool.call("sleep", {"seconds": 5}, timeout=0.3)
        found["timeout"] = timed_out.value.kind
        await pool.cast("echo", {"value": 1})
        async with anyio.create_task_group() as tg:  # more callers than slots: some queue
            for i in range(200):
                tg.start_soon(pool.call, "echo", {"value": i})
        with anyio.fail_after(10):
            while pool.statistics().completed < 1 + 1 + 1 + 1 + 200:  # call, stream, session, cast
                await anyio.sleep(0.02)
        found["completed"] = pool.statistics().completed
    return found


def test_the_call_route_runs_on_trio() -> None:
    found = anyio.run(_exercise, backend="trio")
    assert found["call"] == 3
    assert found["stream"] == [0, 1, 2]
    assert found["session"] == "s"
    assert found["timeout"] == snakepool.CallTimeout.kind
    assert found["completed"] == 204
