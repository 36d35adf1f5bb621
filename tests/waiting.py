"""Waiting in tests: poll a condition with a deadline (never sleep to green),
the few facts tests wait for (a process gone, workers restarted or ready), and
filling a worker until calls have to wait in the pool's queue. The one place
tests poll from."""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import psutil

import snakepool


async def wait_until(condition: object, timeout: float = 15.0) -> None:
    """Return once ``condition()`` is true (awaited, if it returns an awaitable);
    fail after ``timeout`` seconds."""
    assert callable(condition)
    with anyio.fail_after(timeout):
        while True:
            met = condition()
            if inspect.isawaitable(met):
                met = await met
            if met:
                return
            await anyio.sleep(0.02)


def wait_for(
    condition: Callable[[], object], timeout: float = 10.0, interval: float = 0.02
) -> None:
    """:func:`wait_until` for synchronous tests."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {condition}")
        time.sleep(interval)


def gone(pid: int) -> bool:
    """The process has ended (a zombie waiting to be reaped counts as gone)."""
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


def restarts(pool: snakepool.Pool) -> int:
    """Worker restarts over the whole pool."""
    return sum(w.restarts for w in pool.statistics().workers)


def all_ready(pool: snakepool.Pool) -> bool:
    """Every worker has said hello."""
    stats = pool.statistics()
    return stats.ready_workers == stats.size


async def wait_for_count(count: Callable[[], int], expected: int, timeout: float = 15.0) -> None:
    """Wait until ``count()`` reaches ``expected``, then check it is exactly that.

    For counts that only grow while the test keeps a worker busy (calls sent,
    calls queued): one that goes past ``expected`` fails at once, naming both
    numbers, instead of an equality that is never seen timing out."""
    deadline = time.monotonic() + timeout
    value = count()
    while value < expected:
        assert time.monotonic() < deadline, f"stayed at {value}, expected {expected}"
        await anyio.sleep(0.02)
        value = count()
    assert value == expected, f"went to {value}, expected {expected}"


def slots(pool: snakepool.Pool, slot: int = 0) -> int:
    """Calls worker ``slot`` takes before more wait in the pool's queue: those it
    runs, and those it holds (sent ahead, see ``Pool.send_ahead``). How many it
    holds adapts as answers come in: read it while the worker is busy."""
    worker = pool._workers[slot]
    return worker.concurrency + worker.ahead


async def fill_worker(pool: snakepool.Pool, tg: anyio.abc.TaskGroup, release: Path) -> int:
    """Keep worker 0 busy until the file ``release`` exists (a ``hold``: no timer
    ends it, however slow the machine), with every slot it holds taken by quick
    naps waiting behind it: the next call waits in the pool's queue. Returns
    how many calls the worker took. Create ``release`` (``release.touch()``)
    to let it go; cancelling ``tg`` ends the hold too."""
    inflight = lambda: pool.statistics().workers[0].inflight  # noqa: E731
    tg.start_soon(pool.call, "hold", {"release": str(release)})
    await wait_for_count(inflight, 1)
    held = slots(pool)  # (no answer comes while the worker holds: it stays put)
    for _ in range(held - 1):  # they wait in the worker
        tg.start_soon(pool.call, "nap", {"seconds": 0.01})
    await wait_for_count(inflight, held)
    return held


class Pings:
    """Counts the pings a worker answered (health checks among them): a test
    waits for a few more instead of sleeping through "several health checks"."""

    def __init__(self) -> None:
        self.answered = 0
        self.seen = 0  # a mark the test sets, to wait for answers after it


def count_pings(worker: Any) -> Pings:
    """Count ``worker``'s answered pings from now on (wraps its ``ping``)."""
    pings = Pings()
    original = worker.ping

    async def ping(timeout: float) -> bool:
        answered: bool = await original(timeout)
        pings.answered += answered
        return answered

    worker.ping = ping
    return pings
