"""Waiting in tests: poll a condition with a deadline (never sleep to green),
and fill a worker until calls have to wait in the pool's queue."""

from __future__ import annotations

import anyio
import anyio.abc

import snakepool


async def wait_until(condition: object, timeout: float = 15.0) -> None:
    """Return once ``condition()`` is true; fail after ``timeout`` seconds."""
    assert callable(condition)
    with anyio.fail_after(timeout):
        while not condition():
            await anyio.sleep(0.02)


def slots(pool: snakepool.Pool, slot: int = 0) -> int:
    """Calls worker ``slot`` takes before more wait in the pool's queue: those it
    runs, and those it holds (sent ahead, see ``Pool.send_ahead``). How many it
    holds adapts as answers come in: read it while the worker is busy."""
    worker = pool._workers[slot]
    return worker.concurrency + worker.ahead


async def fill_worker(pool: snakepool.Pool, tg: anyio.abc.TaskGroup, seconds: float) -> int:
    """Keep worker 0 busy for ``seconds`` (a ``nap``), with every slot it holds
    taken by quick naps waiting behind it: the next call waits in the pool's
    queue. Returns how many calls the worker took."""
    inflight = lambda: pool.statistics().workers[0].inflight  # noqa: E731
    tg.start_soon(pool.call, "nap", {"seconds": seconds})
    await wait_until(lambda: inflight() == 1)
    held = slots(pool)  # (no answer comes while the worker naps: it stays put)
    for _ in range(held - 1):  # they wait in the worker
        tg.start_soon(pool.call, "nap", {"seconds": 0.01})
    await wait_until(lambda: inflight() == held)
    return held
