"""A session store in Redis, shared by every host process that uses the same URL and namespace.

Keys (``P`` is ``snakepool:{namespace}:``, ``S`` is ``P s:{session_id}:``; session ids
follow ``check_session_id``'s rule, so a key is never a glob pattern nor unbounded)::

    S meta      hash   {ttl}: the session is live exactly while this key exists
    S state     hash   key -> msgpack(value)              (``save_state``)
    S vars      hash   name -> msgpack({spec, value, version, metadata})
    S version   int    grows with every define/update of the session
    S seen      str    tombstone, outlives the session by a day: "expired" vs "unknown"
    S updates   pub/sub channel: msgpack({"v": version, "u": [[name, value, version, metadata]]})
    P live      zset   session id -> expiry (unix seconds), for ``count`` and ``expired``

Every key of a session carries the same expiry: ``create`` and ``touch`` set it on all of
them, and a write copies the ``meta`` key's remaining TTL onto the key it writes. Writes run
in WATCH/MULTI/EXEC transactions (retried when another host got there first), and an update
is published in the same transaction as the write, so watchers on every host see updates in
commit order. Works with the asyncio backend only (redis-py's ``redis.asyncio``).
"""

from __future__ import annotations

import collections
import contextlib
import math
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from typing import Any, TypeVar

import anyio
import msgpack

try:
    import redis.asyncio as aioredis
    from redis.asyncio.retry import Retry
    from redis.backoff import ExponentialBackoff
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError
    from redis.exceptions import WatchError
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "a redis:// session store needs redis-py: pip install 'snakepool[redis]'"
    ) from exc

from ..errors import InvalidSessionId, SessionExpired, SessionNotFound
from ._store import (
    SessionStatus,
    SessionStore,
    VariableRecord,
    check_changes,
    check_session_id,
)
from ._variables import VariableSpec, VariableUpdate

__all__ = ["RedisSessionStore"]

_T = TypeVar("_T")
_TOMBSTONE_EXTRA_MS = 24 * 3600 * 1000  # the tombstone outlives the session by a day
_LIVE_GRACE_S = 3600.0  # count() forgets expired ids after this; expired() reports them before
_WATCH_IDLE_S = 2.0  # a watcher checks that its session still lives after this much silence
_SUBSCRIBE_TIMEOUT_S = 5.0


def _pack(value: Any) -> bytes:
    data: bytes = msgpack.packb(value, use_bin_type=True)
    return data


def _unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


_MAX_TTL_S = 100 * 365 * 24 * 3600.0  # a TTL of math.inf: a hundred years


def _ms(seconds: float) -> int:
    return max(1, math.ceil(min(seconds, _MAX_TTL_S) * 1000))


def _redact(url: str) -> str:
    """The URL without its password, for error messages."""
    try:
        parts = urllib.parse.urlsplit(url)
        if parts.password is None:
            return url
        netloc = parts.netloc.rsplit("@", 1)[1]
        user = f"{parts.username}:***@" if parts.username else ":***@"
        return urllib.parse.urlunsplit(parts._replace(netloc=user + netloc))
    except ValueError:
        return "<redis url>"


def _record(data: Any) -> VariableRecord:
    raw = _unpack(data)
    return VariableRecord(
        spec=VariableSpec.from_dict(raw["spec"]),
        value=raw["value"],
        version=int(raw["version"]),
        metadata=dict(raw["metadata"] or {}),
    )


def _multi(pipe: aioredis.client.Pipeline) -> None:
    """Start the write phase of a WATCH transaction (``Pipeline.multi`` is untyped)."""
    multi: Callable[[], None] = pipe.multi
    multi()


def _pack_record(record: VariableRecord) -> bytes:
    return _pack(
        {
            "spec": record.spec.to_dict(),
            "value": record.value,
            "version": record.version,
            "metadata": dict(record.metadata),
        }
    )


class RedisSessionStore(SessionStore):
    """Sessions in Redis: several host processes (or machines) share them."""

    def __init__(self, url: str, *, namespace: str) -> None:
        if not namespace:
            raise ValueError("RedisSessionStore needs a non-empty namespace")
        self._url = url
        self._prefix = f"snakepool:{namespace}:"
        self._live_key = f"{self._prefix}live"
        self._redis = aioredis.Redis.from_url(
            url,
            socket_connect_timeout=2,
            socket_timeout=5,
            health_check_interval=30,
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 2),
        )

    # --- plumbing ---------------------------------------------------------------------

    def _key(self, session_id: str, part: str) -> str:
        # Every key of a session is built here: a bad id (a glob such as "*", a
        # path, 300 characters) is refused before it can reach Redis.
        return f"{self._prefix}s:{check_session_id(session_id)}:{part}"

    def _data_keys(self, session_id: str) -> list[str]:
        return [self._key(session_id, part) for part in ("meta", "state", "vars", "version")]

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except (RedisConnectionError, RedisTimeoutError) as exc:
            raise ConnectionError(
                f"session store redis at {_redact(self._url)} is unavailable: {exc}"
            ) from exc

    async def _transaction(
        self, watch: list[str], body: Callable[[aioredis.client.Pipeline], Awaitable[_T]]
    ) -> tuple[_T, list[Any]]:
        """Run ``body`` (reads, then ``multi()`` and queued writes) until EXEC succeeds.

        Returns what ``body`` returned and what EXEC did (empty if ``body`` queued nothing).
        """
        with self._errors():
            async with self._redis.pipeline(transaction=True) as pipe:
                while True:
                    try:
                        await pipe.watch(*watch)
                        result = await body(pipe)
                        if not pipe.explicit_transaction:
                            return result, []
                        return result, await pipe.execute()
                    except WatchError:
                        await anyio.lowlevel.checkpoint()  # another host wrote first: again

    async def _not_live(self, session_id: str, client: aioredis.Redis) -> Exception:
        if await client.exists(self._key(session_id, "seen")):
            return SessionExpired(f"session {session_id!r} expired or was closed")
        return SessionNotFound(f"no session {session_id!r}")

    async def _pttl(self, pipe: aioredis.client.Pipeline, session_id: str) -> int:
        """The live session's remaining TTL in ms (in a transaction's read phase)."""
        meta = self._key(session_id, "meta")
        pttl = int(await pipe.pttl(meta))
        if pttl == -2:
            raise await self._not_live(session_id, pipe)
        if pttl < 0:  # no expiry (should not happen): use the session's own TTL
            pttl = _ms(float(await pipe.hget(meta, "ttl") or 1.0))
        return pttl

    async def _read(self, session_id: str, command: str, key: str) -> Any:
        """``command key`` on a live session (atomic with the liveness check)."""
        with self._errors():
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.exists(self._key(session_id, "meta"))
                pipe.execute_command(command, key)
                live, result = await pipe.execute()
            if not live:
                raise await self._not_live(session_id, self._redis)
            return result

    # --- lifecycle --------------------------------------------------------------------

    async def create(self, session_id: str, ttl: float) -> bool:
        if not ttl > 0:
            raise ValueError(f"session ttl must be > 0, got {ttl!r}")
        meta, state, variables, version = self._data_keys(session_id)
        seen = self._key(session_id, "seen")
        ttl_ms = _ms(ttl)

        async def body(pipe: aioredis.client.Pipeline) -> bool:
            if await pipe.exists(meta):
                return False
            if await pipe.exists(seen):
                # The reads are not atomic: a concurrent create may have committed
                # (meta and seen together) between them. Then the session is live.
                if await pipe.exists(meta):
                    return False
                raise SessionExpired(f"session {session_id!r} expired or was closed; use a new id")
            _multi(pipe)
            pipe.delete(state, variables)
            pipe.hset(meta, "ttl", repr(float(ttl)))
            pipe.pexpire(meta, ttl_ms)
            pipe.set(version, 0, px=ttl_ms)
            pipe.set(seen, 1, px=ttl_ms + _TOMBSTONE_EXTRA_MS)
            pipe.zadd(self._live_key, {session_id: time.time() + min(ttl, _MAX_TTL_S)})
            return True

        return (await self._transaction([meta, seen], body))[0]

    async def status(self, session_id: str) -> SessionStatus:
        with self._errors():
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.exists(self._key(session_id, "meta"))
                pipe.exists(self._key(session_id, "seen"))
                live, seen = await pipe.execute()
        if live:
            return "live"
        return "expired" if seen else "unknown"

    async def touch(self, session_id: str) -> float:
        keys = self._data_keys(session_id)
        seen = self._key(session_id, "seen")

        async def body(pipe: aioredis.client.Pipeline) -> float:
            ttl = await pipe.hget(keys[0], "ttl")
            if ttl is None:
                raise await self._not_live(session_id, pipe)
            seconds = float(ttl)
            _multi(pipe)
            for key in keys:
                pipe.pexpire(key, _ms(seconds))
            pipe.pexpire(seen, _ms(seconds) + _TOMBSTONE_EXTRA_MS)
            pipe.zadd(self._live_key, {session_id: time.time() + min(seconds, _MAX_TTL_S)})
            return seconds

        seconds, _ = await self._transaction([keys[0]], body)
        return seconds

    async def delete(self, session_id: str) -> bool:
        keys = self._data_keys(session_id)
        seen = self._key(session_id, "seen")

        async def body(pipe: aioredis.client.Pipeline) -> bool:
            ttl = await pipe.hget(keys[0], "ttl")
            had_tombstone = bool(await pipe.exists(seen))
            _multi(pipe)
            pipe.delete(*keys)
            pipe.zrem(self._live_key, session_id)
            if ttl is not None:
                pipe.set(seen, 1, px=_ms(float(ttl)) + _TOMBSTONE_EXTRA_MS)
                pipe.publish(self._key(session_id, "updates"), _pack({"closed": True}))
            elif not had_tombstone:
                pipe.set(seen, 1, px=_TOMBSTONE_EXTRA_MS)
            return ttl is not None

        return (await self._transaction([keys[0], seen], body))[0]

    async def count(self) -> int:
        now = time.time()
        with self._errors():
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.zremrangebyscore(self._live_key, "-inf", now - _LIVE_GRACE_S)
                pipe.zcount(self._live_key, f"({now}", "+inf")
                _, live = await pipe.execute()
        return int(live)

    async def expired(self) -> list[str]:
        """Sessions that expired since the last call, each reported by one host only."""
        with self._errors():
            candidates = await self._redis.zrangebyscore(self._live_key, "-inf", time.time())
        found: list[str] = []
        for raw in candidates:
            member: bytes | str = raw if isinstance(raw, bytes) else str(raw)
            session_id = member.decode(errors="replace") if isinstance(member, bytes) else member
            try:
                meta = self._key(session_id, "meta")
            except InvalidSessionId:  # written by something else (an older version): drop it
                with self._errors():
                    await self._redis.zrem(self._live_key, member)
                continue

            async def body(
                pipe: aioredis.client.Pipeline, meta: str = meta, sid: str = session_id
            ) -> None:
                if await pipe.exists(meta):
                    return  # touched meanwhile: still live
                _multi(pipe)
                pipe.zrem(self._live_key, sid)

            _, done = await self._transaction([meta], body)
            if done and done[0]:  # this host removed it: this host reports it
                found.append(session_id)
        return found

    async def aclose(self) -> None:
        with anyio.CancelScope(shield=True):
            await self._redis.aclose()

    # --- state --------------------------------------------------------------------------

    async def save_state(self, session_id: str, key: str, value: Any) -> int:
        meta, state = self._key(session_id, "meta"), self._key(session_id, "state")
        packed = _pack(value)

        async def body(pipe: aioredis.client.Pipeline) -> None:
            pttl = await self._pttl(pipe, session_id)
            _multi(pipe)
            pipe.hset(state, key, packed)
            pipe.pexpire(state, pttl)
            pipe.hincrby(meta, "state_version", 1)

        _, results = await self._transaction([meta], body)
        return int(results[-1])

    async def state_version(self, session_id: str) -> int:
        return (await self.versions(session_id))[1]

    async def versions(self, session_id: str) -> tuple[int, int]:
        with self._errors():
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.exists(self._key(session_id, "meta"))
                pipe.get(self._key(session_id, "version"))
                pipe.hget(self._key(session_id, "meta"), "state_version")
                live, version, state_version = await pipe.execute()
            if not live:
                raise await self._not_live(session_id, self._redis)
        return int(version or 0), int(state_version or 0)

    async def load_state(self, session_id: str) -> dict[str, Any]:
        raw: dict[bytes, bytes] = await self._read(
            session_id, "HGETALL", self._key(session_id, "state")
        )
        return {k.decode(): _unpack(v) for k, v in _pairs(raw)}

    # --- variables ----------------------------------------------------------------------

    async def variables(self, session_id: str) -> dict[str, VariableRecord]:
        raw = await self._read(session_id, "HGETALL", self._key(session_id, "vars"))
        return {k.decode(): _record(v) for k, v in _pairs(raw)}

    async def version(self, session_id: str) -> int:
        raw = await self._read(session_id, "GET", self._key(session_id, "version"))
        return int(raw or 0)

    async def define(
        self, session_id: str, spec: VariableSpec, value: Any, metadata: Mapping[str, Any]
    ) -> VariableRecord:
        meta, variables, version = (self._key(session_id, p) for p in ("meta", "vars", "version"))
        channel = self._key(session_id, "updates")

        async def body(pipe: aioredis.client.Pipeline) -> VariableRecord:
            pttl = await self._pttl(pipe, session_id)
            existing = await pipe.hget(variables, spec.name)
            if existing is not None:
                record = _record(existing)
                if record.spec.to_dict() != _unpack(_pack(spec.to_dict())):  # as msgpack keeps it
                    raise ValueError(
                        f"variable {spec.name!r} is already defined as {record.spec.type} "
                        f"{dict(record.spec.constraints)}; it cannot be redefined differently"
                    )
                return record
            record = VariableRecord(
                spec=spec, value=spec.validate(value), version=1, metadata=dict(metadata)
            )
            session_version = int(await pipe.get(version) or 0) + 1
            message = {"v": session_version, "u": [[spec.name, record.value, 1, record.metadata]]}
            _multi(pipe)
            pipe.hset(variables, spec.name, _pack_record(record))
            pipe.pexpire(variables, pttl)
            pipe.incr(version)
            pipe.pexpire(version, pttl)
            pipe.publish(channel, _pack(message))
            return record

        return (await self._transaction([meta, variables, version], body))[0]

    async def update(
        self, session_id: str, changes: Mapping[str, tuple[Any, Mapping[str, Any] | None]]
    ) -> list[VariableUpdate]:
        meta, variables, version = (self._key(session_id, p) for p in ("meta", "vars", "version"))
        channel = self._key(session_id, "updates")
        names = list(changes)

        async def body(pipe: aioredis.client.Pipeline) -> list[VariableUpdate]:
            pttl = await self._pttl(pipe, session_id)
            current: dict[str, VariableRecord] = {}
            if names:
                for name, data in zip(names, await pipe.hmget(variables, names), strict=True):
                    if data is not None:
                        current[name] = _record(data)
            updated = check_changes(current, changes, session_id)
            session_version = int(await pipe.get(version) or 0) + 1
            updates = [
                VariableUpdate(n, r.value, r.version, r.metadata) for n, r in updated.items()
            ]
            message = {
                "v": session_version,
                "u": [[u.name, u.value, u.version, dict(u.metadata)] for u in updates],
            }
            _multi(pipe)
            if updated:
                pipe.hset(variables, mapping={n: _pack_record(r) for n, r in updated.items()})
                pipe.pexpire(variables, pttl)
            pipe.incr(version)
            pipe.pexpire(version, pttl)
            pipe.publish(channel, _pack(message))
            return updates

        return (await self._transaction([meta, variables, version], body))[0]

    @contextlib.asynccontextmanager
    async def watch(
        self, session_id: str, names: Iterable[str]
    ) -> AsyncIterator[AsyncIterator[VariableUpdate]]:
        wanted = frozenset(names)
        pubsub = self._redis.pubsub()
        try:
            with self._errors():
                await pubsub.subscribe(self._key(session_id, "updates"))
                # Wait for the confirmation: from here on, every publish reaches us.
                with anyio.fail_after(_SUBSCRIBE_TIMEOUT_S):
                    while True:
                        message = await pubsub.get_message(timeout=_SUBSCRIBE_TIMEOUT_S)
                        if message is not None and message["type"] == "subscribe":
                            break
                # Updates up to this version happened before the watch began.
                base = await self._read(session_id, "GET", self._key(session_id, "version"))
            yield _Watcher(self, pubsub, session_id, wanted, int(base or 0))
        finally:
            with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                close: Callable[[], Awaitable[None]] = pubsub.aclose
                await close()


def _pairs(raw: Any) -> Iterable[tuple[bytes, bytes]]:
    if isinstance(raw, dict):
        return raw.items()
    it = iter(raw or ())  # RESP2 without response callbacks: a flat list
    return zip(it, it, strict=True)


class _Watcher:
    """The async iterator ``RedisSessionStore.watch`` yields."""

    def __init__(
        self,
        store: RedisSessionStore,
        pubsub: aioredis.client.PubSub,
        session_id: str,
        names: frozenset[str],
        base: int,
    ) -> None:
        self._store = store
        self._pubsub = pubsub
        self._session_id = session_id
        self._names = names
        self._last = base
        self._pending: collections.deque[VariableUpdate] = collections.deque()
        self._done = False

    def __aiter__(self) -> _Watcher:
        return self

    async def __anext__(self) -> VariableUpdate:
        while not self._pending:
            if self._done:
                raise StopAsyncIteration
            with self._store._errors():
                message = await self._pubsub.get_message(
                    ignore_subscribe_messages=True, timeout=_WATCH_IDLE_S
                )
                if message is None:
                    if await self._store.status(self._session_id) != "live":
                        self._done = True
                    continue
            if message["type"] != "message":
                continue
            payload = _unpack(message["data"])
            if payload.get("closed"):
                self._done = True
                continue
            version = int(payload["v"])
            if version <= self._last:
                continue  # committed before the watch began
            if version != self._last + 1:
                self._done = True
                raise ConnectionError(
                    f"watch on session {self._session_id!r} missed updates "
                    f"{self._last + 1}..{version - 1} (the redis connection was interrupted)"
                )
            self._last = version
            for name, value, var_version, metadata in payload["u"]:
                if not self._names or name in self._names:
                    self._pending.append(VariableUpdate(name, value, var_version, metadata))
        return self._pending.popleft()
