"""Each failure x each phase (start-up, during a call, during a stream), with real processes.

Whatever happens, only the calls of the failing worker fail, with a
categorized error, and the pool replaces the worker and keeps serving.
"""

from __future__ import annotations

import anyio
import pytest

import snakepool
from conftest import wait_for
from snakepool import ProtocolError, RemoteError, WorkerCrashed, WorkerStartError
from sp_adapters import FAILURES
from waiting import all_ready, restarts, wait_until

pytestmark = pytest.mark.anyio

ADAPTER = "sp_adapters:Basic"

#: What a call sees for each failure while the worker serves it.
EXPECTED_CALL_ERROR: dict[str, tuple[type[Exception], str]] = {
    "exit_code": (WorkerCrashed, "code 7"),
    "sigkill": (WorkerCrashed, "SIGKILL(-9)"),
    "segfault": (WorkerCrashed, "SIGSEGV(-11)"),
    "exception": (RemoteError, "the handler blew up"),
    "garbage": (ProtocolError, "broke the protocol"),
    "wrong_message": (ProtocolError, "only a host may send"),
}
#: What ``Pool.start()`` says for each failure during ``setup``.
EXPECTED_START_ERROR = {
    "exit_code": "code 7",
    "sigkill": "SIGKILL(-9)",
    "segfault": "SIGSEGV(-11)",
    "exception": "Boom: the handler blew up",
    "garbage": "protocol",
    "wrong_message": "protocol",
}


@pytest.mark.parametrize("how", FAILURES)
async def test_failure_during_startup_fails_start_with_the_reason(how: str) -> None:
    pool = snakepool.Pool(ADAPTER, size=2, adapter_config={"fail_setup": how}, startup_timeout=10)
    with pytest.raises(WorkerStartError) as info:
        await pool.start()
    assert EXPECTED_START_ERROR[how] in str(info.value)
    with pytest.raises(snakepool.PoolClosed):
        await pool.call("add", {"a": 1, "b": 2})


async def test_start_error_quotes_the_worker_stderr() -> None:
    pool = snakepool.Pool(ADAPTER, size=1, adapter_config={"fail_setup": "exit_code"})
    with pytest.raises(WorkerStartError) as info:
        await pool.start()
    assert "about to exit with code 7" in info.value.stderr_tail
    assert "about to exit with code 7" in str(info.value)


@pytest.mark.parametrize("how", FAILURES)
async def test_failure_during_a_call(how: str) -> None:
    error_type, text = EXPECTED_CALL_ERROR[how]
    async with snakepool.Pool(ADAPTER, size=2) as pool:
        with pytest.raises(error_type) as info:
            await pool.call("fail", {"how": how}, timeout=20)
        assert text in str(info.value)
        if how in ("exit_code", "sigkill", "segfault"):
            crashed = info.value
            assert isinstance(crashed, WorkerCrashed)
            assert crashed.exit_code is not None
            assert (crashed.signal_name is None) == (how == "exit_code")
        # The pool carries on: replaced if it died, and every worker answers.
        expected_restarts = 0 if how == "exception" else 1
        await wait_until(lambda: restarts(pool) == expected_restarts and all_ready(pool))
        results = [await pool.call("add", {"a": i, "b": 1}) for i in range(6)]
        assert results == [i + 1 for i in range(6)]
        assert restarts(pool) == expected_restarts


@pytest.mark.parametrize("how", FAILURES)
async def test_failure_during_a_stream(how: str) -> None:
    error_type, text = EXPECTED_CALL_ERROR[how]
    async with snakepool.Pool(ADAPTER, size=2) as pool:
        received = []
        with pytest.raises(error_type) as info:
            async for item in pool.stream("fail_in_stream", {"how": how, "after": 2}, timeout=20):
                received.append(item)
        assert received == [0, 1]
        assert text in str(info.value)
        expected_restarts = 0 if how == "exception" else 1
        await wait_until(lambda: restarts(pool) == expected_restarts and all_ready(pool))
        assert [x async for x in pool.stream("count", {"n": 3})] == [0, 1, 2]


async def test_a_crash_fails_only_the_calls_of_that_worker() -> None:
    async with snakepool.Pool(ADAPTER, size=2, worker_concurrency=4) as pool:
        outcomes: dict[str, object] = {}

        async def nap(key: str) -> None:
            try:
                outcomes[key] = await pool.call("nap", {"seconds": 1.0})
            except WorkerCrashed as exc:
                outcomes[key] = exc

        async def crash() -> None:
            try:
                await pool.call("fail", {"how": "sigkill"})
            except WorkerCrashed as exc:
                outcomes["crash"] = exc

        async with anyio.create_task_group() as tg:
            tg.start_soon(crash)
            for i in range(3):
                tg.start_soon(nap, f"nap{i}")
        crash = outcomes.pop("crash")
        assert isinstance(crash, WorkerCrashed)
        survived = [o for o in outcomes.values() if isinstance(o, dict)]
        crashed = [o for o in outcomes.values() if isinstance(o, WorkerCrashed)]
        assert len(survived) + len(crashed) == 3
        assert survived, "naps on the healthy worker must succeed"
        assert all("pid" in o for o in survived)
        # Naps that landed on the other worker succeeded; those on the dead one
        # failed with WorkerCrashed; nothing hangs and nothing else breaks.
        await wait_until(lambda: all_ready(pool))
        assert await pool.call("add", {"a": 2, "b": 2}) == 4


def test_wait_for_helper_fails_on_timeout() -> None:
    with pytest.raises(AssertionError):
        wait_for(lambda: False, timeout=0.05)
