"""Session stores: one conformance suite for the memory and the Redis store.

The Redis cases run against a real ``redis-server`` (``redis_server`` in conftest); they
skip when it is not installed.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest

from conftest import free_port, start_redis_server, stop_redis_server
from snakepool.errors import SessionExpired, SessionNotFound
from snakepool.pool._store import MemorySessionStore, SessionStore
from snakepool.pool._stores import open_store
from snakepool.pool._variables import VariableSpec, VariableUpdate
from waiting import wait_until

pytestmark = pytest.mark.anyio

SPECS = [
    (VariableSpec("temperature", "float", {"min": 0.0, "max": 2.0}), 0.7),
    (VariableSpec("retries", "int", {"min": 0, "max": 10}), 3),
    (VariableSpec("prompt", "str", {"max_length": 20, "pattern": r"[a-z ]+"}), "be brief"),
    (VariableSpec("verbose", "bool"), False),
    (VariableSpec("mode", "choice", {"choices": ["fast", "slow"]}), "fast"),
    (VariableSpec("module", "module", {"choices": ["Predict", "ChainOfThought"]}), "Predict"),
    (VariableSpec("config", "json", {"max_length": 100}), {"k": [1, 2.5, None, "x"]}),
]


def _redis_store(url: str, namespace: str | None = None) -> SessionStore:
    pytest.importorskip("redis", reason="redis-py is not installed: pip install -e '.[dev]'")
    from snakepool.pool._redis_store import RedisSessionStore

    return RedisSessionStore(url, namespace=namespace or f"test-{uuid.uuid4().hex}")


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[SessionStore]:
    if request.param == "memory":
        made: SessionStore = MemorySessionStore()
    else:
        made = _redis_store(request.getfixturevalue("redis_url"))
    try:
        yield made
    finally:
        await made.aclose()


async def _define_all(store: SessionStore, session_id: str) -> None:
    for spec, initial in SPECS:
        await store.define(session_id, spec, initial, {})


# --- lifecycle ------------------------------------------------------------------------------


async def test_create_status_touch_delete_count(store: SessionStore) -> None:
    assert await store.count() == 0
    assert await store.create("s1", 60) is True
    assert await store.create("s1", 60) is False  # already live
    assert await store.create("s2", 60) is True
    assert await store.status("s1") == "live"
    assert await store.count() == 2
    await store.touch("s1")

    assert await store.delete("s1") is True
    assert await store.status("s1") == "expired"
    assert await store.delete("s1") is False
    assert await store.count() == 1
    with pytest.raises(SessionExpired, match="'s1'"):
        await store.touch("s1")
    with pytest.raises(SessionExpired, match="'s1'"):
        await store.create("s1", 60)  # a closed id is not reused
    with pytest.raises(SessionExpired, match="'s1'"):
        await store.load_state("s1")

    assert await store.create("forever", math.inf) is True
    await store.touch("forever")
    assert await store.status("forever") == "live"
    assert await store.count() == 2


async def test_unknown_session(store: SessionStore) -> None:
    assert await store.status("nope") == "unknown"
    spec = VariableSpec("x", "int")
    for attempt in (
        store.touch("nope"),
        store.load_state("nope"),
        store.save_state("nope", "k", 1),
        store.variables("nope"),
        store.version("nope"),
        store.define("nope", spec, 1, {}),
        store.update("nope", {"x": (1, None)}),
    ):
        with pytest.raises(SessionNotFound, match="'nope'"):
            await attempt
    with pytest.raises(SessionNotFound, match="'nope'"):
        async with store.watch("nope", []):
            pass
    assert await store.count() == 0


async def test_session_ids_with_separators_stay_apart(store: SessionStore) -> None:
    await store.create("a", 60)
    await store.create("a:state", 60)
    await store.save_state("a:state", "k", 1)
    assert await store.load_state("a") == {}
    assert await store.load_state("a:state") == {"k": 1}


async def test_ttl_expiry(store: SessionStore) -> None:
    await store.create("short", 0.3)
    await store.create("long", 60)
    await wait_until(lambda: _is(store.status("short"), "expired"))
    with pytest.raises(SessionExpired, match="'short'"):
        await store.touch("short")
    with pytest.raises(SessionExpired, match="'short'"):
        await store.variables("short")
    assert await store.status("long") == "live"
    assert await store.count() == 1
    reported: list[str] = []

    async def reported_short() -> bool:
        reported.extend(await store.expired())
        return "short" in reported

    await wait_until(reported_short)
    assert reported == ["short"]
    assert "short" not in await store.expired()  # reported once


async def test_touch_keeps_a_session_alive(store: SessionStore) -> None:
    # A TTL of 2 s: a machine that stalls between two touches must not expire it.
    await store.create("s", 2.0)
    await store.save_state("s", "k", "v")
    await store.define("s", VariableSpec("x", "int"), 1, {})
    deadline = time.monotonic() + 2.6  # past the TTL
    while time.monotonic() < deadline:
        await store.touch("s")
        await anyio.sleep(0.05)
    assert await store.status("s") == "live"
    assert await store.load_state("s") == {"k": "v"}  # every part of it lives on
    assert (await store.variables("s"))["x"].value == 1


async def _is(awaitable: Any, expected: Any) -> bool:
    return bool(await awaitable == expected)


# --- state ----------------------------------------------------------------------------------


async def test_save_and_load_state(store: SessionStore) -> None:
    await store.create("s", 60)
    assert await store.load_state("s") == {}
    values = {
        "bytes": b"\x00\xffraw",
        "text": "héllo",
        "int": 2**40,
        "float": 1.5,
        "none": None,
        "list": [1, "two", b"3"],
        "nested": {"a": {"b": [True, False]}},
    }
    for key, value in values.items():
        await store.save_state("s", key, value)
    await store.save_state("s", "int", 7)  # overwrite
    loaded = await store.load_state("s")
    assert loaded == {**values, "int": 7}
    assert isinstance(loaded["bytes"], bytes)
    loaded["new"] = 1  # a copy: the store is not changed
    assert "new" not in await store.load_state("s")


# --- variables ------------------------------------------------------------------------------


async def test_define_every_type(store: SessionStore) -> None:
    await store.create("s", 60)
    assert await store.version("s") == 0
    for spec, initial in SPECS:
        record = await store.define("s", spec, initial, {"by": "test"})
        assert (record.spec, record.value, record.version) == (spec, initial, 1)
        assert dict(record.metadata) == {"by": "test"}
    assert await store.version("s") == len(SPECS)
    records = await store.variables("s")
    assert sorted(records) == sorted(spec.name for spec, _ in SPECS)
    for spec, initial in SPECS:
        assert records[spec.name].spec == spec
        assert records[spec.name].value == initial
        assert records[spec.name].version == 1
    assert isinstance(records["temperature"].value, float)


async def test_define_validates_and_coerces(store: SessionStore) -> None:
    await store.create("s", 60)
    record = await store.define("s", VariableSpec("t", "float", {"max": 2}), 1, {})
    assert record.value == 1.0
    assert isinstance((await store.variables("s"))["t"].value, float)
    with pytest.raises(ValueError, match=r"'n'.*above max=5"):
        await store.define("s", VariableSpec("n", "int", {"max": 5}), 6, {})
    with pytest.raises(ValueError, match=r"'p'.*does not match pattern"):
        await store.define("s", VariableSpec("p", "str", {"pattern": "[a-z]+"}), "ABC", {})
    assert sorted(await store.variables("s")) == ["t"]
    assert await store.version("s") == 1


async def test_redefine(store: SessionStore) -> None:
    await store.create("s", 60)
    spec = VariableSpec("mode", "choice", {"choices": ("fast", "slow")})
    await store.define("s", spec, "fast", {})
    await store.update("s", {"mode": ("slow", None)})
    again = await store.define("s", spec, "fast", {"ignored": True})  # same spec: kept as is
    assert (again.value, again.version, dict(again.metadata)) == ("slow", 2, {})
    assert await store.version("s") == 2
    other = VariableSpec("mode", "choice", {"choices": ["fast", "slow", "medium"]})
    with pytest.raises(ValueError, match=r"'mode'.*redefined"):
        await store.define("s", other, "fast", {})
    with pytest.raises(ValueError, match=r"'mode'.*redefined"):
        await store.define("s", VariableSpec("mode", "str"), "fast", {})


async def test_update_is_all_or_nothing(store: SessionStore) -> None:
    await store.create("s", 60)
    await _define_all(store, "s")
    before_version = await store.version("s")
    before = await store.variables("s")
    with pytest.raises(ValueError, match=r"'retries'.*above max=10"):
        await store.update(
            "s",
            {
                "temperature": (1.0, None),
                "retries": (11, None),
                "prompt": ("shorter", {"m": 1}),
            },
        )
    with pytest.raises(KeyError, match=r"'undefined'.*not defined"):
        await store.update("s", {"temperature": (1.0, None), "undefined": (1, None)})
    with pytest.raises(ValueError, match=r"'verbose'.*not a bool"):
        await store.update("s", {"verbose": ("yes", None)})
    assert await store.variables("s") == before
    assert await store.version("s") == before_version


async def test_update_versions_and_metadata(store: SessionStore) -> None:
    await store.create("s", 60)
    await store.define("s", VariableSpec("a", "int"), 0, {"source": "init"})
    await store.define("s", VariableSpec("b", "str"), "x", {})
    assert await store.version("s") == 2
    updates = await store.update("s", {"a": (1, None), "b": ("y", {"source": "user"})})
    assert updates == [
        VariableUpdate("a", 1, 2, {"source": "init"}),  # metadata kept when not given
        VariableUpdate("b", "y", 2, {"source": "user"}),
    ]
    assert await store.version("s") == 3
    await store.update("s", {"a": (2, {})})
    records = await store.variables("s")
    assert (records["a"].value, records["a"].version, dict(records["a"].metadata)) == (2, 3, {})
    assert (records["b"].value, records["b"].version) == ("y", 2)
    assert await store.version("s") == 4


# --- watch ----------------------------------------------------------------------------------


async def test_watch_delivers_every_update_in_order(store: SessionStore) -> None:
    await store.create("s", 60)
    await store.define("s", VariableSpec("n", "int"), 0, {})
    await store.define("s", VariableSpec("other", "str"), "", {})
    async with store.watch("s", []) as every, store.watch("s", ["n"]) as only_n:
        for i in range(1, 51):
            await store.update("s", {"n": (i, {"i": i})})
        await store.update("s", {"other": ("done", None)})
        await store.define("s", VariableSpec("late", "bool"), True, {})
        seen: list[VariableUpdate] = []
        seen_n: list[VariableUpdate] = []
        with anyio.fail_after(10):
            async for update in every:
                seen.append(update)
                if update.name == "late":
                    break
            async for update in only_n:
                seen_n.append(update)
                if update.value == 50:
                    break
    expected_n = [VariableUpdate("n", i, i + 1, {"i": i}) for i in range(1, 51)]
    assert seen_n == expected_n
    assert seen == [
        *expected_n,
        VariableUpdate("other", "done", 2, {}),
        VariableUpdate("late", True, 1, {}),
    ]


async def test_watch_sees_only_later_updates_and_ends_on_close(store: SessionStore) -> None:
    await store.create("s", 60)
    await store.define("s", VariableSpec("n", "int"), 0, {})
    await store.update("s", {"n": (1, None)})
    async with store.watch("s", ["n"]) as updates:
        await store.update("s", {"n": (2, None)})
        await store.delete("s")
        with anyio.fail_after(10):
            got = [update async for update in updates]
    assert got == [VariableUpdate("n", 2, 3, {})]


async def test_failed_update_is_not_delivered(store: SessionStore) -> None:
    await store.create("s", 60)
    await store.define("s", VariableSpec("n", "int", {"max": 5}), 0, {})
    async with store.watch("s", []) as updates:
        with pytest.raises(ValueError, match="'n'"):
            await store.update("s", {"n": (6, None)})
        await store.update("s", {"n": (5, None)})
        with anyio.fail_after(10):
            first = await updates.__anext__()
    assert first == VariableUpdate("n", 5, 2, {})


async def test_watch_ends_when_the_session_expires(store: SessionStore) -> None:
    await store.create("s", 0.3)
    async with store.watch("s", []) as updates:
        await wait_until(lambda: _is(store.status("s"), "expired"))
        with anyio.fail_after(10):
            assert [update async for update in updates] == []


# --- Redis only: several hosts, namespaces, outages -----------------------------------------


@pytest.fixture
async def two_hosts(redis_url: str) -> AsyncIterator[tuple[SessionStore, SessionStore]]:
    namespace = f"shared-{uuid.uuid4().hex}"
    first = open_store(redis_url, namespace=namespace)
    second = open_store(redis_url, namespace=namespace)
    try:
        yield first, second
    finally:
        await first.aclose()
        await second.aclose()


async def test_redis_hosts_share_sessions(
    two_hosts: tuple[SessionStore, SessionStore], redis_url: str
) -> None:
    first, second = two_hosts
    assert type(first).__name__ == "RedisSessionStore"
    await first.create("s", 60)
    assert await second.create("s", 60) is False
    assert await second.status("s") == "live"
    await second.save_state("s", "blob", b"\x01\x02")
    assert await first.load_state("s") == {"blob": b"\x01\x02"}
    await first.define("s", VariableSpec("x", "float", {"min": 0}), 1.0, {})
    assert (await second.variables("s"))["x"].value == 1.0
    await second.update("s", {"x": (2.0, None)})
    assert (await first.variables("s"))["x"].version == 2
    assert await first.count() == await second.count() == 1

    elsewhere = _redis_store(redis_url)  # another pool's namespace on the same Redis
    try:
        assert await elsewhere.status("s") == "unknown"
        assert await elsewhere.count() == 0
        assert await elsewhere.create("s", 60) is True
        assert await elsewhere.load_state("s") == {}
        assert await elsewhere.variables("s") == {}
    finally:
        await elsewhere.aclose()

    await second.delete("s")
    assert await first.status("s") == "expired"
    with pytest.raises(SessionExpired):
        await first.create("s", 60)


async def test_redis_watch_across_hosts_with_concurrent_writers(
    two_hosts: tuple[SessionStore, SessionStore],
) -> None:
    first, second = two_hosts
    await first.create("s", 60)
    await first.define("s", VariableSpec("n", "int"), 0, {})
    writes = 40
    async with second.watch("s", ["n"]) as updates:
        async with anyio.create_task_group() as tg:
            for i in range(writes):
                tg.start_soon((first if i % 2 else second).update, "s", {"n": (i, {"writer": i})})
        got: list[VariableUpdate] = []
        with anyio.fail_after(10):
            async for update in updates:
                got.append(update)
                if len(got) == writes:
                    break
    # Every write applied exactly once, serialized: versions 2..41, each value once.
    assert [u.version for u in got] == list(range(2, writes + 2))
    assert sorted(u.value for u in got) == list(range(writes))
    assert all(dict(u.metadata) == {"writer": u.value} for u in got)
    final = (await first.variables("s"))["n"]
    assert (final.value, final.version) == (got[-1].value, writes + 1)
    assert await second.version("s") == writes + 1


async def test_redis_down_and_back() -> None:
    port = free_port()
    server = start_redis_server(port)
    url = f"redis://127.0.0.1:{port}/0"
    store = _redis_store(url)
    try:
        await store.create("s", 60)
        await store.define("s", VariableSpec("n", "int"), 0, {})
        async with store.watch("s", []) as updates:
            stop_redis_server(server)
            for attempt in (store.status("s"), store.update("s", {"n": (1, None)}), store.count()):
                with pytest.raises(
                    ConnectionError, match=rf"session store redis at {url} is unavailable"
                ):
                    await attempt
            with anyio.fail_after(10), pytest.raises(ConnectionError, match="unavailable"):
                await updates.__anext__()

        server = start_redis_server(port)  # back, empty (no persistence)
        await wait_until(lambda: _is(store.status("s"), "unknown"), timeout=10)
        assert await store.create("s", 60) is True
        await store.define("s", VariableSpec("n", "int"), 0, {})
        async with store.watch("s", []) as updates:
            await store.update("s", {"n": (1, None)})
            with anyio.fail_after(10):
                assert await updates.__anext__() == VariableUpdate("n", 1, 2, {})
    finally:
        await store.aclose()
        stop_redis_server(server)


async def test_redis_session_keys_all_expire(redis_url: str) -> None:
    import redis.asyncio

    namespace = f"keys-{uuid.uuid4().hex}"
    store = _redis_store(redis_url, namespace)
    raw = redis.asyncio.Redis.from_url(redis_url)
    try:
        await store.create("s", 2.0)  # (it must outlive the round trips below on a slow machine)
        await store.save_state("s", "k", 1)
        await store.define("s", VariableSpec("x", "int"), 1, {})
        await store.update("s", {"x": (2, None)})
        keys = sorted(k.decode() for k in await raw.keys(f"snakepool:{namespace}:*"))
        prefix = f"snakepool:{namespace}:s:s:"
        assert keys == [f"snakepool:{namespace}:live"] + [
            prefix + part for part in ("head", "seen", "state", "vars")
        ]
        for key in keys:
            if key.startswith(prefix):
                assert 0 < await raw.pttl(key) <= (2000 if not key.endswith("seen") else 10**9)
        await wait_until(lambda: _is(store.status("s"), "expired"), timeout=10)
        await wait_until(
            lambda: _is(raw.keys(f"{prefix}*"), [f"{prefix}seen".encode()]), timeout=10
        )
    finally:
        await raw.aclose()
        await store.aclose()


async def test_redis_watch_reports_missed_updates(redis_url: str) -> None:
    import msgpack
    import redis.asyncio

    namespace = f"gap-{uuid.uuid4().hex}"
    store = _redis_store(redis_url, namespace)
    raw = redis.asyncio.Redis.from_url(redis_url)
    try:
        await store.create("s", 60)
        await store.define("s", VariableSpec("n", "int"), 0, {})
        async with store.watch("s", []) as updates:
            # As if the watcher's connection dropped while versions 2..4 were published.
            message = {"v": 5, "u": [["n", 4, 5, {}]]}
            await raw.publish(f"snakepool:{namespace}:s:s:updates", msgpack.packb(message))
            with (
                anyio.fail_after(10),
                pytest.raises(ConnectionError, match=r"missed updates 2\.\.4"),
            ):
                await updates.__anext__()
    finally:
        await raw.aclose()
        await store.aclose()


def test_redis_error_messages_hide_the_password() -> None:
    pytest.importorskip("redis")
    from snakepool.pool._redis_store import _redact

    assert _redact("redis://:s3cret@host:6379/0") == "redis://:***@host:6379/0"
    assert _redact("redis://user:s3cret@host/0") == "redis://user:***@host/0"
    assert _redact("redis://host:6379/0") == "redis://host:6379/0"
