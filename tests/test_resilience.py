"""Health checks, recycling, the breaker, recovery policies and process hygiene, for real."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import anyio
import psutil
import pytest

import snakepool
from conftest import SHARED_PROCESSES, TESTS_DIR
from snakepool import CallTimeout, CircuitOpen, RemoteError, ResourceExceeded, WorkerCrashed
from snakepool.pool._registry import RunRegistry
from waiting import all_ready, count_pings, gone, restarts, wait_until

pytestmark = pytest.mark.anyio

ADAPTER = "sp_adapters:Resilience"


# --- health ---------------------------------------------------------------------


async def test_a_worker_that_misses_its_health_check_is_replaced() -> None:
    async with snakepool.Pool(ADAPTER, size=1, health_interval=0.2, health_timeout=0.5) as pool:
        with pytest.raises(WorkerCrashed, match="missed its health check"):
            await pool.call("block_loop", {"seconds": 60})
        await wait_until(lambda: restarts(pool) == 1 and all_ready(pool))
        assert await pool.call("add", {"a": 1, "b": 1}) == 2


async def test_health_checks_leave_busy_but_healthy_workers_alone(tmp_path: Path) -> None:
    # health_timeout leaves room for a stalled machine; that a busy worker answers
    # pings is checked directly, while calls that only the test ends keep it busy.
    release = tmp_path / "release"
    async with snakepool.Pool(ADAPTER, size=1, health_interval=0.1, health_timeout=2.0) as pool:
        worker = pool._workers[0]
        checks = count_pings(worker)
        busy = lambda: pool.statistics().workers[0].inflight == 1  # noqa: E731
        results: list[dict[str, float]] = []

        async def hold() -> None:
            results.append(await pool.call("hold", {"release": str(release)}))

        async with anyio.create_task_group() as tg:
            tg.start_soon(hold)
            await wait_until(busy)
            assert await worker.ping(5.0)  # answered while the call runs
            await wait_until(lambda: checks.answered >= checks.seen + 3)  # health checks
            release.touch()
        assert results[0]["pid"] == pool.statistics().workers[0].pid
        # A sync handler runs in a thread: the worker's loop still answers pings.
        async with anyio.create_task_group() as tg:
            tg.start_soon(pool.call, "cooperative")
            await wait_until(busy)
            assert await worker.ping(5.0)
            checks.seen = checks.answered
            await wait_until(lambda: checks.answered >= checks.seen + 3)  # health checks
            tg.cancel_scope.cancel()  # the caller leaves: the call is cancelled
        assert restarts(pool) == 0


# --- recycling --------------------------------------------------------------------


async def test_max_requests_recycles_as_a_planned_exit() -> None:
    events: list[snakepool.Event] = []
    pool = snakepool.Pool(ADAPTER, size=1, max_requests=4)
    pool.add_listener(events.append)
    async with pool:
        pids = [await pool.call("pid") for _ in range(10)]
    assert len(set(pids)) == 3  # 4 + 4 + 2
    assert pids[:4] == [pids[0]] * 4
    recycled = [e for e in events if e.name == "worker.recycled"]
    assert len(recycled) >= 2
    assert "max_requests" in recycled[0].data["reason"]
    exits = [e for e in events if e.name == "worker.exited"]
    assert all(e.data["planned"] for e in exits)
    assert pool.statistics().failed == {}
    assert pool.statistics().breaker_state == "closed"


async def test_worker_ttl_recycles_idle_workers() -> None:
    events: list[snakepool.Event] = []
    pool = snakepool.Pool(ADAPTER, size=1, worker_ttl=0.5, health_interval=0.1)
    pool.add_listener(events.append)
    async with pool:
        first = await pool.call("pid")
        await wait_until(lambda: any(e.name == "worker.recycled" for e in events))
        await wait_until(lambda: all_ready(pool))
        assert await pool.call("pid") != first
    assert "worker_ttl" in next(e for e in events if e.name == "worker.recycled").data["reason"]


async def test_memory_leak_is_recycled_without_failing_the_call() -> None:
    events: list[snakepool.Event] = []
    pool = snakepool.Pool(ADAPTER, size=1, max_memory_mb=120)
    pool.add_listener(events.append)
    async with pool:
        first = await pool.call("leak", {"mb": 150})  # finishes; the worker is then recycled
        await wait_until(lambda: any(e.name == "worker.recycled" for e in events))
        await wait_until(lambda: all_ready(pool))
        second = await pool.call("leak", {"mb": 1})
        assert second != first
        reason = next(e for e in events if e.name == "worker.recycled").data["reason"]
        assert "max_memory_mb=120" in reason
        assert pool.statistics().failed == {}


async def test_memory_limit_with_replace_policy_fails_inflight_calls_as_resource() -> None:
    pool = snakepool.Pool(
        ADAPTER, size=1, max_memory_mb=100, health_interval=0.1, recovery={"resource": "replace"}
    )
    async with pool:
        with pytest.raises(ResourceExceeded, match="max_memory_mb=100"):
            await pool.call("leak_and_wait", {"mb": 130, "seconds": 30})
        await wait_until(lambda: restarts(pool) == 1 and all_ready(pool))
        assert pool.statistics().failed == {"resource": 1}
        assert pool.statistics().breaker_state == "closed"
        assert await pool.call("add", {"a": 1, "b": 2}) == 3


# --- the circuit breaker ---------------------------------------------------------


async def test_breaker_opens_fails_fast_then_half_open_probe_closes_it() -> None:
    events: list[str] = []
    pool = snakepool.Pool(ADAPTER, size=1, breaker_threshold=2, breaker_reset_timeout=0.5)
    pool.add_listener(lambda e: events.append(e.name))
    async with pool:
        for _ in range(2):
            with pytest.raises(WorkerCrashed):
                await pool.call("fail", {"how": "sigkill"})
        assert pool.statistics().breaker_state == "open"
        with pytest.raises(CircuitOpen):
            await pool.call("add", {"a": 1, "b": 1})
        with pytest.raises(CircuitOpen):
            await pool.cast("add", {"a": 1, "b": 1})
        assert pool.statistics().queued == 0
        await wait_until(lambda: pool.statistics().breaker_state == "half_open" and all_ready(pool))
        assert await pool.call("add", {"a": 2, "b": 2}) == 4  # the probe
        assert pool.statistics().breaker_state == "closed"
        assert pool.statistics().failed["overload"] == 2
    assert events.index("breaker.opened") < events.index("breaker.closed")


async def test_application_errors_never_open_the_breaker() -> None:
    async with snakepool.Pool(ADAPTER, size=1, breaker_threshold=2) as pool:
        for _ in range(5):
            with pytest.raises(RemoteError):
                await pool.call("fail", {"how": "exception"})
        assert pool.statistics().breaker_state == "closed"


# --- recovery policy overrides ---------------------------------------------------


async def test_recovery_override_recycles_after_an_application_error() -> None:
    async with snakepool.Pool(ADAPTER, size=1, recovery={"application": "recycle"}) as pool:
        first = await pool.call("pid")
        with pytest.raises(RemoteError):
            await pool.call("fail", {"how": "exception"})
        await wait_until(lambda: restarts(pool) == 1 and all_ready(pool))
        assert await pool.call("pid") != first


async def test_recovery_override_can_keep_a_timed_out_worker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # (drain_grace: the hung call would hold the close for the default 10 s)
    pool = snakepool.Pool(
        ADAPTER,
        size=2,
        recovery={"timeout": "none"},
        cancel_grace=0.2,
        stop_grace=0.5,
        drain_grace=0.2,
    )
    watched: list[str] = []  # the watch that kills a call ignoring its cancel

    async def watch(worker: object, call: object) -> None:
        watched.append(repr(call))

    monkeypatch.setattr(pool._route, "_watch_abandoned", watch)
    async with pool:
        with pytest.raises(CallTimeout):
            await pool.call("hang", timeout=0.2)
        # The timeout policy "none" decided when the call was abandoned, which
        # happened before CallTimeout reached us: nothing will kill the worker.
        assert watched == []
        assert restarts(pool) == 0
        assert await pool.call("add", {"a": 1, "b": 1}) == 2  # the other worker serves
        assert any(w.inflight == 1 for w in pool.statistics().workers)  # still hung there


async def test_idempotent_retry_can_be_turned_off(tmp_path: Path) -> None:
    async with snakepool.Pool(ADAPTER, size=2, recovery={"communication": "replace"}) as pool:
        with pytest.raises(WorkerCrashed):
            await pool.call("fail_once", {"marker": str(tmp_path / "m")}, idempotent=True)


# --- process hygiene ---------------------------------------------------------------


@pytest.mark.parametrize("mode", ["async", "blocking"])
def test_workers_die_within_3s_when_the_host_is_sigkilled(mode: str) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS_DIR), *sys.path]))
    host = subprocess.Popen(
        [sys.executable, str(TESTS_DIR / "sp_host.py"), mode, "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
        text=True,
    )
    try:
        assert host.stdout is not None
        pids = json.loads(host.stdout.readline())
        assert len(pids) == 2
        assert all(psutil.pid_exists(pid) for pid in pids)
        host.send_signal(signal.SIGKILL)
        host.wait(timeout=10)
        deadline = time.monotonic() + 3.0
        while not all(gone(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert all(gone(pid) for pid in pids), "workers outlived their SIGKILLed host"
    finally:
        host.kill()
        host.wait()


async def test_a_hung_handler_and_its_grandchild_are_gone_after_the_timeout(tmp_path: Path) -> None:
    pid_file = tmp_path / "grandchild.pid"
    async with snakepool.Pool(ADAPTER, size=1) as pool:
        pool.cancel_grace = 0.3
        worker_pid = pool.statistics().workers[0].pid
        assert worker_pid is not None
        with pytest.raises(CallTimeout):
            await pool.call("spawn_and_hang", {"pid_file": str(pid_file)}, timeout=1.0)
        grandchild = int(pid_file.read_text())
        await wait_until(lambda: gone(worker_pid) and gone(grandchild))
        await wait_until(lambda: all_ready(pool))


async def test_fifty_open_close_cycles_leak_no_fds_or_processes() -> None:
    me = psutil.Process()

    async def cycle() -> None:
        async with snakepool.Pool(ADAPTER, size=2) as pool:
            assert await pool.call("add", {"a": 1, "b": 2}) == 3

    await cycle()  # warm-up: lazily created loop resources (thread pools, selectors)
    fds_before = me.num_fds()
    for _ in range(50):
        await cycle()
    children = [c for c in me.children(recursive=True) if c.pid not in SHARED_PROCESSES]
    assert [c for c in children if not gone(c.pid)] == []
    assert me.num_fds() <= fds_before


def test_run_registry_reaps_leftovers_of_a_dead_host_only(tmp_path: Path) -> None:
    # A "host" that records a worker which survives it (a sleeper in its own
    # session, as a worker on an OS without PR_SET_PDEATHSIG would), then dies.
    script = f"""
import subprocess, sys
sys.path[:0] = {sys.path!r}
from pathlib import Path
from snakepool.pool._registry import RunRegistry
sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
RunRegistry("reaptest", Path({str(tmp_path)!r})).add(sleeper.pid)
print(sleeper.pid, flush=True)
"""
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=30
    )
    leftover = int(out.stdout.strip())
    try:
        assert psutil.pid_exists(leftover)
        # Our own live entry (this process as host) must never be reaped.
        mine = subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True
        )
        ours = RunRegistry("reaptest", tmp_path)
        ours.add(mine.pid)
        try:
            other_pool = RunRegistry("reaptest-other", tmp_path)
            assert other_pool.reap_leftovers() == []
            assert RunRegistry("reaptest", tmp_path).reap_leftovers() == [leftover]
            deadline = time.monotonic() + 5
            while not gone(leftover) and time.monotonic() < deadline:
                time.sleep(0.02)
            assert gone(leftover)
            assert mine.poll() is None  # untouched
        finally:
            ours.remove(mine.pid)
            mine.kill()
            mine.wait()
    finally:
        if not gone(leftover):
            os.kill(leftover, signal.SIGKILL)
