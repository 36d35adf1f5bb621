"""Session calls on the Redis store: what a call costs, failures, URLs (issue 19).

Each test that needs its own ``redis-server`` (stopped, frozen, on a unix socket,
behind TLS) starts it here; the others use the test session's (``redis_url``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

import snakepool
from conftest import free_port
from snakepool import CallTimeout, SessionNotFound, SessionStoreUnavailable
from snakepool.pool._redis_store import RedisSessionStore
from snakepool.testing import stop_redis_server
from waiting import wait_for, wait_until

pytestmark = pytest.mark.anyio
redis = pytest.importorskip("redis", reason="redis-py is not installed: pip install -e '.[dev]'")

ADAPTER = "sp_adapters:Stateful"
WRITES = {"set", "del", "evalsha", "eval", "hset", "pexpire", "zadd", "publish", "incr"}


@contextlib.contextmanager
def redis_process(*args: str, ready: Any) -> Iterator[subprocess.Popen[bytes]]:
    """A ``redis-server`` with ``args`` (no persistence unless asked), once ``ready()``."""
    executable = shutil.which("redis-server")
    if executable is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    process = subprocess.Popen(
        [executable, "--save", "", "--appendonly", "no", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: process.poll() is not None or ready(), timeout=10)
        if process.poll() is not None:
            pytest.skip(f"redis-server does not start with {args} (built without TLS?)")
        yield process
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGCONT)  # (a frozen one must hear the TERM)
        stop_redis_server(process)


def _pings(url: str, **options: Any) -> bool:
    client = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1, **options)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


@contextlib.asynccontextmanager
async def _raw(url: str) -> AsyncIterator[Any]:
    import redis.asyncio

    client = redis.asyncio.Redis.from_url(url)
    try:
        yield client
    finally:
        await client.aclose()


async def _commands_of(raw: Any, work: Any) -> dict[str, int]:
    """The commands Redis ran for ``work()``, by name (again if the pool's session
    reaper, which runs each second, ran meanwhile: its commands are not the calls')."""
    for _ in range(5):
        await raw.config_resetstat()
        await work()
        stats = await raw.info("commandstats")
        found = {name.removeprefix("cmdstat_"): int(s["calls"]) for name, s in stats.items()}
        if "zrangebyscore" not in found:  # (the reaper's: see RedisSessionStore.expired)
            return {k: v for k, v in found.items() if not k.startswith(("config", "info"))}
    raise AssertionError("the session reaper ran every time")


# --- what a call costs ----------------------------------------------------------------------


async def test_concurrent_session_calls_share_one_read_and_write_nothing(redis_url: str) -> None:
    async with (
        snakepool.Pool(ADAPTER, size=2, session_store=redis_url) as pool,
        _raw(redis_url) as raw,
    ):
        sessions = [await pool.session().open() for _ in range(64)]
        for session in sessions:
            await session.variables.define("x", "int", 1)
        for session in sessions:
            assert await session.call("var", {"name": "x"}) == 1  # every worker current

        async def calls() -> None:
            found = await asyncio.gather(*(s.call("var", {"name": "x"}) for s in sessions))
            assert found == [1] * 64

        # 64 calls that started together: one MGET of their 64 sessions' versions.
        assert await _commands_of(raw, calls) == {"mget": 1}
        # A call after a set reads the variables too (a script), and writes nothing.
        value = 1

        async def call_after_a_set() -> None:
            nonlocal value
            value += 1
            await sessions[0].variables.set("x", value)
            await raw.config_resetstat()  # (the set is not the call's)
            assert await sessions[0].call("var", {"name": "x"}) == value

        commands = await _commands_of(raw, call_after_a_set)
        assert not (WRITES - {"evalsha"}) & set(commands), commands
        assert commands.get("mget", 0) <= 2 and commands.get("evalsha") == 1, commands


async def test_a_session_call_waits_in_its_current_worker_rather_than_read_the_store(
    redis_url: str, tmp_path: Path
) -> None:
    # hint affinity, its worker busy, the other free: moving the call there would
    # first read the session from Redis, so it waits in its own (current) worker.
    # (With the memory store it moves: that worker is made current without I/O.)
    release = tmp_path / "release"
    async with snakepool.Pool(ADAPTER, size=2, session_store=redis_url) as pool:
        async with pool.session() as session:
            home = (await session.call("whoami"))["pid"]
            slot = [w.pid for w in pool.statistics().workers].index(home)
            async with anyio.create_task_group() as tg:
                tg.start_soon(session.call, "hold", {"release": str(release)})
                await wait_until(lambda: pool.statistics().workers[slot].inflight == 1)
                answer = asyncio.ensure_future(session.call("whoami"))
                await wait_until(lambda: pool.statistics().workers[slot].inflight == 2)
                release.touch()
            assert (await answer)["pid"] == home


async def test_a_host_uses_one_small_pool_of_connections(redis_url: str) -> None:
    async with (
        snakepool.Pool(ADAPTER, size=2, session_store=redis_url, name="conns") as pool,
        _raw(redis_url) as raw,
    ):
        before = len(await raw.client_list())
        sessions = [await pool.session().open() for _ in range(64)]

        async def calls(session: snakepool.Session) -> None:
            await session.variables.define("x", "int", 1)
            for _ in range(10):
                await session.call("var", {"name": "x"})

        await asyncio.gather(*(calls(s) for s in sessions))
        # 64 sessions, 704 store uses at once: a few connections, not one per session.
        opened = len(await raw.client_list()) - before
        assert 1 <= opened <= 32, opened


# --- failures --------------------------------------------------------------------------------


async def test_a_frozen_redis_reads_as_the_store_not_as_a_busy_pool(tmp_path: Path) -> None:
    port = free_port()
    base = f"redis://127.0.0.1:{port}/0"
    with redis_process("--port", str(port), ready=lambda: _pings(base)) as server:
        # (a short command timeout, from the URL, keeps this test short)
        url = f"{base}?socket_timeout=0.5"
        async with snakepool.Pool(ADAPTER, size=1, session_store=url) as pool:
            session = await pool.session().open()
            await session.variables.define("x", "int", 1)
            assert await session.call("var", {"name": "x"}) == 1
            os.kill(server.pid, signal.SIGSTOP)
            try:
                with pytest.raises(CallTimeout, match=r"reading the session from its store"):
                    await session.call("var", {"name": "x"}, timeout=0.3)
                started = time.monotonic()
                with pytest.raises(ConnectionError, match=rf"session store redis at {base}"):
                    await session.call("var", {"name": "x"})
                assert time.monotonic() - started < 10  # every command has a timeout
                assert (await pool.call("whoami"))["session"] is None  # the pool is fine
            finally:
                os.kill(server.pid, signal.SIGCONT)
            assert await session.call("var", {"name": "x"}) == 1  # back, nothing lost


async def test_a_session_call_whose_caller_left_while_its_store_was_read_never_runs() -> None:
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0?socket_timeout=5"
    with redis_process("--port", str(port), ready=lambda: _pings(url)) as server:
        async with snakepool.Pool(ADAPTER, size=1, session_store=url) as pool:
            session = await pool.session().open()
            await session.call("remember", {"key": "k", "value": "before"})
            os.kill(server.pid, signal.SIGSTOP)
            try:
                with pytest.raises(CallTimeout, match=r"reading the session from its store"):
                    await session.call("remember", {"key": "k", "value": "left"}, timeout=0.3)
            finally:
                os.kill(server.pid, signal.SIGCONT)
            # The read it waited on answers now; had that sent the call, it would
            # have run before this one (one worker, in order) and changed "k".
            assert (await session.call("recall", {"key": "k"}))["value"] == "before"


async def test_a_call_its_dead_worker_never_started_fails_clearly_while_redis_is_frozen() -> None:
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0?socket_timeout=0.5"
    with redis_process("--port", str(port), ready=lambda: _pings(url)) as server:
        async with snakepool.Pool(ADAPTER, size=1, session_store=url) as pool:
            session = await pool.session().open()
            worker = (await session.call("whoami"))["pid"]
            running = asyncio.ensure_future(session.call("nap", {"seconds": 30}))
            waiting = asyncio.ensure_future(session.call("whoami"))  # behind it, in the worker
            await wait_until(lambda: pool.statistics().workers[0].inflight == 2)
            os.kill(server.pid, signal.SIGSTOP)
            try:
                os.kill(worker, signal.SIGKILL)
                with pytest.raises(snakepool.WorkerCrashed):
                    await running
                # Never started: placed again, on a store that does not answer.
                with pytest.raises(SessionStoreUnavailable, match="session store redis at"):
                    await waiting
            finally:
                os.kill(server.pid, signal.SIGCONT)
            assert (await session.call("whoami"))["session"] == session.id  # the pool serves


async def test_back_with_its_data_redis_serves_what_was_written_meanwhile(tmp_path: Path) -> None:
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    args = ("--port", str(port), "--dir", str(tmp_path), "--dbfilename", "dump.rdb")
    other = RedisSessionStore(url, namespace="back")  # another host of the same pool
    try:
        async with snakepool.Pool(ADAPTER, size=1, session_store=url, name="back") as pool:
            with redis_process(*args, ready=lambda: _pings(url)):
                session = await pool.session("s").open()
                await session.variables.define("x", "int", 1)
                assert await session.call("var", {"name": "x"}) == 1  # its worker holds x=1
                async with _raw(url) as raw:
                    await raw.save()
            with pytest.raises(ConnectionError, match="session store redis"):
                await session.call("var", {"name": "x"})
            with redis_process(*args, ready=lambda: _pings(url)):  # back, from its dump
                await other.update("s", {"x": (2, None)})
                assert await session.call("var", {"name": "x"}) == 2  # never the cached 1
    finally:
        await other.aclose()


async def test_a_session_made_anew_after_redis_lost_everything_is_never_read_stale() -> None:
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    async with snakepool.Pool(ADAPTER, size=1, session_store=url, name="anew") as pool:
        with redis_process("--port", str(port), ready=lambda: _pings(url)):
            session = await pool.session("s").open()
            await session.variables.define("x", "int", 1)
            assert await session.call("var", {"name": "x"}) == 1  # the worker holds x=1
        with redis_process("--port", str(port), ready=lambda: _pings(url)):  # empty
            with pytest.raises(SessionNotFound):
                await session.call("var", {"name": "x"})
            # The same id made again, its variable at the same version as the old one's.
            again = await pool.session("s").open()
            await again.variables.define("x", "int", 7)
            assert await again.call("var", {"name": "x"}) == 7


# --- URLs -------------------------------------------------------------------------------------


async def _round_trip(url: str) -> None:
    async with snakepool.Pool(ADAPTER, size=1, session_store=url) as pool:
        async with pool.session() as session:
            await session.variables.define("x", "str", "over")
            await session.variables.set("x", "there")
            assert await session.call("var", {"name": "x"}) == "there"
            async with session.variables.watch("x") as updates:
                await session.variables.set("x", "again")
                with anyio.fail_after(10):
                    assert (await updates.__anext__()).value == "again"


async def test_a_unix_socket_url(tmp_path: Path) -> None:
    socket_path = tmp_path / "redis.sock"
    url = f"unix://{socket_path}?db=0"
    with redis_process("--port", "0", "--unixsocket", str(socket_path), ready=lambda: _pings(url)):
        await _round_trip(url)


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed (it makes the test certificate)")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


async def test_a_rediss_url(certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    port = free_port()
    url = f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={cert}"
    with redis_process(
        "--port", "0", "--tls-port", str(port), "--tls-cert-file", str(cert),
        "--tls-key-file", str(key), "--tls-auth-clients", "no",
        ready=lambda: _pings(url),
    ):  # fmt: skip
        await _round_trip(url)
        # Not TLS, or not the certificate it trusts: a clear ConnectionError.
        store = RedisSessionStore(f"redis://127.0.0.1:{port}/0?socket_timeout=1", namespace="t")
        try:
            with pytest.raises(ConnectionError, match="session store redis"):
                await store.status("s")
        finally:
            await store.aclose()
