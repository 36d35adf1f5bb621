"""snakepool.Executor (issue 25): a drop-in concurrent.futures.Executor with snakepool's
failure semantics. CPython's own tests run against it in tests/test_executor_stdlib.py."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import pickle
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest

import snakepool
import sp_executor
from snakepool import CallTimeout, ExecutorBroken, RemoteError, WorkerCrashed, WorkerStartError
from sp_executor import CustomError
from waiting import wait_for

SRC = str(Path(snakepool.__file__).resolve().parents[1])


def run_script(tmp_path: Path, code: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``code`` as a program's ``__main__`` (so its functions live in ``__main__``)."""
    script = tmp_path / "program.py"
    script.write_text(textwrap.dedent(code))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=tmp_path,
        check=False,
    )


def worker_pids(executor: snakepool.Executor) -> list[int | None]:
    return [w.pid for w in executor.statistics().workers]


def in_a_worker(executor: snakepool.Executor, calls: int = 1) -> bool:
    """Every worker is up and ``calls`` calls run in them."""
    workers = executor.statistics().workers
    return all(w.pid for w in workers) and sum(w.inflight for w in workers) == calls


# --- the concurrent.futures API ---------------------------------------------------------------


def test_submit_and_map_with_and_without_chunks() -> None:
    with snakepool.Executor(2) as executor:
        assert isinstance(executor, concurrent.futures.Executor)
        assert executor.max_workers == 2
        assert executor.submit(pow, 2, 10).result() == 1024
        assert executor.submit(sp_executor.noop, x={"fn": 1}).result() == {"fn": 1}
        assert list(executor.map(pow, range(10), range(10))) == [i**i for i in range(10)]
        for chunksize in (1, 7, 100, 1000):
            assert list(executor.map(abs, range(-50, 50), chunksize=chunksize)) == [
                abs(i) for i in range(-50, 50)
            ]
        assert list(executor.map(pow, [], [])) == []
    with pytest.raises(RuntimeError, match="cannot schedule new futures after shutdown"):
        executor.submit(pow, 2, 2)
    executor.shutdown()  # (again: a no-op)


def test_usable_from_threads_run_in_executor_and_asubmit() -> None:
    with snakepool.Executor(2) as executor:

        def from_a_thread(base: int) -> list[int]:
            futures = [executor.submit(sp_executor.noop, base + i) for i in range(50)]
            return [f.result() for f in futures]

        with concurrent.futures.ThreadPoolExecutor(8) as threads:
            results = list(threads.map(from_a_thread, range(0, 800, 100)))
        assert results == [list(range(base, base + 50)) for base in range(0, 800, 100)]

        async def from_asyncio() -> list[Any]:
            loop = asyncio.get_running_loop()
            many = [loop.run_in_executor(executor, sp_executor.noop, i) for i in range(100)]
            return [
                await asyncio.gather(*many),
                await executor.asubmit(pow, 3, 3),
                await executor.options(timeout=30).asubmit(sp_executor.noop, "x"),
            ]

        assert asyncio.run(from_asyncio()) == [list(range(100)), 27, "x"]


def test_submit_never_refuses_for_load() -> None:
    """The pool may hold 4 waiting calls: thousands wait in the Executor's FIFO instead."""
    with snakepool.Executor(1, queue_size=4) as executor:
        assert list(executor.map(sp_executor.noop, range(3000))) == list(range(3000))
        futures = [executor.submit(sp_executor.noop, i) for i in range(2000)]
        assert [f.result() for f in futures] == list(range(2000))
        assert not executor.statistics().failed


def test_cancel_and_shutdown_cancel_futures(tmp_path: Path) -> None:
    release = tmp_path / "release"
    executor = snakepool.Executor(1)
    try:
        holding = executor.submit(sp_executor.wait_for_file, str(release))
        wait_for(lambda: in_a_worker(executor))
        queued = [executor.submit(sp_executor.noop, i) for i in range(40)]
        assert queued[-1].cancel() and queued[-1].cancelled()
        executor.shutdown(wait=False, cancel_futures=True)
        cancelled = [f for f in queued if f.cancelled()]
        assert len(cancelled) >= 30  # (a few were in the pool already: those run)
    finally:
        release.touch()
        executor.shutdown()
    assert holding.result() > 0
    assert all(f.result() == i for i, f in enumerate(queued) if not f.cancelled())


# --- snakepool's failure semantics ------------------------------------------------------------


def test_a_crashed_worker_fails_only_its_own_future(tmp_path: Path) -> None:
    release = tmp_path / "release"
    with snakepool.Executor(2) as executor:
        holding = executor.submit(sp_executor.wait_for_file, str(release))
        wait_for(lambda: in_a_worker(executor))
        crashing = executor.submit(sp_executor.die)
        with pytest.raises(WorkerCrashed, match="SIGKILL"):
            crashing.result(timeout=30)
        after = [executor.submit(sp_executor.noop, i) for i in range(20)]
        assert [f.result(timeout=30) for f in after] == list(range(20))
        release.touch()
        survivor = holding.result(timeout=30)
        assert survivor in worker_pids(executor)  # (its worker was never touched)
        assert sum(w.restarts for w in executor.statistics().workers) == 1


def test_a_call_over_its_time_limit_kills_only_its_worker(tmp_path: Path) -> None:
    release = tmp_path / "release"
    with snakepool.Executor(2, cancel_grace=0.2) as executor:
        holding = executor.submit(sp_executor.wait_for_file, str(release))
        wait_for(lambda: in_a_worker(executor))
        before = set(worker_pids(executor))
        hung = executor.options(timeout=0.5).submit(sp_executor.hang)
        with pytest.raises(CallTimeout) as caught:
            hung.result(timeout=30)
        assert isinstance(caught.value, TimeoutError)
        wait_for(lambda: sum(w.restarts for w in executor.statistics().workers) == 1)
        release.touch()
        survivor = holding.result(timeout=30)
        after = set(worker_pids(executor))
        assert survivor in before & after and len(before - after) == 1
        assert executor.submit(sp_executor.noop, 1).result(timeout=30) == 1


def test_exceptions_keep_their_type_with_the_remote_traceback() -> None:
    with snakepool.Executor(1) as executor:
        failed = executor.submit(sp_executor.raise_custom, 7)
        error = failed.exception(timeout=30)
        assert isinstance(error, CustomError) and isinstance(error, RemoteError)
        assert error.remote_type == "sp_executor.CustomError"
        assert "in raise_custom" in error.remote_traceback
        assert "code 7" in error.remote_message
        with pytest.raises(ValueError, match="bad value"):
            executor.submit(sp_executor.raise_value_error).result()
        with pytest.raises(ZeroDivisionError):
            list(executor.map(divmod, [1, 1], [1, 0]))


def test_what_cannot_travel_fails_its_future_clearly(tmp_path: Path) -> None:
    with snakepool.Executor(1) as executor:
        with pytest.raises(TypeError, match="cannot pickle"):
            executor.submit(sp_executor.noop, threading.Lock()).result()
        with pytest.raises(pickle.PicklingError, match="cannot be sent back"):
            executor.submit(threading.Lock).result()
        # A module the host imports after its worker started (workers get the
        # host's sys.path as it is when they start): the worker cannot load it.
        (tmp_path / "only_in_the_host.py").write_text("def f():\n    return 1\n")
        sys.path.insert(0, str(tmp_path))
        try:
            import only_in_the_host

            with pytest.raises(pickle.UnpicklingError, match=r"only_in_the_host.*pythonpath"):
                executor.submit(only_in_the_host.f).result()
        finally:
            sys.path.remove(str(tmp_path))
            sys.modules.pop("only_in_the_host", None)
        assert executor.submit(sp_executor.noop, 3).result() == 3


def test_functions_and_classes_from_main_lambdas_and_closures(tmp_path: Path) -> None:
    done = run_script(
        tmp_path,
        """
        import snakepool

        class Point:
            def __init__(self, x):
                self.x = x

        class Refused(Exception):
            pass

        def shifted(point, by):
            return Point(point.x + by)

        def refuse():
            raise Refused("no")

        if __name__ == "__main__":
            offset = 10
            with snakepool.Executor(1) as executor:
                moved = executor.submit(shifted, Point(1), 2).result()
                assert type(moved) is Point and moved.x == 3, moved
                assert list(executor.map(lambda v: v + offset, [1, 2])) == [11, 12]
                try:
                    executor.submit(refuse).result()
                except Refused as exc:
                    assert isinstance(exc, snakepool.RemoteError) and "refuse" in exc.remote_traceback
                print("ok")
        """,
    )
    assert done.returncode == 0 and done.stdout == "ok\n", done.stderr


def test_a_plain_function_is_pickled_once_a_closure_every_time() -> None:
    from snakepool.adapters._executor import function_bytes

    assert function_bytes(sp_executor.noop) is function_bytes(sp_executor.noop)
    cells = [1]

    def closure() -> int:
        return cells[0]

    first = function_bytes(closure)
    cells[0] = 2  # (a closure's cells may change between calls: pickled again)
    assert function_bytes(closure) is not first


def test_without_cloudpickle_main_functions_fail_naming_the_fix(tmp_path: Path) -> None:
    done = run_script(
        tmp_path,
        """
        import sys
        sys.modules["cloudpickle"] = None  # (as if it were not installed)
        import snakepool

        def double(x):
            return 2 * x

        if __name__ == "__main__":
            with snakepool.Executor(1) as executor:
                assert executor.submit(abs, -1).result() == 1  # (plain pickle: fine)
                for fn in (double, lambda x: x):
                    print(executor.submit(fn, 1).exception())
        """,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 2 and all("pip install cloudpickle" in line for line in lines), lines
    assert "'double'" in lines[0] and "<lambda>" in lines[1]


def test_an_executor_left_open_finishes_its_calls_when_the_program_exits(tmp_path: Path) -> None:
    done = run_script(
        tmp_path,
        """
        import atexit, time
        from pathlib import Path

        @atexit.register
        def last():  # (runs after the executor's own exit hook)
            try:
                left_open.submit(abs, 1)
            except RuntimeError as exc:
                print(exc)

        import snakepool

        def write(name):
            time.sleep(0.5)
            Path(name).write_text("done")

        if __name__ == "__main__":
            left_open = snakepool.Executor(1)
            left_open.submit(write, "left-open")
            not_waited = snakepool.Executor(1)
            not_waited.submit(write, "not-waited")
            not_waited.shutdown(wait=False)
        """,
    )
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert done.stdout == "cannot schedule new futures after interpreter shutdown\n"
    assert (tmp_path / "left-open").read_text() == "done"
    assert (tmp_path / "not-waited").read_text() == "done"


# --- initializer ------------------------------------------------------------------------------


def test_the_initializer_runs_in_every_worker_replacements_included(tmp_path: Path) -> None:
    def in_both_workers(executor: snakepool.Executor, release: Path) -> list[Any]:
        both = [executor.submit(sp_executor.initialized, str(release)) for _ in range(2)]
        wait_for(lambda: in_a_worker(executor, 2))
        release.touch()
        return [future.result() for future in both]

    with snakepool.Executor(2, initializer=sp_executor.initialize, initargs=("db", 1)) as executor:
        first = in_both_workers(executor, tmp_path / "first")
        assert len({pid for pid, _ in first}) == 2
        assert all(initialized == [("db", 1)] for _, initialized in first)
        with pytest.raises(WorkerCrashed):
            executor.submit(sp_executor.die).result()
        again = in_both_workers(executor, tmp_path / "again")
        assert {pid for pid, _ in again} != {pid for pid, _ in first}  # (one was replaced)
        assert all(initialized == [("db", 1)] for _, initialized in again)


def test_a_failing_initializer_breaks_the_executor(caplog: pytest.LogCaptureFixture) -> None:
    executor = snakepool.Executor(1, initializer=sp_executor.fail_to_initialize)
    try:
        future = executor.submit(sp_executor.noop, 1)
        error = future.exception(timeout=60)
        assert isinstance(error, ExecutorBroken)
        assert isinstance(error, concurrent.futures.BrokenExecutor)
        assert error.kind == "executor_broken"
        assert isinstance(error.__cause__, WorkerStartError)
        assert "no database" in str(error.__cause__)
        with pytest.raises(ExecutorBroken, match="could not start"):
            executor.submit(sp_executor.noop, 2)
        assert "no database" in caplog.text
    finally:
        executor.shutdown()


# --- snakepool's additions --------------------------------------------------------------------


def test_workers_are_recycled_after_max_requests() -> None:
    with snakepool.Executor(1, max_requests=2) as executor:
        pids = {executor.submit(sp_executor.pid).result() for _ in range(8)}
        assert len(pids) >= 2
        assert executor.statistics().workers[0].restarts >= 1
        assert "max_workers=1 running" in repr(executor)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"max_workers": 0}, ValueError, "max_workers must be greater than 0"),
        ({"max_workers": -1}, ValueError, "max_workers must be greater than 0"),
        ({"max_workers": "2"}, TypeError, "max_workers must be an int or None"),
        ({"size": 2}, TypeError, "pass max_workers"),
        ({"adapter_config": {}}, TypeError, "pass initializer/initargs"),
        ({"initializer": 5}, TypeError, "initializer must be callable"),
        ({"max_worker": 2}, TypeError, "max_worker"),
    ],
)
def test_bad_arguments_say_what_is_wrong(
    kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        snakepool.Executor(**kwargs)


def test_bad_call_arguments_say_what_is_wrong(tmp_path: Path) -> None:
    with snakepool.Executor(1) as executor:
        with pytest.raises(ValueError, match="timeout must be a number of seconds > 0"):
            executor.options(timeout=0)
        with pytest.raises(ValueError, match="chunksize must be an int >= 1"):
            executor.map(abs, [1], chunksize=0)
        with pytest.raises(TypeError, match="is not callable"):
            executor.submit(5)  # type: ignore[arg-type]
        release = tmp_path / "release"
        with pytest.raises(TimeoutError):  # (map's timeout bounds the whole iteration)
            list(executor.map(sp_executor.wait_for_file, [str(release)], timeout=0.2))
        release.touch()
