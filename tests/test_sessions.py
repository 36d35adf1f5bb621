"""Sessions, variables and the host bridge with real workers, against both stores."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest

import snakepool
from conftest import TESTS_DIR
from snakepool import (
    PoolOverloaded,
    RemoteError,
    SessionExpired,
    SessionNotFound,
    SessionWorkerUnavailable,
    WorkerCrashed,
)
from waiting import wait_for_count, wait_until

pytestmark = pytest.mark.anyio

ADAPTER = "sp_adapters:Stateful"


async def test_affinity_holds_for_100_sessions_under_concurrency(store: str) -> None:
    async with snakepool.Pool(
        ADAPTER, size=4, worker_concurrency=2, affinity="strict_queue", session_store=store
    ) as pool:
        seen: dict[str, set[int]] = {}

        async def run_session() -> None:
            async with pool.session() as session:
                pids = {(await session.call("whoami"))["pid"] for _ in range(20)}
                seen[session.id] = pids

        async with anyio.create_task_group() as tg:
            for _ in range(100):
                tg.start_soon(run_session)
        assert len(seen) == 100
        assert all(len(pids) == 1 for pids in seen.values())
        # sessions were spread over the workers, not piled on one
        assert len({next(iter(p)) for p in seen.values()}) == 4


async def test_hint_affinity_never_fails_under_load(store: str) -> None:
    async with snakepool.Pool(ADAPTER, size=2, session_store=store) as pool:
        session = pool.session()

        async def one() -> None:
            assert (await session.call("whoami"))["session"] == session.id

        async with anyio.create_task_group() as tg:
            for _ in range(20):
                tg.start_soon(one)
        await session.close()


async def test_strict_fail_fast_refuses_when_the_worker_is_busy(store: str, tmp_path: Path) -> None:
    release = tmp_path / "release"
    async with (
        snakepool.Pool(ADAPTER, size=2, affinity="strict_fail_fast", session_store=store) as pool,
        pool.session() as session,
    ):
        await session.call("whoami")  # binds the session to a worker
        async with anyio.create_task_group() as tg:
            # busy until released (a nap could end before the refused call is made)
            tg.start_soon(session.call, "hold", {"release": str(release)})
            await wait_until(lambda: any(w.inflight for w in pool.statistics().workers))
            with pytest.raises(SessionWorkerUnavailable, match="strict_fail_fast"):
                await session.call("whoami")
            release.touch()


async def test_session_outlives_its_worker(store: str) -> None:
    async with snakepool.Pool(ADAPTER, size=2, session_store=store) as pool:
        async with pool.session() as session:
            first_pid = await session.call("remember", {"key": "program", "value": {"v": b"\x01"}})
            assert (await session.call("recall", {"key": "program"}))["value"] == {"v": b"\x01"}
            with pytest.raises(WorkerCrashed):
                await session.call("die")
            recalled = await session.call("recall", {"key": "program"})
            assert recalled["value"] == {"v": b"\x01"}  # rebuilt by restore_session
            assert recalled["pid"] != first_pid
            assert recalled["restored_on"] == recalled["pid"]


@pytest.mark.parametrize("waits_in", ["the worker", "the host's queue"])
async def test_a_session_call_its_dead_worker_never_started_runs_on_another(
    store: str, tmp_path: Path, waits_in: str
) -> None:
    # The session's second call waits for its busy worker (strict: only that
    # one will do): sent ahead into it, or, with nothing sent ahead
    # (send_ahead=0), in the pool's queue for it. The worker dies before
    # starting it: it runs on another worker, restored first.
    release = tmp_path / "release"
    outcomes: dict[str, object] = {}
    in_queue = waits_in == "the host's queue"
    options = {"send_ahead": 0} if in_queue else {}
    async with snakepool.Pool(
        ADAPTER, size=2, session_store=store, affinity="strict_queue", **options
    ) as pool:
        async with pool.session() as session:
            home_pid = await session.call("remember", {"key": "k", "value": 7})
            home = pool._sessions.bindings[session.id]

            async def run(name: str, command: str, args: dict[str, object]) -> None:
                try:
                    outcomes[name] = await session.call(command, args)
                except WorkerCrashed as exc:
                    outcomes[name] = exc

            def waiting() -> bool:
                return pool.statistics().queued == 1 if in_queue else len(home.pending) == 2

            async with anyio.create_task_group() as tg:
                tg.start_soon(run, "started", "hold", {"release": str(release)})
                await wait_until(lambda: len(home.pending) == 1)
                tg.start_soon(run, "waiting", "recall", {"key": "k"})
                await wait_until(waiting)  # (not started)
                os.kill(home_pid, signal.SIGKILL)
    assert isinstance(outcomes["started"], WorkerCrashed)
    waited = outcomes["waiting"]
    assert isinstance(waited, dict)
    assert waited["value"] == 7 and waited["pid"] != home_pid
    assert waited["restored_on"] == waited["pid"]


async def test_a_session_call_stays_behind_its_queued_one_when_its_ttl_is_due(
    store: str, tmp_path: Path
) -> None:
    # Both workers busy: the session's second call waits in the pool's queue
    # for its worker. Its TTL comes due, the other worker frees: the third
    # call must still wait behind the second (it used to take the slow route
    # to refresh the TTL and, with hint, run first on the free worker).
    home_free, other_free = tmp_path / "home", tmp_path / "other"
    async with snakepool.Pool(ADAPTER, size=2, session_store=store, send_ahead=0) as pool:
        manager = pool._sessions
        async with pool.session(ttl=2.0) as session:
            home_pid = (await session.call("whoami"))["pid"]
            home = manager.bindings[session.id]
            outcomes: dict[str, object] = {}

            async def run(name: str, command: str, args: dict[str, object]) -> None:
                outcomes[name] = await session.call(command, args)

            async with anyio.create_task_group() as tg:
                tg.start_soon(run, "holding", "hold", {"release": str(home_free)})
                await wait_until(lambda: len(home.pending) == 1)
                tg.start_soon(pool.call, "hold", {"release": str(other_free)})
                await wait_until(lambda: sum(len(w.pending) for w in pool._workers) == 2)
                tg.start_soon(run, "second", "whoami", {})
                await wait_until(lambda: pool.statistics().queued == 1)
                await wait_until(lambda: manager._touch_due[session.id] <= time.monotonic())
                other_free.touch()
                await wait_until(lambda: sum(len(w.pending) for w in pool._workers) == 1)
                tg.start_soon(run, "third", "whoami", {})
                await wait_until(lambda: pool.statistics().queued == 2)  # behind the second
                home_free.touch()
    assert outcomes["second"] == outcomes["third"] == {"pid": home_pid, "session": session.id}


async def test_sessions_made_under_load_send_their_later_calls_directly(
    store: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 64 sessions' first calls at once: they bind their sessions on the slow
    # route (a store read, a queued slot). The calls after them go straight to
    # their worker or wait in the queue for it, in order: none takes the slow
    # route because callers were queued (it used to: every later call then did).
    from snakepool.pool._session import SessionManager

    placed = 0
    place = SessionManager.place

    async def counted(self: SessionManager, call: object, frame: bytes) -> None:
        nonlocal placed
        placed += 1
        await place(self, call, frame)  # type: ignore[arg-type]

    monkeypatch.setattr(SessionManager, "place", counted)
    async with snakepool.Pool(ADAPTER, size=2, session_store=store) as pool:
        sessions = [await pool.session().open() for _ in range(64)]

        async def calls(session: snakepool.Session) -> None:
            for i in range(20):
                assert await session.call("echo", {"value": [session.id, i]}) == [session.id, i]

        async with anyio.create_task_group() as tg:
            for session in sessions:
                tg.start_soon(calls, session)
        for session in sessions:
            await session.close()
    assert placed <= 2 * len(sessions)  # the first calls (and a few moves), not 64 * 20


async def test_variable_updates_are_visible_on_the_very_next_call(store: str) -> None:
    async with snakepool.Pool(ADAPTER, size=2, session_store=store) as pool:
        async with pool.session() as session:
            await session.variables.define("temperature", "float", 0.5, {"min": 0.0, "max": 2.0})
            assert await session.call("var", {"name": "temperature"}) == 0.5
            for i in range(20):
                value = round(0.1 * i, 2)
                await session.variables.set("temperature", value)
                assert await session.call("var", {"name": "temperature"}) == value
            assert await session.variables.get("temperature") == 1.9
            assert await session.variables.get("missing", "dflt") == "dflt"


async def test_invalid_values_change_nothing(store: str) -> None:
    async with snakepool.Pool(ADAPTER, size=1, session_store=store) as pool:
        async with pool.session() as session:
            v = session.variables
            await v.define("temperature", "float", 0.7, {"min": 0.0, "max": 2.0})
            await v.define("model", "choice", "a", {"choices": ["a", "b"]})
            await v.define("name", "str", "x", {"max_length": 3, "pattern": "[a-z]+"})
            with pytest.raises(ValueError, match=r"'temperature'.*above max=2\.0"):
                await v.set("temperature", 3.5)
            with pytest.raises(ValueError, match=r"'model'.*not one of choices"):
                await v.set("model", "c")
            with pytest.raises(ValueError, match=r"'name'.*does not match pattern"):
                await v.set("name", "ABC")
            with pytest.raises(ValueError, match=r"'temperature'.*not a float"):
                await v.set_many({"model": "b", "temperature": "hot"})
            assert await v.get_many(["temperature", "model", "name"]) == {
                "temperature": 0.7,
                "model": "a",
                "name": "x",
            }
            assert await session.call("all_vars") == {"temperature": 0.7, "model": "a", "name": "x"}
            with pytest.raises(KeyError, match="not defined"):
                await v.set("undefined", 1)


async def test_watch_delivers_every_update_in_order(store: str) -> None:
    async with snakepool.Pool(ADAPTER, size=1, session_store=store) as pool:
        async with pool.session() as session:
            await session.variables.define("n", "int", 0)
            await session.variables.define("other", "int", 0)
            got: list[tuple[int, int]] = []
            async with session.variables.watch("n") as updates:
                for i in range(1, 31):
                    await session.variables.set("n", i)
                    await session.variables.set("other", i)
                with anyio.fail_after(10):
                    async for update in updates:
                        got.append((update.value, update.version))
                        if update.value == 30:
                            break
            assert got == [(i, i + 1) for i in range(1, 31)]


async def test_session_ttl_expiry(store: str) -> None:
    events: list[str] = []
    async with snakepool.Pool(ADAPTER, size=1, session_store=store, session_ttl=0.4) as pool:
        pool.add_listener(
            lambda e: (
                events.append(e.data.get("session_id", "")) if e.name == "session.expired" else None
            )
        )
        session = pool.session()
        await session.call("whoami")
        with anyio.fail_after(10):
            while True:
                try:
                    await session.call("whoami")
                except SessionExpired:
                    break
                await anyio.sleep(0.5)
        await wait_until(lambda: session.id in events)
        await session.close()  # closing an expired session is a no-op


async def test_unknown_closed_and_limited_sessions(store: str) -> None:
    async with snakepool.Pool(ADAPTER, size=1, session_store=store, max_sessions=2) as pool:
        with pytest.raises(SessionNotFound):
            await pool.call("whoami", session="no-such-session")
        a, b = pool.session(), pool.session()
        await a.call("whoami")
        await b.call("whoami")
        with pytest.raises(PoolOverloaded, match="max_sessions=2"):
            await pool.session().call("whoami")
        await a.close()
        await a.close()  # no-op
        with pytest.raises(SessionExpired):
            await a.call("whoami")
        again = pool.session(b.id)  # reattach by id
        assert (await again.call("whoami"))["session"] == b.id
        assert await pool.call("whoami", session=b.id)
        await pool.session().call("whoami")  # a slot freed when `a` closed


async def test_host_tools_sync_async_and_unregistered(store: str) -> None:
    async with snakepool.Pool(ADAPTER, size=1, session_store=store) as pool:
        calls: list[str] = []

        def lookup(word: str) -> str:
            calls.append(word)
            return word.upper()

        async def alookup(word: str) -> dict[str, str]:
            await anyio.sleep(0.01)
            return {"word": word[::-1]}

        def broken() -> None:
            raise ValueError("tool exploded")

        pool.register_tool("lookup", lookup)
        pool.register_tool("alookup", alookup)
        pool.register_tool("broken", broken)
        assert await pool.call("use_tool", {"name": "lookup", "args": {"word": "hi"}}) == "HI"
        assert await pool.call("use_tool", {"name": "alookup", "args": {"word": "abc"}}) == {
            "word": "cba"
        }
        assert await pool.call("ause_tool", {"name": "lookup", "args": {"word": "yo"}}) == "YO"
        assert calls == ["hi", "yo"]
        with pytest.raises(RemoteError, match="no host tool named 'nope' is registered"):
            await pool.call("use_tool", {"name": "nope"})
        with pytest.raises(RemoteError, match="ValueError: tool exploded"):
            await pool.call("ause_tool", {"name": "broken"})
        with pytest.raises(ValueError, match="__snakepool"):
            pool.register_tool("__snakepool_save_state__", lookup)
        assert await pool.call("use_tool", {"name": "lookup", "args": {"word": "ok"}}) == "OK"


def test_two_host_processes_share_one_session_through_redis(redis_url: str) -> None:
    script = f"""
import anyio, json, sys
sys.path[:0] = {[str(TESTS_DIR), *sys.path]!r}
import snakepool

async def main(mode, session_id):
    async with snakepool.Pool({ADAPTER!r}, size=1, session_store={redis_url!r}, name="shared") as pool:
        session = pool.session(session_id or None)
        if mode == "write":
            await session.variables.define("temperature", "float", 0.25)
            await session.variables.set("temperature", 0.75)
            await session.call("remember", {{"key": "k", "value": "from host one"}})
            print(json.dumps({{"id": session.id}}), flush=True)
        else:
            print(json.dumps({{
                "temperature": await session.call("var", {{"name": "temperature"}}),
                "recalled": await session.call("recall", {{"key": "k"}}),
            }}), flush=True)

anyio.run(main, sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "")
"""
    env = dict(os.environ)

    def host(*args: str) -> dict[str, object]:
        done = subprocess.run(
            [sys.executable, "-c", script, *args],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
        assert done.returncode == 0, done.stderr
        result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
        return result

    session_id = host("write")["id"]
    assert isinstance(session_id, str)
    seen = host("read", session_id)
    assert seen["temperature"] == 0.75
    recalled = seen["recalled"]
    assert isinstance(recalled, dict)
    assert recalled["value"] == "from host one"  # restored from the shared store


async def test_redis_down_fails_session_calls_clearly_and_recovers() -> None:
    from conftest import free_port, start_redis_server, stop_redis_server

    port = free_port()
    server = start_redis_server(port)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        async with snakepool.Pool(ADAPTER, size=2, session_store=url) as pool:
            session = pool.session()
            await session.variables.define("temperature", "float", 0.5)
            assert await session.call("var", {"name": "temperature"}) == 0.5
            stop_redis_server(server)
            with pytest.raises(ConnectionError, match=r"session store redis at .* is unavailable"):
                await session.call("var", {"name": "temperature"})
            # Calls without a session, and the pool itself, are unaffected.
            assert (await pool.call("whoami"))["session"] is None
            assert pool.statistics().ready_workers == 2
            assert all(w.inflight == 0 for w in pool.statistics().workers)
            server = start_redis_server(port)  # an empty Redis: the session is gone, not corrupted
            with pytest.raises(SessionNotFound):
                await pool.call("var", {"name": "temperature"}, session=session.id)
            fresh = pool.session()
            await fresh.variables.define("temperature", "float", 0.9)
            assert await fresh.call("var", {"name": "temperature"}) == 0.9
    finally:
        stop_redis_server(server)


async def test_hint_fallback_never_leaves_a_worker_with_stale_session_state(
    store: str, tmp_path: Path
) -> None:
    # The session's worker is busy, so a call falls back to the other worker and
    # saves state there; the next call, back on the first worker, must see it.
    # (Busy until released: naps could end before the fallback call is made.)
    release = tmp_path / "release"
    async with snakepool.Pool(
        # (send_ahead=0: a busy worker holds no calls, so the fallback happens at once)
        ADAPTER,
        size=2,
        worker_concurrency=2,
        session_store=store,
        send_ahead=0,
    ) as pool:
        async with pool.session() as session:
            home = await session.call("remember", {"key": "k", "value": 1})
            async with anyio.create_task_group() as tg:
                tg.start_soon(session.call, "hold", {"release": str(release)})
                tg.start_soon(session.call, "hold", {"release": str(release)})  # home is now full
                await wait_for_count(lambda: sum(w.inflight for w in pool.statistics().workers), 2)
                other = await session.call("remember", {"key": "k", "value": 2})
                release.touch()
            assert other != home
            recalled = await session.call("recall", {"key": "k"})
            assert recalled["value"] == 2
