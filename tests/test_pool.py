"""Pool behaviour with real worker processes: calls, streams, casts, limits, bad input."""

from __future__ import annotations

import gc
import hashlib
import logging
import os
from pathlib import Path

import anyio
import psutil
import pytest

import snakepool
from snakepool import (
    CallTimeout,
    PoolClosed,
    PoolOverloaded,
    ProtocolError,
    RemoteError,
    UnknownCommand,
    WorkerCrashed,
    WorkerStartError,
)
from snakepool.pool._calls import PendingCall
from waiting import all_ready, fill_worker, restarts, wait_for_count, wait_until

pytestmark = pytest.mark.anyio

ADAPTER = "sp_adapters:Basic"


# --- the basics -------------------------------------------------------------------


async def test_call_stream_and_statistics() -> None:
    async with snakepool.Pool(ADAPTER, size=2) as pool:
        assert await pool.call("add", {"a": 1, "b": 2}) == 3
        assert [x async for x in pool.stream("count", {"n": 3})] == [0, 1, 2]
        assert [x async for x in pool.stream("ticks", {"n": 4})] == [0, 1, 2, 3]
        stats = pool.statistics()
        assert stats.name == "default"
        assert stats.size == 2
        assert stats.completed == 3
        assert stats.failed_total == 0
        assert stats.breaker_state == "closed"
        assert all(w.pid and w.rss_bytes and w.rss_bytes > 0 for w in stats.workers)
        assert sum(w.requests for w in stats.workers) == 3
        with pytest.raises(AttributeError):
            stats.size = 3  # type: ignore[misc]


async def test_builtin_commands_ping_describe_info() -> None:
    async with snakepool.Pool(ADAPTER, size=1) as pool:
        assert await pool.call("ping") == "pong"
        described = await pool.call("describe")
        assert described["add"]["doc"] == "Add two numbers."
        assert [p["name"] for p in described["add"]["parameters"]] == ["a", "b"]
        assert described["count"]["stream"] is True
        assert "ctx" not in [p["name"] for p in described["endless"]["parameters"]]
        info = await pool.call("info")
        assert info["pid"] == pool.statistics().workers[0].pid
        assert info["adapter"] == "sp_adapters:Basic"
        assert info["rss"] > 0


async def test_generic_adapter_by_entry_point_name() -> None:
    async with snakepool.Pool("generic", size=1, adapter_config={"allow": ["math"]}) as pool:
        assert await pool.call("echo", {"value": {"nested": [1, 2.5, None]}}) == {
            "nested": [1, 2.5, None]
        }
        assert await pool.call("call", {"target": "math:sqrt", "args": [16]}) == 4.0
        assert await pool.call("call", {"target": "math:pow", "args": [2, 3]}) == 8.0
        assert await pool.call("sleep", {"seconds": 0.01}) == 0.01
        assert [x async for x in pool.stream("count", {"n": 2})] == [0, 1]
        with pytest.raises(RemoteError, match="module 'os' is not allowed"):
            await pool.call("call", {"target": "os:getcwd"})
        with pytest.raises(RemoteError, match="private names"):
            await pool.call("call", {"target": "math:_private"})
        assert await pool.call("ping") == "pong"


async def test_generic_adapter_refuses_reaching_through_an_allowed_module() -> None:
    async with snakepool.Pool("generic", size=1, adapter_config={"allow": ["json"]}) as pool:
        with pytest.raises(RemoteError, match="leads into module 'codecs'"):
            await pool.call(
                "call", {"target": "json:codecs.open", "args": {"filename": "/etc/passwd"}}
            )


async def test_binary_payloads_of_several_mib_both_ways() -> None:
    async with snakepool.Pool(ADAPTER, size=1) as pool:
        data = os.urandom(8 * 2**20)
        answer = await pool.call("digest", {"data": data})
        assert answer == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        blob = await pool.call("blob", {"size": 6 * 2**20})
        assert isinstance(blob, bytes) and len(blob) == 6 * 2**20
        assert await pool.call("echo", {"value": data}) == data


async def test_least_loaded_dispatch_spreads_concurrent_calls() -> None:
    async with snakepool.Pool(ADAPTER, size=2) as pool:
        results: list[dict[str, float]] = []

        async def nap() -> None:
            results.append(await pool.call("nap", {"seconds": 0.3}))

        async with anyio.create_task_group() as tg:
            tg.start_soon(nap)
            tg.start_soon(nap)
        assert {r["pid"] for r in results} == {w.pid for w in pool.statistics().workers}


@pytest.mark.parametrize("command", ["nap", "doze"])  # an async and a sync handler
async def test_worker_concurrency_runs_calls_at_once_in_one_worker(command: str) -> None:
    # (sync calls: the worker's reader runs a quick one itself; calls that wait
    # get threads of their own within milliseconds, woken by its watchdog)
    async with snakepool.Pool(ADAPTER, size=1, worker_concurrency=4) as pool:
        results: list[dict[str, float]] = []

        async def nap() -> None:
            results.append(await pool.call(command, {"seconds": 0.5}))

        async with anyio.create_task_group() as tg:
            for _ in range(4):
                tg.start_soon(nap)
        # All four were running at the same moment in the one worker.
        latest_start = max(r["start"] for r in results)
        earliest_end = min(r["end"] for r in results)
        assert latest_start < earliest_end
        assert len({r["pid"] for r in results}) == 1


async def test_cast_is_fire_and_forget_and_counted() -> None:
    async with snakepool.Pool(ADAPTER, size=1) as pool:
        await pool.cast("add", {"a": 1, "b": 1})
        await pool.cast("fail", {"how": "exception"})
        await wait_until(lambda: pool.statistics().completed + pool.statistics().failed_total == 2)
        stats = pool.statistics()
        assert stats.completed == 1
        assert stats.failed == {"application": 1}


# --- limits -----------------------------------------------------------------------


@pytest.mark.parametrize("send_ahead", [64, 0])
async def test_queue_full_fails_fast_and_queued_calls_still_run(
    tmp_path: Path, send_ahead: int
) -> None:
    """queue_size bounds waiting calls: queued in the pool (send_ahead=0) or sent
    ahead to the busy worker and not started there (issue 15)."""
    release = tmp_path / "release"
    pool = snakepool.Pool(ADAPTER, size=1, queue_size=1)
    pool.send_ahead = send_ahead
    async with pool:
        results: list[object] = []

        async def call(command: str, args: dict[str, object]) -> None:
            results.append(await pool.call(command, args))

        waiting = lambda: pool.statistics().workers[0].inflight + pool.statistics().queued  # noqa: E731
        async with anyio.create_task_group() as tg:
            # busy until released: the queue stays full while the test checks
            tg.start_soon(call, "hold", {"release": str(release)})
            await wait_for_count(waiting, 1)
            tg.start_soon(call, "nap", {"seconds": 0.01})  # the one call that may wait
            await wait_for_count(waiting, 2)
            assert pool.statistics().queued == (0 if send_ahead else 1)
            with pytest.raises(PoolOverloaded, match="queue_size=1"):
                await pool.call("add", {"a": 1, "b": 2})
            with pytest.raises(PoolOverloaded):
                await pool.cast("add", {"a": 1, "b": 2})
            release.touch()
        assert len(results) == 2
        assert pool.statistics().queued == 0
        assert await pool.call("add", {"a": 1, "b": 2}) == 3


async def test_timeout_while_queued_never_sends_the_call(tmp_path: Path) -> None:
    release = tmp_path / "release"
    async with snakepool.Pool(ADAPTER, size=1) as pool:
        async with anyio.create_task_group() as tg:
            held = await fill_worker(pool, tg, release)  # (busy until released)
            with pytest.raises(CallTimeout, match="never sent"):
                await pool.call("add", {"a": 1, "b": 2}, timeout=0.2)
            assert pool.statistics().queued == 0  # it left the queue
            release.touch()
        assert pool.statistics().workers[0].requests == held
        assert restarts(pool) == 0


async def test_a_caller_cancelled_while_queued_leaves_the_queue(tmp_path: Path) -> None:
    release = tmp_path / "release"
    async with snakepool.Pool(ADAPTER, size=1) as pool:
        async with anyio.create_task_group() as tg:
            held = await fill_worker(pool, tg, release)  # (busy until released)
            with anyio.move_on_after(0.1) as scope:
                await pool.call("add", {"a": 1, "b": 2})
            assert scope.cancelled_caught
            assert pool.statistics().queued == 0
            release.touch()
        assert await pool.call("add", {"a": 2, "b": 2}) == 4
        # the cancelled one was never sent
        assert pool.statistics().workers[0].requests == held + 1


async def test_calls_that_waited_in_the_queue_leave_nothing_for_the_cyclic_gc(
    tmp_path: Path,
) -> None:
    """A queued call and its place in the queue point at each other until the
    hand-off sends it; after, neither keeps the other (else every queued call
    is garbage for the cyclic GC to find)."""
    release = tmp_path / "release"
    async with snakepool.Pool(ADAPTER, size=1) as pool:
        gc.collect()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            async with anyio.create_task_group() as tg:
                await fill_worker(pool, tg, release)  # (busy until released)
                for i in range(10):
                    tg.start_soon(pool.call, "add", {"a": i, "b": 1})
                await wait_for_count(lambda: pool.statistics().queued, 10)
                release.touch()
            gc.collect()
            left = [o for o in gc.garbage if isinstance(o, PendingCall)]
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
        assert left == []


async def test_closing_the_pool_fails_queued_calls_with_pool_closed(tmp_path: Path) -> None:
    release = tmp_path / "release"
    pool = snakepool.Pool(ADAPTER, size=1)
    await pool.start()
    try:
        outcomes: list[BaseException] = []

        async def queued_call() -> None:
            try:
                await pool.call("add", {"a": 1, "b": 2})
            except snakepool.PoolClosed as exc:
                outcomes.append(exc)

        async with anyio.create_task_group() as tg:
            await fill_worker(pool, tg, release)  # (busy until released)
            tg.start_soon(queued_call)
            await wait_for_count(lambda: pool.statistics().queued, 1)
            tg.start_soon(pool.aclose)
            # the close fails the queued call while the worker is still busy...
            await wait_until(lambda: bool(outcomes))
            release.touch()  # ...then drains the calls in flight
        assert len(outcomes) == 1 and "queued" in str(outcomes[0])
    finally:
        await pool.aclose()


async def test_hung_call_times_out_and_its_worker_is_replaced() -> None:
    async with snakepool.Pool(ADAPTER, size=1) as pool:
        pool.cancel_grace = 0.5
        old_pid = pool.statistics().workers[0].pid
        with pytest.raises(CallTimeout, match=r"did not finish within 0\.3s"):
            await pool.call("hang", timeout=0.3)
        await wait_until(lambda: restarts(pool) == 1 and all_ready(pool))
        assert (
            not psutil.pid_exists(old_pid)
            or psutil.Process(old_pid).status() == psutil.STATUS_ZOMBIE
        )
        assert await pool.call("add", {"a": 2, "b": 3}) == 5
        assert pool.statistics().failed == {"timeout": 1}


async def test_cooperative_timeout_keeps_the_worker() -> None:
    async with snakepool.Pool(ADAPTER, size=1) as pool:
        with pytest.raises(CallTimeout):
            await pool.call("cooperative", timeout=0.2)
        with pytest.raises(CallTimeout):
            await pool.call("nap", {"seconds": 30}, timeout=0.2)  # async: cancelled at once
        await wait_until(lambda: pool.statistics().workers[0].inflight == 0)
        assert restarts(pool) == 0
        assert await pool.call("add", {"a": 1, "b": 1}) == 2


async def test_caller_cancellation_cancels_the_call_in_the_worker() -> None:
    async with snakepool.Pool(ADAPTER, size=1) as pool:
        with anyio.move_on_after(0.2):
            await pool.call("cooperative")
        await wait_until(lambda: pool.statistics().workers[0].inflight == 0)
        assert restarts(pool) == 0


async def test_leaving_a_stream_early_cancels_the_generator() -> None:
    async with snakepool.Pool(ADAPTER, size=1) as pool:
        async with pool.stream("endless") as items:
            async for item in items:
                if item == 5:
                    break
        await wait_until(lambda: pool.statistics().workers[0].inflight == 0)
        assert restarts(pool) == 0
        stream = pool.stream("endless")
        assert await stream.__anext__() == 0
        await stream.aclose()
        await wait_until(lambda: pool.statistics().workers[0].inflight == 0)
        assert await pool.call("add", {"a": 1, "b": 1}) == 2


async def test_idempotent_call_is_retried_once_after_a_crash(tmp_path: Path) -> None:
    async with snakepool.Pool(ADAPTER, size=2) as pool:
        with pytest.raises(WorkerCrashed, match="code 9"):
            await pool.call("fail_once", {"marker": str(tmp_path / "a")})
        pid = await pool.call("fail_once", {"marker": str(tmp_path / "b")}, idempotent=True)
        assert pid in {w.pid for w in pool.statistics().workers}


# --- bad input: a clear error, and nothing lost ------------------------------------


async def test_bad_input_gets_clear_errors_and_the_pool_carries_on() -> None:
    async with snakepool.Pool(ADAPTER, size=1, max_frame_bytes=1 * 2**20) as pool:
        with pytest.raises(UnknownCommand, match=r"unknown command 'nope'.*add"):
            await pool.call("nope")
        with pytest.raises(RemoteError, match="missing a required argument: 'b'") as wrong:
            await pool.call("add", {"a": 1})
        assert wrong.value.remote_type == "TypeError"
        with pytest.raises(RemoteError, match="not MessagePack-serializable: set"):
            await pool.call("unserializable")
        with pytest.raises(RemoteError, match="is a stream"):
            await pool.call("count", {"n": 2})
        with pytest.raises(RemoteError, match="not a stream"):
            await pool.stream("add", {"a": 1, "b": 2}).__anext__()
        with pytest.raises(RemoteError, match="too large to send"):
            await pool.call("blob", {"size": 2 * 2**20})
        requests_before = pool.statistics().workers[0].requests
        with pytest.raises(TypeError, match="set"):
            await pool.call("echo", {"value": {1, 2}})
        with pytest.raises(ProtocolError, match=r"too large.*nothing was sent"):
            await pool.call("echo", {"value": b"x" * (2 * 2**20)})
        with pytest.raises(TypeError, match="dict of keyword arguments"):
            await pool.call("add", [1, 2])  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="timeout"):
            await pool.call("add", {"a": 1, "b": 2}, timeout=-1)
        assert pool.statistics().workers[0].requests == requests_before  # nothing was sent
        assert await pool.call("add", {"a": 1, "b": 2}) == 3
        assert restarts(pool) == 0


async def test_remote_error_carries_type_message_and_traceback() -> None:
    async with snakepool.Pool(ADAPTER, size=1) as pool:
        with pytest.raises(RemoteError) as info:
            await pool.call("fail", {"how": "exception"})
        error = info.value
        assert error.remote_type == "sp_adapters.Boom"
        assert error.remote_message == "the handler blew up"
        assert "def fail" in error.remote_traceback or "in fail" in error.remote_traceback
        assert error.category is snakepool.ErrorCategory.APPLICATION


async def test_bad_adapter_spec_fails_start_clearly() -> None:
    with pytest.raises(WorkerStartError, match="no attribute 'Missing'"):
        await snakepool.Pool("sp_adapters:Missing", size=1).start()
    with pytest.raises(WorkerStartError, match="no adapter named 'nonexistent'"):
        await snakepool.Pool("nonexistent", size=1).start()
    with pytest.raises(WorkerStartError, match="No module named"):
        await snakepool.Pool("no_such_module:Thing", size=1).start()


def test_bad_pool_arguments_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match="size"):
        snakepool.Pool(ADAPTER, size=0)
    with pytest.raises(ValueError, match="affinity"):
        snakepool.Pool(ADAPTER, affinity="sticky")
    with pytest.raises(ValueError, match="call_timeout"):
        snakepool.Pool(ADAPTER, call_timeout=0)
    with pytest.raises(TypeError, match="env"):
        snakepool.Pool(ADAPTER, env={"A": 1})  # type: ignore[dict-item]
    with pytest.raises(TypeError, match="pythonpath"):
        snakepool.Pool(ADAPTER, pythonpath="/tmp")


async def test_print_in_a_handler_never_corrupts_the_protocol(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="snakepool.worker")
    async with snakepool.Pool(ADAPTER, size=1, name="noisy") as pool:
        assert await pool.call("noisy", {"text": "hello from print"}) == "quiet"
        await pool.call("log_something", {"text": "careful"})
        assert await pool.call("add", {"a": 1, "b": 1}) == 2

        def seen(text: str) -> bool:
            return any(text in r.getMessage() for r in caplog.records)

        await wait_until(lambda: seen("hello from print") and seen("raw-fd1:hello from print"))
        await wait_until(lambda: seen("from the worker: careful"))
        loggers = {r.name for r in caplog.records if "hello from print" in r.getMessage()}
        assert loggers == {"snakepool.worker.noisy.0"}
        warned = [r for r in caplog.records if "careful" in r.getMessage()]
        assert warned[0].levelno == logging.WARNING


# --- lifecycle ----------------------------------------------------------------------


async def test_closed_pool_refuses_calls_and_leaves_no_processes(tmp_path: Path) -> None:
    pool = snakepool.Pool(ADAPTER, size=2, adapter_config={"teardown_marker": str(tmp_path)})
    await pool.start()
    pids = [w.pid for w in pool.statistics().workers]
    await pool.aclose()
    await pool.aclose()  # idempotent
    with pytest.raises(PoolClosed):
        await pool.call("add", {"a": 1, "b": 2})
    with pytest.raises(PoolClosed):
        pool.stream("count", {"n": 1})
    assert all(not psutil.pid_exists(pid) for pid in pids)
    # teardown() ran in every worker on the graceful close
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"teardown-{pid}" for pid in pids)


async def test_unstarted_pool_says_so() -> None:
    pool = snakepool.Pool(ADAPTER, size=1)
    with pytest.raises(RuntimeError, match="not started"):
        await pool.call("add", {"a": 1, "b": 2})


async def test_close_drains_inflight_calls() -> None:
    pool = snakepool.Pool(ADAPTER, size=1)
    await pool.start()
    try:
        results: list[object] = []

        async def nap() -> None:
            results.append(await pool.call("nap", {"seconds": 0.3}))

        async with anyio.create_task_group() as tg:
            tg.start_soon(nap)
            await wait_until(lambda: pool.statistics().workers[0].inflight == 1)
            await pool.aclose()
        assert len(results) == 1 and isinstance(results[0], dict)
    finally:
        await pool.aclose()  # (after a failure: no worker left behind)


async def test_handler_grandchildren_die_with_their_worker() -> None:
    async with snakepool.Pool(ADAPTER, size=1) as pool:
        grandchild = await pool.call("spawn_grandchild")
        assert psutil.pid_exists(grandchild)
    await wait_until(
        lambda: (
            not psutil.pid_exists(grandchild)
            or psutil.Process(grandchild).status() == psutil.STATUS_ZOMBIE
        )
    )


async def test_listeners_get_telemetry_events() -> None:
    events: list[snakepool.Event] = []
    pool = snakepool.Pool(ADAPTER, size=1, name="watched")
    pool.add_listener(events.append)
    async with pool:
        await pool.call("add", {"a": 1, "b": 2})
        with pytest.raises(RemoteError):
            await pool.call("fail", {"how": "exception"})
        with pytest.raises(WorkerCrashed):
            await pool.call("fail", {"how": "exit_code"})
        await wait_until(lambda: sum(e.name == "worker.started" for e in events) == 2)
    names = [e.name for e in events]
    for expected in ("worker.started", "call.completed", "call.failed", "worker.exited"):
        assert expected in names
    assert all(e.pool == "watched" for e in events)
    failed = [e for e in events if e.name == "call.failed"]
    assert [e.data["category"] for e in failed] == ["application", "communication"]
    crashed_exit = next(e for e in events if e.name == "worker.exited")
    assert crashed_exit.data["exit"] == "code 7"
    assert crashed_exit.data["planned"] is False


async def test_var_keyword_commands_get_their_extra_arguments_flat() -> None:
    async with snakepool.Pool("sp_adapters:Kwargs", size=1) as pool:
        result = await pool.call("collect", {"first": 1, "a": 2, "b": "x"})
        assert result == {"first": 1, "rest": {"a": 2, "b": "x"}, "session": None}
