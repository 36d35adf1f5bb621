"""The lifecycle Pool and Supervisor share, as a state machine (no process)."""

from __future__ import annotations

import anyio
import pytest

from snakepool import PoolClosed
from snakepool.pool._lifecycle import Lifecycle, State

pytestmark = pytest.mark.anyio


async def test_start_then_close() -> None:
    life = Lifecycle("pool 'p'", "Pool")
    assert life.state is State.NEW and not life.ended
    life.begin_start()
    assert life.state is State.STARTING
    life.started()
    assert life.state is State.RUNNING and not life.ended
    assert await life.begin_close() is State.RUNNING
    assert life.state is State.CLOSING and life.ended
    life.closed()
    assert life.state is State.CLOSED
    assert await life.begin_close() is None  # (idempotent: nothing left to do)
    with pytest.raises(PoolClosed, match="pool 'p' is closed and cannot be started again"):
        life.begin_start()


async def test_starting_twice_is_an_error() -> None:
    life = Lifecycle("pool 'p'", "Pool")
    life.begin_start()
    with pytest.raises(RuntimeError, match="already started"):
        life.begin_start()


async def test_closing_a_new_one_tells_the_closer_it_never_started() -> None:
    life = Lifecycle("pool 'p'", "Pool")
    assert await life.begin_close() is State.NEW
    assert life.ended
    assert await _close_from_another_task(life) is None  # (it waits for the first close)
    assert life.state is State.CLOSED
    with pytest.raises(PoolClosed):
        life.begin_start()


async def test_a_failed_start_leaves_it_broken_not_closed() -> None:
    life = Lifecycle("the supervisor", "Supervisor")
    life.begin_start()
    life.start_failed()
    assert life.ended and life.state is State.CLOSING
    life.closed(broken=True)
    assert life.state is State.BROKEN and str(life) == "broken"
    assert await life.begin_close() is None
    assert life.state is State.BROKEN  # (a close afterwards does not hide why it ended)
    with pytest.raises(PoolClosed, match="is broken"):
        life.begin_start()


async def test_a_close_while_starting_waits_for_the_start() -> None:
    life = Lifecycle("pool 'p'", "Pool")
    life.begin_start()
    outcome: list[State | None] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(_record_close, life, outcome)
        await anyio.wait_all_tasks_blocked()
        assert outcome == []  # waiting for the start
        life.started()
    assert outcome == [State.RUNNING]  # then it closes a running one


async def test_concurrent_closes_wait_for_the_first() -> None:
    life = Lifecycle("pool 'p'", "Pool")
    life.begin_start()
    life.started()
    assert await life.begin_close() is State.RUNNING  # this task closes it
    outcome: list[State | None] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(_record_close, life, outcome)
        await anyio.wait_all_tasks_blocked()
        assert outcome == []  # the second waits until the first finishes
        life.closed()
    assert outcome == [None]


async def _record_close(life: Lifecycle, outcome: list[State | None]) -> None:
    outcome.append(await life.begin_close())


async def _close_from_another_task(life: Lifecycle) -> State | None:
    outcome: list[State | None] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(_record_close, life, outcome)
        await anyio.wait_all_tasks_blocked()
        assert outcome == []
        life.closed()
    return outcome[0]
