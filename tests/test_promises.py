"""Promises a new user relies on (issue 15): overload fails fast, restore_session
always runs on a session's later workers, no call time limit by default, a
handler's ValueError is a ValueError, and messages that say what to do."""

from __future__ import annotations

import math
import os
import pickle
import signal
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

import snakepool
import sp_promises
from conftest import free_port, start_redis_server, stop_redis_server
from snakepool import (
    CallTimeout,
    ErrorCategory,
    PoolClosed,
    PoolOverloaded,
    RemoteError,
    UnknownCommand,
    WorkerCrashed,
)
from snakepool.adapters import Adapter
from snakepool.pool._config import OPTION_ALIASES, PoolConfig, did_you_mean
from waiting import wait_for_count, wait_until

pytestmark = pytest.mark.anyio

ADAPTER = "sp_promises:Promises"


def inflight(pool: snakepool.Pool, slot: int = 0) -> int:
    return pool.statistics().workers[slot].inflight


# --- 1. overload fails fast, even on a cold pool -------------------------------------------


async def test_a_cold_pool_refuses_calls_beyond_queue_size_at_once(tmp_path: Path) -> None:
    """1 running + queue_size waiting (sent ahead or queued): the other 5 of 8 fail at once."""
    release = tmp_path / "release"
    pool = snakepool.Pool(ADAPTER, size=1, queue_size=2)
    outcomes: list[object] = []
    try:
        await pool.start()

        async def one() -> None:
            try:
                outcomes.append(await pool.call("hold", {"release": str(release)}))
            except PoolOverloaded as exc:
                outcomes.append(exc)

        async with anyio.create_task_group() as tg:
            for _ in range(8):
                tg.start_soon(one)
            # The refusals come while the first call still holds the worker.
            refused = lambda: sum(isinstance(o, PoolOverloaded) for o in outcomes)  # noqa: E731
            await wait_for_count(refused, 5)
            assert inflight(pool) + pool.statistics().queued == 3  # 1 running + 2 waiting
            assert pool._dispatcher.waiting_ahead() + pool.statistics().queued == 2
            release.touch()
        done = [o for o in outcomes if isinstance(o, dict)]
        assert len(done) == 3 and len(outcomes) == 8
        message = str(next(o for o in outcomes if isinstance(o, PoolOverloaded)))
        assert "queue_size=2" in message and "sent ahead" in message
        # Everything that waited has started and finished: nothing counts as waiting.
        assert pool._dispatcher.waiting_ahead() == 0
        assert await pool.call("whoami") is not None
    finally:
        release.touch()
        await pool.aclose()


async def test_calls_sent_ahead_and_queued_share_queue_size(tmp_path: Path) -> None:
    """A warm worker answering slowly holds fewer calls ahead; the rest queue in the
    pool; together they never exceed queue_size, and a freed place admits again."""
    release = tmp_path / "release"
    pool = snakepool.Pool(ADAPTER, size=1, queue_size=3)
    try:
        await pool.start()
        pool._workers[0].ahead = 1  # (as after slow answers: 1 held beyond the running one)
        async with anyio.create_task_group() as tg:
            tg.start_soon(pool.call, "hold", {"release": str(release)})
            await wait_for_count(lambda: inflight(pool), 1)
            for _ in range(3):  # 1 sent ahead, 2 in the pool's queue
                tg.start_soon(pool.call, "whoami")
            await wait_for_count(lambda: inflight(pool) + pool.statistics().queued, 4)
            assert pool._dispatcher.waiting_ahead() == 1 and pool.statistics().queued == 2
            with pytest.raises(PoolOverloaded, match="3 calls are waiting"):
                await pool.call("whoami")
            with pytest.raises(PoolOverloaded):
                await pool.cast("whoami")
            release.touch()
        assert pool._dispatcher.waiting_ahead() == 0 and pool.statistics().queued == 0
    finally:
        release.touch()
        await pool.aclose()


# --- 2. restore_session runs on every later worker, with {} when nothing was saved --------


async def test_restore_session_runs_with_an_empty_dict_when_the_session_moves() -> None:
    pool = snakepool.Pool(ADAPTER, size=2)
    try:
        await pool.start()
        async with pool.session() as session:
            first = await session.call("whoami")
            assert first["restores"] == []  # its first worker restores nothing
            assert (await session.call("whoami"))["restores"] == []  # nor on its next call
            with pytest.raises(WorkerCrashed):
                await session.call("die")  # its worker dies; nothing was ever saved
            moved = await session.call("whoami")
            assert moved["pid"] != first["pid"]
            assert moved["restores"] == [{"pid": moved["pid"], "state": {}}]
            again = await session.call("whoami")  # once per worker, not per call
            assert again["restores"] == moved["restores"]
    finally:
        await pool.aclose()


@pytest.mark.parametrize("store", ["memory", "redis"])
async def test_concurrent_first_calls_on_the_first_worker_restore_nothing(
    store: str, request: pytest.FixtureRequest
) -> None:
    url = store if store == "memory" else request.getfixturevalue("redis_url")
    pool = snakepool.Pool(ADAPTER, size=1, worker_concurrency=8, session_store=url)
    try:
        await pool.start()
        async with pool.session() as session:
            results: list[dict[str, Any]] = []

            async def one() -> None:
                results.append(await session.call("whoami"))

            async with anyio.create_task_group() as tg:
                for _ in range(8):
                    tg.start_soon(one)
            assert [r["restores"] for r in results] == [[]] * 8
    finally:
        await pool.aclose()


async def test_restore_session_runs_when_hint_affinity_falls_back(tmp_path: Path) -> None:
    release = tmp_path / "release"
    pool = snakepool.Pool(ADAPTER, size=2, send_ahead=0)  # (a busy worker holds no calls)
    try:
        await pool.start()
        async with pool.session() as session, anyio.create_task_group() as tg:
            first = await session.call("whoami")
            # Its worker busy (held, no timer): the next call lands on the other one.
            tg.start_soon(session.call, "hold", {"release": str(release)})
            await wait_until(lambda: sum(w.inflight for w in pool.statistics().workers) == 1)
            other = await session.call("whoami")
            assert other["pid"] != first["pid"]
            assert other["restores"] == [{"pid": other["pid"], "state": {}}]
            release.touch()
    finally:
        release.touch()
        await pool.aclose()


async def test_restore_session_gets_the_saved_state_when_there_is_some() -> None:
    pool = snakepool.Pool(ADAPTER, size=2)
    try:
        await pool.start()
        async with pool.session() as session:
            pid = await session.call("remember", {"key": "k", "value": [1, 2]})
            os.kill(pid, signal.SIGKILL)
            await wait_until(lambda: pid not in {w.pid for w in pool.statistics().workers})
            moved = await session.call("whoami")
            assert moved["restores"] == [{"pid": moved["pid"], "state": {"k": [1, 2]}}]
    finally:
        await pool.aclose()


# --- 5. no call time limit by default ------------------------------------------------------


async def test_calls_have_no_time_limit_by_default(tmp_path: Path) -> None:
    assert PoolConfig(adapter="generic").call_timeout is None
    release = tmp_path / "release"
    limited = snakepool.Pool(ADAPTER, size=1, call_timeout=0.5, name="limited")
    unlimited = snakepool.Pool(ADAPTER, size=2, name="unlimited")
    assert unlimited.config.call_timeout is None
    try:
        await limited.start()
        await unlimited.start()
        assert await unlimited.call("deadline") is None  # the worker is given no deadline
        async with unlimited.session() as session:
            assert await session.call("deadline") is None
        results: dict[str, Any] = {}

        async def plain() -> None:
            results["plain"] = await unlimited.call("hold", {"release": str(release)})

        async def in_session() -> None:
            async with unlimited.session() as s:
                results["session"] = await s.call("hold", {"release": str(release)})

        async with anyio.create_task_group() as tg:
            tg.start_soon(plain)
            tg.start_soon(in_session)
            await wait_until(lambda: sum(w.inflight for w in unlimited.statistics().workers) == 2)
            deadlines = unlimited._deadlines
            assert deadlines is not None and len(deadlines) == 0  # none was set for them
            started = time.monotonic()
            with pytest.raises(CallTimeout, match=r"0\.5s"):  # the same hold, with a limit
                await limited.call("hold", {"release": str(release)})
            assert time.monotonic() - started >= 0.5
            # Past that limit, the calls without one still run.
            assert sum(w.inflight for w in unlimited.statistics().workers) == 2
            release.touch()
        assert set(results) == {"plain", "session"}
        assert all(r["end"] - r["start"] >= 0.5 for r in results.values())
    finally:
        release.touch()
        await limited.aclose()
        await unlimited.aclose()


async def test_an_infinite_time_limit_is_no_limit() -> None:
    """``inf``, as ``call_timeout`` or a call's ``timeout``, means what None means
    (it once failed every call with "cannot convert float NaN to integer")."""
    async with snakepool.Pool(ADAPTER, size=1, call_timeout=math.inf) as pool:
        assert await pool.call("deadline") is None  # the worker is given no deadline
        assert await pool.call("deadline", timeout=math.inf) is None
        async with pool.session() as session:
            assert await session.call("deadline", timeout=math.inf) is None
        assert pool._deadlines is not None and len(pool._deadlines) == 0


def test_every_default_is_a_documented_option() -> None:
    """The graces and send_ahead are options like the others (Pool, pools.toml)."""
    pool = snakepool.Pool("generic", size=1)
    assert (pool.send_ahead, pool.drain_grace, pool.stop_grace, pool.cancel_grace) == (
        64,
        10.0,
        3.0,
        2.0,
    )
    tuned = snakepool.Pool("generic", size=1, send_ahead=0, drain_grace=0.5, cancel_grace=1)
    assert (tuned.send_ahead, tuned.drain_grace, tuned.cancel_grace) == (0, 0.5, 1.0)
    assert tuned.config.send_ahead == 0
    with pytest.raises(ValueError, match="drain_grace"):
        snakepool.Pool("generic", drain_grace=-1)
    with pytest.raises(ValueError, match="send_ahead"):
        snakepool.Pool("generic", send_ahead=-1)
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for name in PoolConfig.__dataclass_fields__:
        if name != "gpu_slots":
            assert f"| `{name}` |" in readme, f"{name} is missing from the README's table"


async def test_call_timeout_none_is_accepted_and_zero_is_refused() -> None:
    assert PoolConfig(adapter="generic", call_timeout=None).call_timeout is None
    with pytest.raises(ValueError, match="call_timeout must be a number > 0 or None"):
        PoolConfig(adapter="generic", call_timeout=0)


# --- 7. a handler's ValueError is a ValueError ----------------------------------------------


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("ValueError", ValueError),
        ("KeyError", KeyError),
        ("ZeroDivisionError", ZeroDivisionError),
        ("FileNotFoundError", FileNotFoundError),
        ("UnicodeDecodeError", UnicodeDecodeError),  # an __init__ of five arguments
        ("CustomError", sp_promises.CustomError),  # module:qualname imported on the host
        ("NoPickleRepr", sp_promises.NoPickleRepr),
    ],
)
async def test_a_handlers_exception_is_caught_by_its_own_type(
    kind: str, expected: type[Exception]
) -> None:
    async with snakepool.Pool(ADAPTER, size=1) as pool:
        with pytest.raises(expected) as caught:
            await pool.call("raise_", {"kind": kind})
        error = caught.value
        assert isinstance(error, RemoteError) and isinstance(error, expected)
        assert type(error).__name__ == f"RemoteError_{expected.__name__}"
        assert error.category is ErrorCategory.APPLICATION
        assert error.remote_type.rsplit(".", 1)[-1] == kind
        assert error.remote_message and "Traceback" in error.remote_traceback
        assert str(error).startswith(f"{error.remote_type}: ")
        repr(error)  # (not the original type's repr, whose fields are unset)
        # except RemoteError still works, and the breaker does not count it
        with pytest.raises(RemoteError):
            await pool.call("raise_", {"kind": kind})
        assert pool.statistics().breaker_state == "closed"
        copy = pickle.loads(pickle.dumps(error))
        assert type(copy) is type(error)
        assert (copy.remote_type, copy.remote_message, copy.remote_traceback) == (
            error.remote_type,
            error.remote_message,
            error.remote_traceback,
        )


async def test_types_that_are_not_combined_stay_plain_remote_errors() -> None:
    async with snakepool.Pool(ADAPTER, size=1) as pool:
        for kind in ("WorkerOnlyError", "StopIteration", "SystemExit"):
            with pytest.raises(RemoteError) as caught:
                await pool.call("raise_", {"kind": kind})
            assert type(caught.value) is RemoteError, kind
        assert "sp_worker_only" not in sys.modules  # the host imported nothing for it
        with pytest.raises(UnknownCommand) as unknown:
            await pool.call("no_such_command")
        assert type(unknown.value) is UnknownCommand


def test_remote_errors_combine_without_a_worker() -> None:
    error = RemoteError("KeyError", "'k'", "tb")
    assert isinstance(error, KeyError) and isinstance(error, LookupError)
    assert str(error) == "KeyError: 'k'\n--- remote traceback ---\ntb"  # not KeyError's quoting
    assert type(RemoteError("KeyError", "x")) is type(error)  # made once, cached
    assert error.category is ErrorCategory.APPLICATION
    command = UnknownCommand("ValueError", "x")
    assert isinstance(command, UnknownCommand) and isinstance(command, ValueError)
    # an OSError subclass has another C layout: still combined (made by OSError.__new__)
    os_error = RemoteError("ConnectionResetError", "reset")
    assert isinstance(os_error, ConnectionResetError) and isinstance(os_error, OSError)
    assert type(RemoteError("ExceptionGroup", "x")) is RemoteError  # cannot be made: plain
    assert type(RemoteError("snakepool.errors.PoolClosed", "x")) is RemoteError
    assert type(RemoteError("NotAType", "x")) is RemoteError
    plain = RemoteError("Whatever", "m", "tb")
    assert type(pickle.loads(pickle.dumps(plain))) is RemoteError


# --- 8. messages that say what to do --------------------------------------------------------


async def test_entering_a_closed_pool_says_it_is_closed() -> None:
    pool = snakepool.Pool(ADAPTER, size=1)
    async with pool:
        pass
    with pytest.raises(PoolClosed, match="create a new Pool"):
        async with pool:
            pass
    never_started = snakepool.Pool(ADAPTER, size=1)
    await never_started.aclose()
    with pytest.raises(PoolClosed, match="create a new Pool"):
        await never_started.start()


def test_options_of_other_libraries_suggest_the_snakepool_name() -> None:
    with pytest.raises(TypeError, match=r"'max_workers' \(did you mean 'size'\?\)"):
        snakepool.Pool("generic", max_workers=4)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match=r"'timeout' \(did you mean 'call_timeout'\?\)"):
        snakepool.Pool("generic", timeout=4)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match=r"'qeue_size' \(did you mean 'queue_size'\?\)"):
        snakepool.Pool("generic", qeue_size=4)  # type: ignore[call-arg]
    keys = ("size", "call_timeout", "max_requests", "queue_size")
    assert did_you_mean("max_workers", keys) == " (did you mean 'size'?)"
    assert did_you_mean("processes", keys) == " (did you mean 'size'?)"
    assert did_you_mean("timeout", keys) == " (did you mean 'call_timeout'?)"
    assert did_you_mean("max_request", keys) == " (did you mean 'max_requests'?)"
    assert did_you_mean("zzz", keys) == ""
    assert set(OPTION_ALIASES.values()) <= set(PoolConfig.__dataclass_fields__)


def test_an_adapter_defined_in_main_is_refused_with_what_to_do() -> None:
    class InMain(Adapter):
        pass

    InMain.__module__ = "__main__"
    InMain.__qualname__ = "InMain"
    with pytest.raises(ValueError, match="move it into an importable module"):
        snakepool.Pool(InMain)
    with pytest.raises(ValueError, match="move it into an importable module"):
        snakepool.Pool("__main__:InMain")
    with pytest.raises(ValueError, match="inside a function"):
        snakepool.Pool("sp_promises:make.<locals>.Local")


async def test_a_hung_session_store_is_named_in_the_timeout(tmp_path: Path) -> None:
    pytest.importorskip("redis", reason="redis-py is not installed: pip install -e '.[dev]'")
    port = free_port()
    redis = start_redis_server(port)
    stopped = False
    pool = snakepool.Pool(ADAPTER, size=1, session_store=f"redis://127.0.0.1:{port}/0")
    try:
        await pool.start()
        session = await pool.session().open()
        await session.call("whoami")
        redis.send_signal(signal.SIGSTOP)  # hung, not down: connections stay open
        stopped = True
        with pytest.raises(CallTimeout) as caught:
            await session.call("whoami", timeout=1.0)
        message = str(caught.value)
        assert f"session store redis://127.0.0.1:{port}/0" in message
        assert "free worker" not in message
        redis.send_signal(signal.SIGCONT)
        stopped = False
        assert (await session.call("whoami"))["restores"] == []
    finally:
        if stopped:
            redis.send_signal(signal.SIGCONT)
        with anyio.move_on_after(30):
            await pool.aclose()
        stop_redis_server(redis)
