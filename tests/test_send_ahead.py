"""Calls sent ahead: a busy worker holds its next calls, starts them in order,
gives back the ones it has not started, and a crash re-sends those.

(asyncio fast path: plain calls without a session.)
"""

from __future__ import annotations

import functools
import itertools
import os
import signal
import time
from pathlib import Path

import anyio
import pytest

import snakepool
from conftest import FakeClock
from snakepool import CallTimeout, WorkerCrashed
from snakepool import protocol as p
from snakepool.pool._backend import current_loop
from snakepool.pool._calls import PendingCall
from snakepool.pool._dispatch import Dispatcher
from snakepool.pool._pacing import AHEAD_HORIZON, Pacing
from snakepool.pool._worker import WorkerHandle, WorkerState
from waiting import wait_for_count, wait_until

pytestmark = pytest.mark.anyio

ADAPTER = "sp_adapters:Basic"


def inflight(pool: snakepool.Pool, slot: int = 0) -> int:
    return pool.statistics().workers[slot].inflight


async def record(
    outcomes: dict[str, object], name: str, pool: snakepool.Pool, command: str, **args: object
) -> None:
    """``outcomes[name]`` = the call's result, or the snakepool error it raised."""
    try:
        outcomes[name] = await pool.call(command, args, timeout=30)
    except snakepool.SnakepoolError as exc:
        outcomes[name] = exc


def most_at_once(spans: list[dict[str, float]]) -> int:
    """How many of these (start, end) spans overlapped at most."""
    edges = sorted([(s["start"], 1) for s in spans] + [(s["end"], -1) for s in spans])
    running = most = 0
    for _, step in edges:  # (an end sorts before a start at the same instant)
        running += step
        most = max(most, running)
    return most


async def test_a_busy_worker_holds_calls_and_runs_them_one_at_a_time_in_order(
    tmp_path: Path,
) -> None:
    release = tmp_path / "release"
    async with snakepool.Pool(ADAPTER, size=1, worker_concurrency=1) as pool:
        held = pool._workers[0].concurrency + pool._workers[0].ahead
        assert held > 1  # (Pool.send_ahead)
        results: list[tuple[int, dict[str, float]]] = []

        async def call(order: int, command: str, args: dict[str, object]) -> None:
            results.append((order, await pool.call(command, args)))

        async with anyio.create_task_group() as tg:
            # Busy until released (no timer): nothing behind it can start meanwhile.
            tg.start_soon(call, 0, "hold_sync", {"release": str(release)})
            await wait_for_count(lambda: inflight(pool), 1)
            for order in range(1, held):
                tg.start_soon(call, order, "doze", {"seconds": 0.01})
                await wait_for_count(lambda: inflight(pool), order + 1)  # sent, waiting
            tg.start_soon(call, held, "doze", {"seconds": 0.01})
            await wait_for_count(lambda: pool.statistics().queued, 1)  # the worker is full
            release.touch()
        spans = [span for _, span in sorted(results, key=lambda r: r[0])]
        assert len(spans) == held + 1
        for earlier, later in itertools.pairwise(spans):  # in the order sent, one at a time
            assert earlier["end"] <= later["start"]


async def test_async_calls_waiting_in_the_worker_respect_its_concurrency(tmp_path: Path) -> None:
    release, started = tmp_path / "release", tmp_path / "started"
    started.mkdir()
    async with snakepool.Pool(ADAPTER, size=1, worker_concurrency=2) as pool:
        held = pool._workers[0].concurrency + pool._workers[0].ahead
        async with anyio.create_task_group() as tg:
            spans: list[dict[str, float]] = []

            async def hold() -> None:  # (async, until released: no nap ends before all are in)
                args = {"release": str(release), "started": str(started)}
                spans.append(await pool.call("hold", args))

            for _ in range(held):  # 2 run, the others wait in the worker
                tg.start_soon(hold)
            await wait_for_count(lambda: inflight(pool), held)
            await wait_for_count(lambda: len(list(started.iterdir())), 2)  # (both slots taken)
            release.touch()
        assert len(spans) == held
        assert most_at_once(spans) == 2


async def test_a_call_behind_a_long_one_moves_to_a_worker_that_frees_up() -> None:
    async with snakepool.Pool(ADAPTER, size=2) as pool:
        pids = [w.pid for w in pool.statistics().workers]
        async with anyio.create_task_group() as tg:
            long_result: list[dict[str, float]] = []

            async def long_call() -> None:
                long_result.append(await pool.call("doze", {"seconds": 3.0}))

            tg.start_soon(long_call)  # on worker 0
            await wait_until(lambda: inflight(pool, 0) == 1)
            tg.start_soon(pool.call, "doze", {"seconds": 0.2})  # on worker 1
            await wait_until(lambda: inflight(pool, 1) == 1)
            started = time.monotonic()
            # Both busy: sent ahead to worker 0 (the first of equals), behind
            # the long call; when worker 1 frees, it is withdrawn and sent there.
            pid = await pool.call("pid", timeout=10)
            waited = time.monotonic() - started
            assert pid == pids[1]
            assert waited < 2.5  # well before the long call ends
        assert long_result and long_result[0]["end"] - long_result[0]["start"] >= 3.0
        assert pool.statistics().failed == {}


async def test_a_cancelled_call_that_waits_in_the_worker_never_runs(tmp_path: Path) -> None:
    marker, release = tmp_path / "ran", tmp_path / "release"
    async with snakepool.Pool(ADAPTER, size=1) as pool:
        async with anyio.create_task_group() as tg:
            tg.start_soon(pool.call, "hold_sync", {"release": str(release)})  # busy till released
            await wait_until(lambda: inflight(pool) == 1)
            async with anyio.create_task_group() as caller:
                caller.start_soon(pool.call, "fail_once", {"marker": str(marker)})
                await wait_until(lambda: inflight(pool) == 2)  # sent ahead: waits in the worker
                caller.cancel_scope.cancel()
            # The worker answers a cancelled call that has not started at once
            # (the long call still runs). Releasing only then keeps this test
            # from racing the cancel frame against the freed worker.
            await wait_until(lambda: inflight(pool) == 1)
            release.touch()
        assert await pool.call("add", {"a": 1, "b": 1}) == 2
        await wait_until(lambda: inflight(pool) == 0)
        assert not marker.exists()  # (fail_once would have written it, then exited)
        assert pool.statistics().workers[0].restarts == 0


async def test_a_timeout_while_waiting_in_the_worker_says_it_had_not_started(
    tmp_path: Path,
) -> None:
    release = tmp_path / "release"
    async with snakepool.Pool(ADAPTER, size=1) as pool:
        async with anyio.create_task_group() as tg:
            tg.start_soon(pool.call, "hold_sync", {"release": str(release)})  # busy till released
            await wait_until(lambda: inflight(pool) == 1)
            with pytest.raises(CallTimeout, match=r"still waiting .* had not started"):
                await pool.call("add", {"a": 1, "b": 2}, timeout=0.2)
            release.touch()
        assert await pool.call("add", {"a": 1, "b": 2}) == 3
        assert pool.statistics().workers[0].restarts == 0


async def test_calls_a_crashed_worker_never_started_are_sent_again() -> None:
    async with snakepool.Pool(ADAPTER, size=1) as pool:
        pid = pool.statistics().workers[0].pid
        assert pid is not None
        outcomes: dict[str, object] = {}
        async with anyio.create_task_group() as tg:
            tg.start_soon(functools.partial(record, outcomes, "running", pool, "doze", seconds=30))
            await wait_until(lambda: inflight(pool) == 1)
            tg.start_soon(functools.partial(record, outcomes, "waiting", pool, "add", a=2, b=3))
            await wait_until(lambda: inflight(pool) == 2)
            os.kill(pid, signal.SIGKILL)
        assert isinstance(outcomes["running"], WorkerCrashed)
        assert outcomes["waiting"] == 5  # it never started: run by the replacement
        assert pool.statistics().workers[0].restarts == 1


async def test_send_ahead_zero_keeps_waiting_calls_in_the_pools_queue(tmp_path: Path) -> None:
    release = tmp_path / "release"
    pool = snakepool.Pool(ADAPTER, size=1)
    pool.send_ahead = 0
    async with pool:
        assert pool._workers[0].ahead == 0
        async with anyio.create_task_group() as tg:
            tg.start_soon(pool.call, "hold_sync", {"release": str(release)})  # busy till released
            await wait_until(lambda: inflight(pool) == 1)
            with pytest.raises(CallTimeout, match="never sent"):
                await pool.call("add", {"a": 1, "b": 2}, timeout=0.1)
            release.touch()
        assert pool.statistics().workers[0].requests == 1


async def test_a_session_call_first_in_line_is_not_overtaken_by_later_calls(
    tmp_path: Path,
) -> None:
    # A session call is held by its (busy) worker beyond the paced depth (it
    # waits for that worker anyway); plain calls queued after it must not be
    # sent ahead into that worker before it.
    release = tmp_path / "release"
    async with snakepool.Pool(ADAPTER, size=1) as pool:
        ahead = pool._workers[0].ahead
        spans: dict[str, dict[str, float]] = {}

        async def doze(name: str, seconds: float, session: str | None = None) -> None:
            spans[name] = await pool.call("doze", {"seconds": seconds}, session=session)

        async def hold(name: str) -> None:
            spans[name] = await pool.call("hold_sync", {"release": str(release)})

        async with pool.session() as session:
            await session.call("add", {"a": 1, "b": 2})
            async with anyio.create_task_group() as tg:
                tg.start_soon(hold, "long")  # busy until released: the line below stays put
                await wait_for_count(lambda: inflight(pool), 1)
                for i in range(ahead):
                    tg.start_soon(doze, f"held{i}", 0.01)
                await wait_for_count(lambda: inflight(pool), 1 + ahead)
                tg.start_soon(doze, "session", 0.01, session.id)
                await wait_for_count(lambda: inflight(pool), 2 + ahead)  # held by the worker
                assert pool.statistics().queued == 0
                for i in range(3):
                    tg.start_soon(doze, f"later{i}", 0.01)
                await wait_for_count(lambda: pool.statistics().queued, 3)
                release.touch()
        order = sorted(spans, key=lambda name: spans[name]["start"])
        assert order.index("session") < min(order.index(f"later{i}") for i in range(3))


async def test_a_strict_session_waiting_for_one_worker_does_not_stop_withdrawals(
    tmp_path: Path,
) -> None:
    # The long and the short call run until the test releases them (no timer
    # that a slow machine could outlast while the calls are being placed).
    release_long, release_short = tmp_path / "long", tmp_path / "short"
    async with snakepool.Pool(ADAPTER, size=2, affinity="strict_queue") as pool:
        first = pool._workers[0]
        finished: set[str] = set()

        async def call(
            name: str, command: str, args: dict[str, object], session: str | None = None
        ) -> None:
            await pool.call(command, args, session=session)
            finished.add(name)

        async with pool.session() as session:
            await session.call("add", {"a": 1, "b": 2})
            assert pool._sessions.bindings[session.id] is first
            async with anyio.create_task_group() as tg:
                tg.start_soon(call, "long", "hold_sync", {"release": str(release_long)})
                await wait_for_count(lambda: inflight(pool, 0), 1)  # on worker 0
                tg.start_soon(call, "short", "hold_sync", {"release": str(release_short)})
                await wait_for_count(lambda: inflight(pool, 1), 1)  # on worker 1
                for i in range(4):  # sent ahead to both workers
                    tg.start_soon(call, f"quick{i}", "doze", {"seconds": 0.01})
                await wait_for_count(lambda: inflight(pool, 0) + inflight(pool, 1), 6)
                # waits for worker 0 only: sent ahead to it (never taken back)
                tg.start_soon(call, "session", "doze", {"seconds": 0.01}, session.id)
                await wait_for_count(lambda: inflight(pool, 0) + inflight(pool, 1), 7)
                assert any(c.session_id == session.id for c in first.pending.values())
                release_short.touch()  # worker 1 frees up; worker 0 stays busy
                # worker 1 takes back the quick calls held behind worker 0's long call
                quick = {f"quick{i}" for i in range(4)}
                with anyio.move_on_after(10):
                    await wait_until(lambda: quick <= finished)
                assert quick <= finished and "long" not in finished, finished
                release_long.touch()
        assert finished == quick | {"long", "short", "session"}


async def test_closing_the_pool_fails_a_call_given_back_by_a_dead_worker(
    tmp_path: Path,
) -> None:
    release = tmp_path / "release"
    pool = snakepool.Pool(ADAPTER, size=1)
    await pool.start()
    outcomes: dict[str, object] = {}
    started = time.monotonic()
    try:
        async with anyio.create_task_group() as tg:
            # Busy until released, which happens once the close has begun: on a
            # timer, the worker could die and the last call run before the close.
            running = functools.partial(
                record, outcomes, "running", pool, "hold_sync", release=str(release)
            )
            tg.start_soon(running)
            await wait_for_count(lambda: inflight(pool), 1)
            tg.start_soon(functools.partial(record, outcomes, "dies", pool, "fail", how="sigkill"))
            await wait_for_count(lambda: inflight(pool), 2)
            tg.start_soon(functools.partial(record, outcomes, "behind", pool, "add", a=1, b=2))
            await wait_for_count(lambda: inflight(pool), 3)
            tg.start_soon(pool.aclose)
            await wait_until(lambda: pool.closed)  # closing: it drains the calls in flight
            release.touch()
    finally:
        await pool.aclose()
    assert isinstance(outcomes["running"], dict)  # it finished (the drain waited for it)
    assert isinstance(outcomes["dies"], WorkerCrashed)
    # never started, sent again, then failed by the close: not left to its deadline
    assert isinstance(outcomes["behind"], snakepool.PoolClosed)
    assert time.monotonic() - started < 15


# --- how many calls a worker holds adapts to how quickly it answers ---------------
# (the pacing itself, with a fake clock: test_pacing.py; here, the handle and the
# dispatcher that use it)


#: The answer gap of a quick worker: 50 answers in the pacing horizon.
QUICK = AHEAD_HORIZON / 50


def _paced_handle(concurrency: int, limit: int, clock: FakeClock) -> WorkerHandle:
    """A handle with no process behind it, pacing by ``clock``: enough to feed it answers."""
    handle = WorkerHandle(
        pool="p", slot=0, restarts=0, concurrency=concurrency, gpu=None,
        on_capacity=lambda worker: None, on_exit=lambda worker: None, ahead=limit,
        pacing=Pacing(concurrency, limit, clock),
    )  # fmt: skip
    handle.state = WorkerState.BUSY
    return handle


def _answer_at_pace(handle: WorkerHandle, clock: FakeClock, gap: float, answers: int) -> None:
    """The worker stays saturated and answers one call every ``gap`` seconds."""
    ids = itertools.count(1)
    for _ in range(handle.concurrency + 1):
        call_id = next(ids)
        handle.pending[call_id] = PendingCall(call_id, "echo", {}, "call")
    for _ in range(answers):
        call_id = next(ids)
        handle.pending[call_id] = PendingCall(call_id, "echo", {}, "call")  # the next one
        clock.now += gap
        handle._on_messages([p.Result(id=min(handle.pending), value=None)])  # alone in its read


@pytest.mark.parametrize("concurrency", [1, 8])
async def test_a_handle_paces_by_the_answers_it_takes(concurrency: int) -> None:
    clock = FakeClock()
    handle = _paced_handle(concurrency, 64, clock)
    assert concurrency <= handle.ahead < 64  # before any answer was timed
    _answer_at_pace(handle, clock, gap=QUICK, answers=200)  # 50 per horizon
    assert handle.ahead == handle.pacing.ahead == 50  # (what the dispatcher reads)
    _answer_at_pace(handle, clock, gap=0.05, answers=200)
    assert handle.ahead == concurrency
    for call_id in range(10_000, 10_000 + 10):
        handle.pending[call_id] = PendingCall(call_id, "echo", {}, "call")
    clock.now += 2 * AHEAD_HORIZON  # no answer since: it may be stuck in a call
    assert not handle.holds_briefly()


async def test_send_ahead_zero_paces_nothing() -> None:
    clock = FakeClock()
    handle = _paced_handle(1, 0, clock)
    _answer_at_pace(handle, clock, gap=QUICK, answers=50)
    assert handle.ahead == 0 and handle.pacing.answer_gap == 0.0


async def test_slow_calls_are_not_parked_in_a_busy_worker() -> None:
    # 2 workers, one call of 3 s, then 20 ms calls: after a few answers each
    # worker holds only what it runs, so the quick calls wait in the pool's
    # queue (any worker takes them) instead of behind the slow one.
    async with snakepool.Pool(ADAPTER, size=2) as pool:
        async with anyio.create_task_group() as tg:
            for _ in range(2):
                for _ in range(12):
                    tg.start_soon(pool.call, "nap", {"seconds": 0.02})
            await wait_until(lambda: all(w.inflight == 0 for w in pool.statistics().workers))
        assert [w.ahead for w in pool._workers] == [1, 1]
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                tg.start_soon(pool.call, "nap", {"seconds": 3.0})
                await wait_until(lambda: sum(w.inflight for w in pool.statistics().workers) == 1)
                started = time.monotonic()
                for _ in range(10):
                    tg.start_soon(pool.call, "nap", {"seconds": 0.02})
                await wait_until(lambda: pool.statistics().completed >= 24 + 10)
                assert time.monotonic() - started < 2.5  # none waited for the 3 s call


async def test_a_free_worker_takes_calls_back_only_from_one_that_stalls(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = FakeClock()
    free, busy = _paced_handle(1, 64, clock), _paced_handle(1, 64, clock)
    free.pending.clear()
    _answer_at_pace(busy, clock, gap=QUICK, answers=200)  # flowing: holds 2 calls
    for call in busy.pending.values():
        call.frame = b"(its frame)"  # (a call without one cannot be sent elsewhere)
    withdrawn: list[int] = []
    monkeypatch.setattr(busy, "withdraw", lambda call: withdrawn.append(call.id))
    dispatcher = Dispatcher("p", 10, [free, busy], lambda: None)
    dispatcher.loop = current_loop(lambda: pytest.fail("asyncio timers need no task group"))
    dispatcher._sent_ahead = True
    dispatcher._withdraw_for(free)
    assert withdrawn == []  # it would start within the horizon anyway
    clock.now += 2 * AHEAD_HORIZON  # then no answer comes
    await wait_until(lambda: withdrawn == [max(busy.pending)])  # looked at again: stalled
