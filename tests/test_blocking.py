"""BlockingPool: the same API for synchronous code, with real processes."""

from __future__ import annotations

import threading

import psutil
import pytest

import snakepool
from conftest import wait_for
from snakepool import BlockingPool, PoolClosed, RemoteError, WorkerCrashed

ADAPTER = "sp_adapters:Basic"


def test_call_stream_cast_and_statistics() -> None:
    with BlockingPool(ADAPTER, size=2) as pool:
        assert pool.call("add", {"a": 2, "b": 3}) == 5
        assert list(pool.stream("count", {"n": 4})) == [0, 1, 2, 3]
        pool.cast("add", {"a": 1, "b": 1})
        wait_for(lambda: pool.statistics().completed == 3)
        stats = pool.statistics()
        assert isinstance(stats, snakepool.PoolStatistics)
        assert stats.size == 2
        with pytest.raises(RemoteError, match="the handler blew up"):
            pool.call("fail", {"how": "exception"})


def test_breaking_out_of_a_stream_cancels_it_in_the_worker() -> None:
    with BlockingPool(ADAPTER, size=1) as pool:
        for item in pool.stream("endless"):
            if item == 3:
                break
        wait_for(lambda: pool.statistics().workers[0].inflight == 0)
        assert pool.statistics().workers[0].restarts == 0


def test_crash_is_reported_and_the_pool_recovers() -> None:
    with BlockingPool(ADAPTER, size=1) as pool:
        with pytest.raises(WorkerCrashed, match="SIGKILL"):
            pool.call("fail", {"how": "sigkill"})
        wait_for(lambda: pool.statistics().ready_workers == 1)
        assert pool.call("add", {"a": 1, "b": 1}) == 2


def test_calls_from_many_threads() -> None:
    with BlockingPool(ADAPTER, size=2, worker_concurrency=2) as pool:
        results: list[int] = []
        lock = threading.Lock()

        def work(i: int) -> None:
            value = pool.call("add", {"a": i, "b": i})
            with lock:
                results.append(value)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(results) == [2 * i for i in range(16)]


def test_close_stops_workers_and_refuses_calls() -> None:
    pool = BlockingPool(ADAPTER, size=2)
    pool.start()
    pids = [w.pid for w in pool.statistics().workers]
    pool.close()
    assert all(not psutil.pid_exists(pid) for pid in pids)
    with pytest.raises(PoolClosed):
        pool.call("add", {"a": 1, "b": 1})


def test_start_failure_raises_and_cleans_up() -> None:
    pool = BlockingPool(ADAPTER, size=1, adapter_config={"fail_setup": "exception"})
    with pytest.raises(snakepool.WorkerStartError, match="Boom"):
        pool.start()


def test_sessions_variables_and_tools_without_await() -> None:
    with BlockingPool("sp_adapters:Stateful", size=2) as pool:
        pool.register_tool("double", lambda x: 2 * x)
        with pool.session() as session:
            session.variables.define("temperature", "float", 0.5, {"max": 1.0})
            session.variables.set("temperature", 0.75)
            assert session.call("var", {"name": "temperature"}) == 0.75
            with pytest.raises(ValueError, match="above max"):
                session.variables.set("temperature", 2.0)
            assert session.variables.get_many(["temperature"]) == {"temperature": 0.75}
            assert session.call("use_tool", {"name": "double", "args": {"x": 21}}) == 42
            pid = session.call("remember", {"key": "k", "value": [1, 2]})
            assert session.call("recall", {"key": "k"})["pid"] == pid
