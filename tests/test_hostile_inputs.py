"""Hardening (issue 14): the generic adapter's allow-list, session ids, new-adapter names.

Real worker processes, a real Redis (``redis_url``), the real CLI.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

import snakepool
from conftest import TESTS_DIR
from snakepool import RemoteError
from snakepool.errors import InvalidSessionId, SnakepoolError
from snakepool.pool._store import MemorySessionStore, SessionStore, check_session_id
from snakepool.server import SocketServer

pytestmark = pytest.mark.anyio

SNAKEPOOL = [sys.executable, "-m", "snakepool.cli"]
STATEFUL = "sp_adapters:Stateful"

BAD_IDS = [
    "*",
    "../../x",
    "a" * 300,
    "a" * 129,
    "",
    ".hidden",
    "a b",
    "line\nbreak",
    "tab\t",
    "snake/pool",
    "key{x}",
    "caf\u00e9",
    "trailing\n",
]
GOOD_IDS = ["user-42", "a" * 128, "tenant:7.session_1", "_x", "-", uuid.uuid4().hex]


# --- 7. the generic adapter runs only functions defined in an allowed module -------------


@contextlib.contextmanager
def refused(kind: str, match: str) -> Iterator[None]:
    """The worker raised ``kind`` (by name: a RemoteError carries it) with ``match``."""
    with pytest.raises(RemoteError, match=match) as info:
        yield
    assert info.value.remote_type == kind, info.value


async def test_generic_refuses_what_an_allowed_module_only_imported(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    config = {"allow": ["sp_reexports"]}
    async with snakepool.Pool("generic", size=1, adapter_config=config) as pool:

        async def call(target: str, args: Any = None) -> Any:
            return await pool.call("call", {"target": target, "args": args})

        # Defined in the allowed module: still callable.
        assert await call("sp_reexports:double", [21]) == 42
        assert await call("sp_reexports:count_up", {"n": 1}) == 2

        # `from os import system as shell`: defined in posix, not in sp_reexports.
        with refused("PermissionError", r"'shell' is defined in module 'posix'"):
            await call("sp_reexports:shell", [f"touch {marker}"])
        with refused("PermissionError", r"'sp_reexports' only imported it"):
            await call("sp_reexports:shell", [f"touch {marker}"])
        # Attribute chains are refused: HELPERS.get would hand out the os module.
        with refused("PermissionError", r"attribute chains \('HELPERS.get'\)"):
            await call("sp_reexports:HELPERS.get", ["os"])
        with refused("PermissionError", "private names are never callable"):
            await call("sp_reexports:count_up.__call__", [1])
        with refused("PermissionError", "attribute chains"):
            await call("sp_reexports:Runner.wait")
        with refused("PermissionError", r"leads into module 'os'"):
            await call("sp_reexports:os.system", [f"touch {marker}"])
        with refused("PermissionError", r"leads into module 'os'"):
            await call("sp_reexports:os")
        # Built-in methods, classes and partials from elsewhere: refused by where they live.
        with refused("PermissionError", r"defined in module 'builtins'"):
            await call("sp_reexports:get_helper", ["os"])
        with refused("PermissionError", r"defined in module 'subprocess'"):
            await call("sp_reexports:Runner", [["touch", str(marker)]])
        with refused("PermissionError", r"defined in module 'functools'"):
            await call("sp_reexports:quiet_shell", [f"touch {marker}"])
        with refused("TypeError", "not callable"):
            await call("sp_reexports:HELPERS")
        assert not marker.exists()  # nothing ran
        assert await pool.call("ping") == "pong"  # and the worker is fine


async def test_generic_still_calls_the_standard_library_it_allows() -> None:
    """``os`` functions live in ``posix``, ``operator``'s in ``_operator``: still allowed."""
    config = {"allow": ["os", "random", "operator", "math"]}
    async with snakepool.Pool("generic", size=1, adapter_config=config) as pool:

        async def call(target: str, args: Any = None) -> Any:
            return await pool.call("call", {"target": target, "args": args})

        assert await call("os:getpid") == pool.statistics().workers[0].pid
        assert await call("os:getenv", ["SNAKEPOOL_NO_SUCH_VARIABLE", "unset"]) == "unset"
        assert 0.0 <= await call("random:random", []) < 1.0
        assert await call("random:randint", [3, 3]) == 3
        assert await call("operator:add", [2, 3]) == 5
        assert await call("math:sqrt", [16]) == 4.0
        with refused("PermissionError", "attribute chains"):
            await call("os:environ.copy")
        with refused("PermissionError", "leads into module 'posixpath'"):
            await call("os:path.join", ["a", "b"])
        with refused("PermissionError", "module 'subprocess' is not allowed"):
            await call("subprocess:run", [["true"]])


# --- 8. session ids are validated wherever one enters -------------------------------------


def test_the_session_id_rule() -> None:
    for good in GOOD_IDS:
        assert check_session_id(good) == good
    for bad in BAD_IDS:
        with pytest.raises(InvalidSessionId, match=r"1 to 128 characters from A-Z a-z 0-9"):
            check_session_id(bad)
    with pytest.raises(InvalidSessionId, match="must be a str"):
        check_session_id(42)
    error = InvalidSessionId("x")
    assert isinstance(error, SnakepoolError) and isinstance(error, ValueError)
    assert error.category == snakepool.ErrorCategory.SESSION
    with pytest.raises(InvalidSessionId) as info:
        check_session_id("a" * 300)
    assert len(str(info.value)) < 200  # the message names the id without echoing all of it
    assert "300 characters" in str(info.value)


async def test_pool_refuses_bad_session_ids_and_keeps_good_ones(store: str) -> None:
    async with snakepool.Pool(STATEFUL, size=1, session_store=store, name="ids") as pool:
        manager = pool._sessions_manager()
        for bad in BAD_IDS:
            with pytest.raises(InvalidSessionId, match="invalid session id"):
                pool.session(bad)
            with pytest.raises(InvalidSessionId, match="invalid session id"):
                await pool.call("whoami", session=bad)
            with pytest.raises(InvalidSessionId, match="invalid session id"):
                async for _ in pool.stream("count_to", {"n": 1}, session=bad):
                    pass
        assert manager.bindings == {}  # no bad id was ever bound to a worker
        assert await manager.store.count() == 0
        for good in GOOD_IDS:
            async with pool.session(good) as session:
                assert (await session.call("whoami"))["session"] == good
                await session.variables.define("t", "float", 0.5)
                assert await pool.call("var", {"name": "t"}, session=good) == 0.5
        generated = pool.session()
        assert check_session_id(generated.id) == generated.id
        assert (await generated.call("whoami"))["session"] == generated.id
        await generated.close()
        assert await pool.call("echo", {"value": 1}) == 1


def _stores(request: pytest.FixtureRequest) -> list[SessionStore]:
    stores: list[SessionStore] = [MemorySessionStore()]
    pytest.importorskip("redis", reason="redis-py is not installed: pip install -e '.[dev]'")
    from snakepool.pool._redis_store import RedisSessionStore

    stores.append(RedisSessionStore(request.getfixturevalue("redis_url"), namespace="ids"))
    return stores


async def test_stores_refuse_bad_session_ids(request: pytest.FixtureRequest) -> None:
    import redis

    url = request.getfixturevalue("redis_url")
    for store in _stores(request):
        try:
            for bad in BAD_IDS:
                with pytest.raises(InvalidSessionId):
                    await store.create(bad, 60.0)
                with pytest.raises(InvalidSessionId):
                    await store.status(bad)
                with pytest.raises(InvalidSessionId):
                    await store.touch(bad)
                with pytest.raises(InvalidSessionId):
                    await store.delete(bad)
                with pytest.raises(InvalidSessionId):
                    await store.save_state(bad, "k", 1)
                with pytest.raises(InvalidSessionId):
                    await store.load_state(bad)
                with pytest.raises(InvalidSessionId):
                    await store.update(bad, {"t": (1.0, None)})
                with pytest.raises(InvalidSessionId):
                    async with store.watch(bad, ()):
                        pass
            for good in GOOD_IDS:
                assert await store.create(good, 60.0)
                assert await store.status(good) == "live"
                assert await store.save_state(good, "k", good) == 1
                assert await store.load_state(good) == {"k": good}
                assert await store.delete(good)
            assert await store.count() == 0
        finally:
            await store.aclose()
    client = redis.Redis.from_url(url)
    try:  # no key was written for a bad id; the good ones' tombstones only
        keys = sorted(k.decode() if isinstance(k, bytes) else k for k in client.keys("*"))
    finally:
        client.close()
    assert keys == sorted(f"snakepool:ids:s:{good}:seen" for good in GOOD_IDS)


async def test_redis_reaper_drops_an_invalid_id_it_finds(redis_url: str) -> None:
    """An id written by something else (not through the checks) cannot stall the reaper."""
    import redis

    pytest.importorskip("redis")
    from snakepool.pool._redis_store import RedisSessionStore

    client = redis.Redis.from_url(redis_url)
    store = RedisSessionStore(redis_url, namespace="reap")
    try:
        client.zadd("snakepool:reap:live", {"../../x": 1.0, "*": 2.0})
        assert await store.create("real", 0.05)
        with anyio.fail_after(10):
            while "real" not in await store.expired():
                await anyio.sleep(0.05)
        assert client.zcard("snakepool:reap:live") == 0
    finally:
        await store.aclose()
        client.close()


@pytest.fixture
def socket_path() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="sp-"))  # short: Unix socket paths are limited
    yield directory / "s.sock"
    shutil.rmtree(directory, ignore_errors=True)


async def test_socket_clients_get_the_pools_refusal_and_keep_their_connection(
    socket_path: Path,
) -> None:
    async with snakepool.Pool(STATEFUL, size=1, name="general") as pool:
        server = SocketServer({"general": pool}, socket_path=socket_path)
        async with anyio.create_task_group() as tg:
            await tg.start(server.serve)
            async with snakepool.connect(socket_path) as client:
                general = client["general"]
                for bad in ("*", "../../x", "a" * 300):
                    with pytest.raises(InvalidSessionId, match="invalid session id"):
                        await general.call("whoami", session=bad)
                    with pytest.raises(InvalidSessionId, match="invalid session id"):
                        async with general.session(bad):
                            pass
                async with general.session("user-42") as session:
                    assert session.id == "user-42"
                    assert (await session.call("whoami"))["session"] == "user-42"
                assert (await general.call("whoami"))["session"] is None
            tg.cancel_scope.cancel()
        assert pool._sessions_manager().bindings.keys() <= {"user-42"}


# --- the CLI: --session and new-adapter ---------------------------------------------------


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS_DIR), *sys.path])
    env["SNAKEPOOL_RUNTIME_DIR"] = str(cwd / "run")
    env.pop("SNAKEPOOL_SOCKET", None)
    return subprocess.run(
        [*SNAKEPOOL, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
    )


def test_cli_refuses_a_bad_session_id_before_connecting(workdir: Path) -> None:
    sock = str(workdir / "none.sock")
    for bad in ("*", "../../x", "a" * 300, ".x"):
        done = cli("call", "--socket", sock, "--session", bad, "general", "echo", cwd=workdir)
        assert done.returncode == 2, done.stderr
        assert "invalid session id" in done.stderr
        assert "1 to 128 characters from A-Z a-z 0-9 . _ : -" in done.stderr
        assert "Traceback" not in done.stderr
    # A good id passes the check and gets as far as the (missing) server.
    done = cli("call", "--socket", sock, "--session", "user-42", "general", "echo", cwd=workdir)
    assert done.returncode == 1
    assert "no snakepool server" in done.stderr


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("os", "would shadow the standard library module 'os'"),
        ("json", "would shadow the standard library module 'json'"),
        ("sys", "would shadow the standard library module 'sys'"),
        ("site", "would shadow the standard library module 'site'"),
        ("test", "would shadow"),
        ("tests", "would shadow"),
        ("snakepool", "would shadow snakepool itself"),
        ("anyio", "would shadow the importable module 'anyio'"),
        ("sp_adapters", "would shadow the importable module 'sp_adapters'"),
        ("generic", "is already an adapter's name"),
        ("class", "is a Python keyword"),
        ("a" * 300, "is 300 characters long; at most 64"),
        ("a" * 65, "at most 64"),
        ("Not-Valid", "must be a lower-case ASCII Python identifier"),
        ("caf\u00e9", "must be a lower-case ASCII Python identifier"),
    ],
)
def test_new_adapter_refuses_names_that_would_shadow_or_break(
    workdir: Path, name: str, reason: str
) -> None:
    done = cli("new-adapter", name, "--directory", str(workdir / "out"), cwd=workdir)
    assert done.returncode == 2
    assert done.stderr.startswith("snakepool new-adapter: ")
    assert reason in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr  # one line, no traceback
    assert not (workdir / "out").exists()  # nothing was written


def test_new_adapter_takes_a_fresh_name_of_the_longest_length(workdir: Path) -> None:
    name = "a" * 63 + "z"
    done = cli("new-adapter", name, "--directory", str(workdir), cwd=workdir)
    assert done.returncode == 0, done.stderr
    assert (workdir / name / name / "adapter.py").exists()
    again = cli("new-adapter", name, "--directory", str(workdir), cwd=workdir)
    assert again.returncode == 1
    assert "already exists" in again.stderr
