"""Regression tests for races found in review (each once reproduced against real workers)."""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest

import snakepool
from snakepool import PoolClosed
from snakepool.protocol import STREAM_WINDOW
from waiting import count_pings, fill_worker, restarts, slots, wait_for_count, wait_until

pytestmark = pytest.mark.anyio

ADAPTER = "sp_adapters:Resilience"


async def test_cancel_arriving_with_its_async_call_is_answered() -> None:
    # While the worker's loop is blocked, the call and its cancel arrive in one
    # read: the task is cancelled before its first step. It must still be
    # answered, or the host would take the worker for stuck and kill it.
    async with snakepool.Pool(ADAPTER, size=1, worker_concurrency=2) as pool:
        pool.cancel_grace = 1.0
        async with anyio.create_task_group() as tg:
            tg.start_soon(pool.call, "block_loop", {"seconds": 0.5})
            await wait_until(lambda: pool.statistics().workers[0].inflight == 1)
            with pytest.raises(snakepool.CallTimeout):
                await pool.call("nap", {"seconds": 30}, timeout=0.1)
        await wait_until(lambda: pool.statistics().workers[0].inflight == 0)
        assert restarts(pool) == 0


async def test_cancelling_start_neither_hangs_nor_leaks() -> None:
    for delay in (0.0, 0.005, 0.05):
        pool = snakepool.Pool(ADAPTER, size=3)
        with anyio.fail_after(15):
            with anyio.move_on_after(delay):
                await pool.start()
            await pool.aclose()
        assert pool.closed


async def test_concurrent_acloses_both_wait_for_the_close() -> None:
    pool = snakepool.Pool(ADAPTER, size=1)
    await pool.start()
    try:
        pid = pool.statistics().workers[0].pid
        results: list[object] = []

        async def nap() -> None:
            results.append(await pool.call("nap", {"seconds": 0.3}))

        async with anyio.create_task_group() as tg:
            tg.start_soon(nap)
            await wait_until(lambda: pool.statistics().workers[0].inflight == 1)
            tg.start_soon(pool.aclose)
            await anyio.lowlevel.checkpoint()
            await pool.aclose()  # must not return before the first close finished
            assert pool.statistics().workers[0].state == "exited", pid
        assert len(results) == 1
    finally:
        await pool.aclose()  # (after a failure: no worker left behind)


async def test_shutdown_cutting_off_an_async_call_says_pool_closed() -> None:
    pool = snakepool.Pool(ADAPTER, size=1)
    pool.drain_grace = 0.2
    await pool.start()
    try:
        outcome: list[BaseException] = []

        async def nap() -> None:
            try:
                await pool.call("nap", {"seconds": 30})
            except snakepool.SnakepoolError as exc:
                outcome.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(nap)
            await wait_until(lambda: pool.statistics().workers[0].inflight == 1)
            await pool.aclose()
        assert len(outcome) == 1
        assert isinstance(outcome[0], PoolClosed)
    finally:
        await pool.aclose()  # (after a failure: no worker left behind)


async def test_a_slow_stream_consumer_bounds_what_is_buffered() -> None:
    async with snakepool.Pool(ADAPTER, size=1) as pool:
        stream = pool.stream("count", {"n": 10_000})
        first = await stream.__anext__()
        assert first == 0
        items = stream._call.items  # type: ignore[union-attr]
        buffered = lambda: items.statistics().current_buffer_used  # noqa: E731
        await wait_until(lambda: buffered() >= STREAM_WINDOW - 1)  # the window, sent
        for _ in range(3):  # items sent before a pong arrive before it
            assert await pool._workers[0].ping(5.0)
            assert buffered() <= STREAM_WINDOW  # without flow control it runs far ahead
        rest = [item async for item in stream]
        assert rest == list(range(1, 10_000))


async def test_a_crash_loop_backs_off() -> None:
    started: list[float] = []
    pool = snakepool.Pool("sp_adapters:DiesSoon", size=1)
    pool.add_listener(
        lambda e: started.append(anyio.current_time()) if e.name == "worker.started" else None
    )
    await pool.start()
    try:
        await wait_until(lambda: len(started) >= 5, timeout=30)
    finally:
        await pool.aclose()
    gaps = [b - a for a, b in itertools.pairwise(started)]
    # Before restart k (k = 1, 2...) of a crash loop the pool sleeps 0.1 * 2**(k-1) s
    # plus up to 0.1 s of jitter, and gaps[k-1] spans that sleep: gaps[3] >= 0.8 s
    # whatever the machine does. Each gap adds a start-up and a lifetime (~0.1 s
    # here, more on a loaded machine), so the growth is checked against the
    # shorter of the first two gaps (0.1 s and 0.2 s of backoff): one stalled
    # start-up does not hide it, and a constant backoff of any size fails.
    assert gaps[3] >= 0.8, gaps
    assert gaps[3] > min(gaps[:2]) + 0.3, gaps  # 0.1-0.2 s -> 0.8 s: it slows down


async def test_abandoning_a_half_open_probe_stream_releases_the_probe() -> None:
    async with snakepool.Pool(
        ADAPTER, size=1, breaker_threshold=1, breaker_reset_timeout=0.3
    ) as pool:
        with pytest.raises(snakepool.WorkerCrashed):
            await pool.call("fail", {"how": "sigkill"})
        await wait_until(lambda: pool.statistics().breaker_state == "half_open")
        await wait_until(lambda: pool.statistics().ready_workers == 1)
        async with pool.stream("count", {"n": 1000}) as items:  # the probe
            async for _ in items:
                break
        await wait_until(lambda: pool.statistics().workers[0].inflight == 0)
        assert await pool.call("add", {"a": 1, "b": 1}) == 2  # not CircuitOpen forever


async def test_strict_queue_first_calls_of_a_session_share_one_worker(tmp_path: Path) -> None:
    release = tmp_path / "release"
    async with snakepool.Pool("sp_adapters:Stateful", size=2, affinity="strict_queue") as pool:
        pids: list[int] = []
        async with anyio.create_task_group() as tg:  # both workers busy until released
            tg.start_soon(pool.call, "hold", {"release": str(release)})
            tg.start_soon(pool.call, "hold", {"release": str(release)})
            await wait_for_count(lambda: sum(w.inflight for w in pool.statistics().workers), 2)
            session = pool.session()

            async def whoami() -> None:
                pids.append((await session.call("whoami"))["pid"])

            tg.start_soon(whoami)
            tg.start_soon(whoami)
            # the first waits for a worker, the second behind it (a session's calls keep order)
            await wait_for_count(lambda: pool.statistics().queued, 1)
            routes = pool._sessions._routes
            await wait_until(lambda: session.id in routes and routes[session.id].users == 2)
            release.touch()
        assert len(set(pids)) == 1


async def test_a_queued_call_for_one_worker_does_not_block_an_idle_one(tmp_path: Path) -> None:
    release = tmp_path / "release"
    async with snakepool.Pool("sp_adapters:Stateful", size=2, affinity="strict_queue") as pool:
        a, b = pool.session(), pool.session()
        await a.call("whoami")
        await b.call("whoami")  # a and b are bound to different workers
        async with anyio.create_task_group() as tg:
            # a's worker is busy until released (no timer for a slow machine to outlast)
            tg.start_soon(a.call, "hold", {"release": str(release)})
            await wait_for_count(lambda: sum(w.inflight for w in pool.statistics().workers), 1)
            tg.start_soon(a.call, "nap", {"seconds": 0.1})  # waits in a's worker (sent ahead)
            a_worker = pool._sessions.bindings[a.id]
            await wait_until(lambda: len(a_worker.pending) == 2)
            with anyio.fail_after(5):  # (stuck behind a's call, they would never finish)
                assert (await b.call("whoami"))["session"] == b.id
                assert (await pool.call("whoami"))["session"] is None
            assert len(a_worker.pending) == 2  # a's call still waits for a's worker
            release.touch()


async def test_a_cast_is_bounded_by_call_timeout() -> None:
    async with snakepool.Pool(ADAPTER, size=1, call_timeout=0.5) as pool:
        pool.cancel_grace = 0.3
        await pool.cast("hang")
        await wait_until(lambda: pool.statistics().failed.get("timeout") == 1)
        await wait_until(
            lambda: (
                pool.statistics().ready_workers == 1 and pool.statistics().workers[0].inflight == 0
            )
        )
        assert await pool.call("add", {"a": 2, "b": 2}) == 4


async def test_a_long_sync_call_leaves_the_worker_answering_pings_and_cancels(
    tmp_path: Path,
) -> None:
    # worker_concurrency=1: the only handler slot is busy, yet the worker still
    # reads: health pings are answered and a cancellation reaches the call.
    # (health_timeout leaves room for a stalled machine; that pings are answered
    # while the slot is busy is checked directly, with a call that ends only
    # when the test releases it.)
    release = tmp_path / "release"
    async with snakepool.Pool(ADAPTER, size=1, health_interval=0.1, health_timeout=2.0) as pool:
        worker = pool._workers[0]
        checks = count_pings(worker)
        async with anyio.create_task_group() as tg:
            tg.start_soon(pool.call, "hold_sync", {"release": str(release)})
            await wait_until(lambda: pool.statistics().workers[0].inflight == 1)
            assert await worker.ping(5.0)  # answered while the call still runs
            await wait_until(lambda: checks.answered >= 4)  # (several health checks)
            assert pool.statistics().workers[0].inflight == 1  # (still busy all along)
            release.touch()
        assert restarts(pool) == 0
        with pytest.raises(snakepool.CallTimeout):
            await pool.call("cooperative", timeout=0.3)
        await wait_until(lambda: pool.statistics().workers[0].inflight == 0, timeout=5)
        assert restarts(pool) == 0


async def test_a_worker_answers_after_its_threads_went_quiet() -> None:
    # Once no sync call came for a while, the worker's watchdog thread goes to
    # sleep; a bug made it spin holding the lock instead, so the next call
    # was never read.
    async with snakepool.Pool(ADAPTER, size=1) as pool:
        assert await pool.call("echo", {"value": 1}) == 1
        with pytest.raises(snakepool.CallTimeout):
            await pool.call("nap", {"seconds": 3}, timeout=1.5)
        with anyio.fail_after(5):
            assert await pool.call("echo", {"value": 2}) == 2
        assert restarts(pool) == 0


async def test_a_deadline_due_in_the_hand_off_turn_still_times_out_unsent(
    tmp_path: Path,
) -> None:
    # The queued call's timer and the freeing of a slot become due in the same
    # event-loop turn (the loop is blocked past both on purpose). The call must
    # time out as never sent, not be sent late with no timer left.
    # The worker is held until the loop is about to block (not on a timer that a
    # slow machine could outlast before the call is even queued).
    release = tmp_path / "release"
    async with snakepool.Pool(ADAPTER, size=1) as pool:
        async with anyio.create_task_group() as tg:
            await fill_worker(pool, tg, release)
            outcome: list[BaseException] = []

            async def queued() -> None:
                try:
                    await pool.call("hang", timeout=0.3)
                except snakepool.CallTimeout as exc:
                    outcome.append(exc)

            tg.start_soon(queued)
            await wait_for_count(lambda: pool.statistics().queued, 1)
            release.touch()  # the answer that frees a slot comes while the loop is blocked
            time.sleep(0.5)  # noqa: ASYNC251 (blocking the loop on purpose: both become due in one turn)
            await wait_until(lambda: bool(outcome), timeout=5)
        assert "never sent" in str(outcome[0])
        await wait_until(lambda: pool.statistics().workers[0].inflight == 0)


async def test_queued_calls_are_sent_by_the_hand_off_and_leave_no_deadline_behind(
    tmp_path: Path,
) -> None:
    # Calls queued behind a busy worker are sent when a slot frees (their
    # callers wake once, for the answer). Whatever way a call ends (result,
    # timeout while queued, timeout while running, the caller cancelled),
    # its deadline entry goes with it: the per-pool buckets must not grow.
    # (The busy calls are held until the test releases them: no timer ends them
    # before the calls behind them are in place.)
    first, second = tmp_path / "first", tmp_path / "second"
    async with snakepool.Pool(ADAPTER, size=1) as pool:
        results: list[int] = []

        async def add(i: int) -> None:
            results.append(await pool.call("add", {"a": i, "b": 1}, timeout=10))

        async with anyio.create_task_group() as tg:
            tg.start_soon(pool.call, "hold", {"release": str(first)})
            await wait_for_count(lambda: pool.statistics().workers[0].inflight, 1)
            for i in range(20):
                tg.start_soon(add, i)
            # some wait in the worker (sent ahead), the others in the pool's queue
            await wait_for_count(lambda: pool.statistics().queued, max(0, 20 - (slots(pool) - 1)))
            first.touch()
        assert sorted(results) == list(range(1, 21))
        with pytest.raises(snakepool.CallTimeout, match="did not finish"):
            await pool.call("nap", {"seconds": 30}, timeout=0.05)  # (cancelled: no wait)
        await wait_until(lambda: pool.statistics().workers[0].inflight == 0)  # it stopped
        async with anyio.create_task_group() as tg:
            await fill_worker(pool, tg, second)
            with pytest.raises(snakepool.CallTimeout, match="never sent"):
                await pool.call("add", {"a": 1, "b": 1}, timeout=0.05)
            with anyio.move_on_after(0.05):
                await pool.call("add", {"a": 1, "b": 1}, timeout=10)
            second.touch()
        assert await pool.call("add", {"a": 2, "b": 2}, timeout=10) == 4
        if pool._deadlines is not None:  # (asyncio only)
            assert len(pool._deadlines) == 0
        assert pool.statistics().queued == 0


async def test_finished_calls_leave_no_deadline_buckets_behind() -> None:
    # Deadline buckets of finished calls were kept (with their grown sets)
    # until their timers fired, a call_timeout later: host memory grew with
    # the call rate (+19 MiB over 1M calls with call_timeout=300).
    async with snakepool.Pool(ADAPTER, size=2, call_timeout=300) as pool:

        async def caller() -> None:
            for i in range(100):
                await pool.call("add", {"a": i, "b": 1})

        async with anyio.create_task_group() as tg:
            for _ in range(32):
                tg.start_soon(caller)
        deadlines = pool._deadlines
        if deadlines is not None:  # (asyncio only)
            assert len(deadlines) == 0
            assert len(deadlines._buckets) <= 1  # at most the newest, kept for reuse


async def test_a_hand_off_to_a_retiring_worker_moves_on_at_once() -> None:
    # A queued call is handed a worker that retires before the call resumes;
    # it must take the other free worker at once, not wait for its timeout.
    async with snakepool.Pool(ADAPTER, size=2) as pool:
        dispatcher = pool._dispatcher
        held = []  # every slot, those to wait in a worker included
        while (worker := dispatcher.try_reserve(ahead=True)) is not None:
            held.append(worker)
        # (ahead slots only while no slot is promised: one running slot each)
        assert len(held) == sum(w.concurrency for w in pool._workers)
        first = held[0]
        async with anyio.create_task_group() as tg:
            results: list[int] = []

            async def queued() -> None:
                results.append(await pool.call("add", {"a": 1, "b": 2}, timeout=10))

            tg.start_soon(queued)
            await wait_until(lambda: dispatcher.queued == 1)
            started = time.monotonic()
            dispatcher.release(first)  # handed to (and sent with) the queued call...
            first.retire("test")  # ...which the retiring worker still answers
            for worker in held[1:]:
                dispatcher.release(worker)
            await wait_until(lambda: results == [3], timeout=5)
            assert time.monotonic() - started < 2.0
        assert [w.reserved for w in pool._workers if w.is_ready] == [
            0
        ] * pool.statistics().ready_workers


async def test_failures_that_are_hard_to_report_still_reach_the_caller() -> None:
    # An exception whose str() raises, and one whose message is over the frame
    # limit: both are answered, and the worker keeps reading.
    async with snakepool.Pool("sp_adapters:Basic", size=1, max_frame_bytes=4096) as pool:
        with pytest.raises(snakepool.RemoteError, match="str"):
            await pool.call("raise_unprintable", timeout=5)
        with pytest.raises(snakepool.RemoteError, match="truncated"):
            await pool.call("raise_long", {"length": 10_000}, timeout=5)
        assert await pool.call("add", {"a": 1, "b": 1}, timeout=5) == 2
        assert restarts(pool) == 0
