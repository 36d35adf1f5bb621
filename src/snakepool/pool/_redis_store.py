"""A session store in Redis, shared by every host process that uses the same URL and namespace.

Keys (``P`` is ``snakepool:{namespace}:``, ``S`` is ``P s:{session_id}:``; session ids
follow ``check_session_id``'s rule, so a key is never a glob pattern nor unbounded)::

    S head      str    "version:state_version:incarnation:ttl_ms"; the session is live
                       exactly while this key exists
    S state     hash   key -> msgpack(value)              (``save_state``)
    S vars      hash   name -> msgpack({spec, value, version, metadata})
    S seen      str    tombstone, outlives the session by a day: "expired" vs "unknown"
    S updates   pub/sub channel: msgpack({"v": version, "u": [[name, value, version, metadata]]})
    P live      zset   session id -> expiry (unix seconds), for ``count`` and ``expired``

What a session call costs: ``versions()`` joins the reads asked for while the previous
one was in flight, and they go as one ``MGET`` of ``head`` keys: one round trip shared by
every session call starting at that moment on this host, and no write (the TTL is
refreshed by ``touch``, which the pool calls at most once per tenth of the TTL, batched
the same way). A read that starts after a call started sees every write acknowledged
before it: that is the cross-host guarantee (see docs/sessions.md).

Every write is one Lua script, atomic in Redis: ``create``, ``delete``, ``touch``,
``expired``, and a compare-and-set (``_CAS``) for ``save_state``, ``define`` and
``update``, which read first and apply only if ``head`` has not changed meanwhile (else
they read again); an update is published by the script that applies it, so watchers on
every host see updates in commit order. Every key of a session carries the session's
expiry: Redis expires them, nothing scans for them. ``incarnation`` is drawn at
``create``: the versions a pool compares change when a session is created anew under
the same id (after Redis lost its data), so no worker's older copy ever matches.
Works with the asyncio backend only (redis-py's ``redis.asyncio``); needs Redis >= 6.0.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import secrets
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from typing import Any, TypeVar, cast

import anyio
import msgpack

try:
    import redis.asyncio as aioredis
    from redis.asyncio.retry import Retry
    from redis.backoff import ExponentialBackoff
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "a redis:// session store needs redis-py: pip install 'snakepool[redis]'"
    ) from exc

from ..errors import InvalidSessionId, SessionExpired, SessionNotFound, SessionStoreUnavailable
from ._batch import Batcher
from ._store import (
    SessionStatus,
    SessionStore,
    VariableRecord,
    check_changes,
    check_session_id,
)
from ._variables import VariableSpec, VariableUpdate

# A command packed in C (~1 us, not redis-py's ~10 for a batch's MGET); the redis
# extra installs hiredis. (Its stub takes a one-item tuple: hence the cast.)
_pack_command: Callable[[tuple[str, ...]], bytes] | None
try:
    import hiredis  # type: ignore[import-not-found,unused-ignore]  # (core-only check)

    _pack_command = cast("Callable[[tuple[str, ...]], bytes]", hiredis.pack_command)
except ImportError:  # pragma: no cover - depends on the environment
    _pack_command = None

__all__ = ["RedisSessionStore"]

_Args = list[bytes | str | int | float]  # a script's ARGV
_K = TypeVar("_K")
_V = TypeVar("_V")
_T = TypeVar("_T")
_TOMBSTONE_EXTRA_MS = 24 * 3600 * 1000  # the tombstone outlives the session by a day
_LIVE_GRACE_S = 3600.0  # count() forgets expired ids after this; expired() reports them before
_WATCH_IDLE_S = 2.0  # a watcher checks that its session still lives after this much silence
_SUBSCRIBE_TIMEOUT_S = 5.0
_CHUNK = 1000  # keys per command: a big batch goes as several commands in one round trip
_EXPIRED_PER_CALL = 100_000  # expired() reports at most this many at a time
_MAX_TTL_S = 100 * 365 * 24 * 3600.0  # a TTL of math.inf: a hundred years

# Default timeouts (a URL's query overrides them: redis://host/0?socket_timeout=1).
_CONNECT_TIMEOUT_S = 2.0
_COMMAND_TIMEOUT_S = 5.0
_CONNECTIONS = 32  # the most connections a host's commands use at once

# --- scripts (KEYS are every key a script touches, as Redis asks) --------------------------

#: KEYS head, seen, state, vars, live; ARGV head, ttl_ms, tombstone_ms, expiry, id.
#: 1: created; 0: already live; -1: the id was used before (expired or closed).
_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
if redis.call('EXISTS', KEYS[2]) == 1 then return -1 end
redis.call('DEL', KEYS[3], KEYS[4])
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('SET', KEYS[2], 1, 'PX', ARGV[3])
redis.call('ZADD', KEYS[5], ARGV[4], ARGV[5])
return 1
"""

#: KEYS live, then head, state, vars, seen of each session; ARGV now, tombstone extra ms,
#: then the session ids. Per session: its TTL in ms, or -1 if it is not live.
_TOUCH = """
local now, extra, out = tonumber(ARGV[1]), tonumber(ARGV[2]), {}
for i = 3, #ARGV do
  local k = 2 + (i - 3) * 4
  local head = redis.call('GET', KEYS[k])
  if head then
    local ttl = tonumber(string.match(head, ':(%d+)$'))
    redis.call('PEXPIRE', KEYS[k], ttl)
    redis.call('PEXPIRE', KEYS[k + 1], ttl)
    redis.call('PEXPIRE', KEYS[k + 2], ttl)
    redis.call('PEXPIRE', KEYS[k + 3], ttl + extra)
    redis.call('ZADD', KEYS[1], now + ttl / 1000, ARGV[i])
    out[#out + 1] = ttl
  else
    out[#out + 1] = -1
  end
end
return out
"""

#: KEYS head, state, vars, seen, live; ARGV id, channel, closed message, tombstone extra ms.
#: 1 if the session was live.
_DELETE = """
local head = redis.call('GET', KEYS[1])
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
redis.call('ZREM', KEYS[5], ARGV[1])
if head then
  local ttl = tonumber(string.match(head, ':(%d+)$'))
  redis.call('SET', KEYS[4], 1, 'PX', ttl + tonumber(ARGV[4]))
  redis.call('PUBLISH', ARGV[2], ARGV[3])
  return 1
end
if redis.call('EXISTS', KEYS[4]) == 0 then redis.call('SET', KEYS[4], 1, 'PX', ARGV[4]) end
return 0
"""

#: KEYS live, then the head of each candidate; ARGV the candidates' ids. Those whose head
#: is gone, taken out of ``live`` by this call (so only one host reports each).
_EXPIRED = """
local gone = {}
for i = 2, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 0 and redis.call('ZREM', KEYS[1], ARGV[i - 1]) == 1 then
    gone[#gone + 1] = ARGV[i - 1]
  end
end
return gone
"""

#: KEYS head, a hash; ARGV a read of the hash (HGETALL, or HMGET and fields; none: no read).
#: {head, what the read returns}, atomically; {} if the session is not live.
_READ = """
local head = redis.call('GET', KEYS[1])
if not head then return {} end
if #ARGV == 0 then return {head} end
return {head, redis.call(ARGV[1], KEYS[2], unpack(ARGV, 2))}
"""

#: Compare-and-set. KEYS head, a hash; ARGV the head as read, the new head, a channel and a
#: message to publish ('' for none), then field, value pairs for the hash (which gets the
#: session's remaining TTL). 0 if head changed since it was read (or the session ended).
_CAS = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
local pttl = redis.call('PTTL', KEYS[1])
redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL')
if #ARGV > 4 then
  redis.call('HSET', KEYS[2], unpack(ARGV, 5))
  if pttl > 0 then redis.call('PEXPIRE', KEYS[2], pttl) end
end
if ARGV[3] ~= '' then redis.call('PUBLISH', ARGV[3], ARGV[4]) end
return 1
"""


def _pack(value: Any) -> bytes:
    data: bytes = msgpack.packb(value, use_bin_type=True)
    return data


def _unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


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


class _Head:
    """A session's ``head`` key: its versions, incarnation and TTL."""

    __slots__ = ("incarnation", "raw", "state_version", "ttl_ms", "version")

    def __init__(self, raw: bytes) -> None:
        version, state_version, incarnation, ttl_ms = raw.split(b":")
        self.raw = raw
        self.version = int(version)
        self.state_version = int(state_version)
        self.incarnation = int(incarnation)
        self.ttl_ms = int(ttl_ms)

    @staticmethod
    def encode(version: int, state_version: int, incarnation: int, ttl_ms: int) -> bytes:
        return b"%d:%d:%d:%d" % (version, state_version, incarnation, ttl_ms)

    def changed(self, *, version: int = 0, state_version: int = 0) -> bytes:
        """This head with its versions moved on."""
        return self.encode(
            self.version + version, self.state_version + state_version,
            self.incarnation, self.ttl_ms,
        )  # fmt: skip


def _record(data: Any) -> VariableRecord:
    raw = _unpack(data)
    return VariableRecord(
        spec=VariableSpec.from_dict(raw["spec"]),
        value=raw["value"],
        version=int(raw["version"]),
        metadata=dict(raw["metadata"] or {}),
    )


def _pack_record(record: VariableRecord) -> bytes:
    return _pack(
        {
            "spec": record.spec.to_dict(),
            "value": record.value,
            "version": record.version,
            "metadata": dict(record.metadata),
        }
    )


def _chunks(items: list[_K]) -> Iterator[list[_K]]:
    for start in range(0, len(items), _CHUNK):
        yield items[start : start + _CHUNK]


def _versions(raw: bytes) -> tuple[int, int]:
    """A session head's (variables version, state version)."""
    version, state_version, incarnation, _ = raw.split(b":")
    # The incarnation in the high bits: equal only within one life of the session.
    return int(incarnation) << 32 | int(version), int(state_version)


class RedisSessionStore(SessionStore):
    """Sessions in Redis: several host processes (or machines) share them."""

    def __init__(self, url: str, *, namespace: str) -> None:
        if not namespace:
            raise ValueError("RedisSessionStore needs a non-empty namespace")
        self._url = url
        self._prefix = f"snakepool:{namespace}:"
        self._live_key = f"{self._prefix}live"
        # One bounded pool of connections for the host's commands: a burst waits
        # for a free connection rather than opening more. Reads are batched, so
        # calls need few. Every command has a timeout; so does the wait.
        options: dict[str, Any] = {
            "socket_connect_timeout": _CONNECT_TIMEOUT_S,
            "socket_timeout": _COMMAND_TIMEOUT_S,
            "health_check_interval": 30,
            "retry": Retry(ExponentialBackoff(cap=0.5, base=0.05), 2),
        }
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=_CONNECTIONS, timeout=_COMMAND_TIMEOUT_S, **options
        )
        self._redis = aioredis.Redis.from_pool(pool)
        # A watch holds a connection while it lasts (subscribed): from a pool of
        # their own, so that watchers never take the commands' connections.
        self._watches = aioredis.Redis.from_url(url, **options)
        scripts = (_CREATE, _TOUCH, _DELETE, _EXPIRED, _READ, _CAS)
        self._create, self._touch, self._delete, self._expired, self._read_script, self._cas = (
            self._redis.register_script(script) for script in scripts
        )
        self._reader: aioredis.connection.AbstractConnection | None = None
        self._read_timeout = _COMMAND_TIMEOUT_S
        self._heads: Batcher[str, bytes | None] = Batcher(self._read_heads)
        self._touches: Batcher[str, int] = Batcher(self._touch_many)

    # --- plumbing ---------------------------------------------------------------------

    def _key(self, session_id: str, part: str) -> str:
        # Every key of a session is built here: a bad id (a glob such as "*", a
        # path, 300 characters) is refused before it can reach Redis.
        return f"{self._prefix}s:{check_session_id(session_id)}:{part}"

    def _data_keys(self, session_id: str) -> list[str]:
        return [self._key(session_id, part) for part in ("head", "state", "vars", "seen")]

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except (RedisConnectionError, RedisTimeoutError) as exc:
            raise SessionStoreUnavailable(
                f"session store redis at {_redact(self._url)} is unavailable: {exc}"
            ) from exc

    async def _mget(self, keys: list[str]) -> list[bytes | None]:
        """The string keys' values, in one round trip (whatever their number)."""
        with self._errors():
            if len(keys) <= _CHUNK:
                return cast("list[bytes | None]", await self._redis.mget(keys))
            async with self._redis.pipeline(transaction=False) as pipe:
                for chunk in _chunks(keys):
                    pipe.mget(chunk)
                return [head for heads in await pipe.execute() for head in heads]

    async def _read_heads(self, keys: list[str]) -> list[bytes | None]:
        """The batched reads' ``MGET``: on a connection of their own, taken from the
        pool once (not checked out per batch), and retried like any command.

        One timeout covers the write and the read (the connection's own would wrap
        the write in a task per batch: ``asyncio.wait_for``)."""
        conn = self._reader
        if conn is None:
            with self._errors():
                take = cast(
                    "Callable[[], Awaitable[aioredis.connection.AbstractConnection]]",
                    self._redis.connection_pool.get_connection,  # (untyped)
                )
                conn = await take()
            # (never given back to the pool: its timeout is ours to move)
            self._read_timeout = conn.socket_timeout or _COMMAND_TIMEOUT_S
            conn.socket_timeout = None
            self._reader = conn
        limit = self._read_timeout
        chunks = [("MGET", *chunk) for chunk in _chunks(keys)]
        packed = (
            conn.pack_commands(chunks)
            if _pack_command is None
            else b"".join([_pack_command(chunk) for chunk in chunks])
        )

        async def read() -> list[bytes | None]:
            try:
                async with asyncio.timeout(limit):
                    await conn.send_packed_command(packed)
                    found: list[bytes | None] = []
                    for _ in chunks:
                        found += await conn.read_response()
                return found
            except TimeoutError as exc:
                await conn.disconnect(nowait=True)
                raise RedisTimeoutError(f"no answer within {limit:g}s") from exc
            except BaseException:
                await conn.disconnect(nowait=True)  # (a reply may be left unread: afresh)
                raise

        with self._errors():
            values: list[bytes | None] = await conn.retry.call_with_retry(
                read, lambda _: conn.disconnect()
            )
        return values

    async def _touch_many(self, session_ids: list[str]) -> list[int]:
        """Refresh the TTL of every key of each session; their TTLs in ms (-1: not live)."""
        found: list[int] = []
        for chunk in _chunks(session_ids):
            keys = [self._live_key]
            for session_id in chunk:
                keys += self._data_keys(session_id)
            args: _Args = [repr(time.time()), _TOMBSTONE_EXTRA_MS, *chunk]
            with self._errors():
                found += [int(ttl) for ttl in await self._touch(keys=keys, args=args)]
        return found

    async def _head(self, session_id: str) -> _Head:
        """The live session's head, read with every other read of this moment."""
        raw = await self._heads.get(self._key(session_id, "head"))  # (see versions)
        if raw is None:
            raise await self._not_live(session_id)
        return _Head(raw)

    async def _not_live(self, session_id: str) -> Exception:
        with self._errors():
            seen = await self._redis.exists(self._key(session_id, "seen"))
        if seen:
            return SessionExpired(f"session {session_id!r} expired or was closed")
        return SessionNotFound(f"no session {session_id!r}")

    async def _read(self, session_id: str, part: str, *command: str) -> tuple[_Head, Any]:
        """The session's head and what ``command`` (HGETALL, HMGET fields...; none:
        nothing) returns of its ``part`` hash, atomically (one script: one round trip)."""
        keys = [self._key(session_id, "head"), self._key(session_id, part)]
        with self._errors():
            found = await self._read_script(keys=keys, args=list(command))
        if not found:
            raise await self._not_live(session_id)
        return _Head(found[0]), found[1] if len(found) > 1 else None

    async def _write(
        self,
        session_id: str,
        part: str,
        prepare: Callable[[_Head, Any], tuple[bytes, list[Any], bytes | None] | None],
        field_names: list[str],
    ) -> _Head:
        """Read the head and ``field_names`` of the ``part`` hash; apply what ``prepare``
        makes of them (the new head, field/value pairs, a message to publish or None;
        None: nothing to write) if the head has not changed meanwhile, else read again.
        Returns the head the write was made against."""
        channel = self._key(session_id, "updates")
        keys = [self._key(session_id, "head"), self._key(session_id, part)]
        while True:
            read = ("HMGET", *field_names) if field_names else ()
            head, fields = await self._read(session_id, part, *read)
            change = prepare(head, fields)
            if change is None:
                return head
            new_head, pairs, message = change
            args = [head.raw, new_head, channel if message else "", message or b"", *pairs]
            with self._errors():
                if await self._cas(keys=keys, args=args):
                    return head
            await anyio.lowlevel.checkpoint()  # another host wrote first (or it ended): again

    # --- lifecycle --------------------------------------------------------------------

    async def create(self, session_id: str, ttl: float) -> bool:
        if not ttl > 0:
            raise ValueError(f"session ttl must be > 0, got {ttl!r}")
        head, state, variables, seen = self._data_keys(session_id)
        ttl_ms = _ms(ttl)
        incarnation = secrets.randbits(31)
        args: _Args = [
            _Head.encode(0, 0, incarnation, ttl_ms), ttl_ms, ttl_ms + _TOMBSTONE_EXTRA_MS,
            repr(time.time() + min(ttl, _MAX_TTL_S)), session_id,
        ]  # fmt: skip
        with self._errors():
            done = int(
                await self._create(keys=[head, seen, state, variables, self._live_key], args=args)
            )
        if done < 0:
            raise SessionExpired(f"session {session_id!r} expired or was closed; use a new id")
        return done == 1

    async def status(self, session_id: str) -> SessionStatus:
        return (await self.statuses([session_id]))[0]

    async def statuses(self, session_ids: Iterable[str]) -> list[SessionStatus]:
        ids = list(session_ids)
        with self._errors():
            heads = await self._mget([self._key(s, "head") for s in ids])
            gone = [s for s, head in zip(ids, heads, strict=True) if head is None]
            seen = set()
            if gone:
                found = await self._mget([self._key(s, "seen") for s in gone])
                seen = {s for s, mark in zip(gone, found, strict=True) if mark is not None}
        return [
            "live" if head is not None else "expired" if s in seen else "unknown"
            for s, head in zip(ids, heads, strict=True)
        ]

    async def touch(self, session_id: str) -> float:
        ttl_ms = await self._touches.get(check_session_id(session_id))
        if ttl_ms < 0:
            raise await self._not_live(session_id)
        return ttl_ms / 1000

    async def delete(self, session_id: str) -> bool:
        keys = [*self._data_keys(session_id), self._live_key]
        args: _Args = [session_id, self._key(session_id, "updates"), _pack({"closed": True}),
                _TOMBSTONE_EXTRA_MS]  # fmt: skip
        with self._errors():
            return bool(await self._delete(keys=keys, args=args))

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
        found: list[str] = []
        offset = 0  # past candidates still live (their score is behind: another host's clock)
        now = time.time()
        while len(found) < _EXPIRED_PER_CALL:
            with self._errors():
                raw = cast(
                    "list[bytes]",
                    await self._redis.zrangebyscore(
                        self._live_key, "-inf", now, start=offset, num=_CHUNK
                    ),
                )
            candidates: list[str] = []
            for member in raw:
                session_id = member.decode(errors="replace")
                try:
                    check_session_id(session_id)
                except InvalidSessionId:  # written by something else: drop it
                    with self._errors():
                        await self._redis.zrem(self._live_key, member)
                    continue
                candidates.append(session_id)
            if candidates:
                keys = [self._live_key, *(self._key(s, "head") for s in candidates)]
                with self._errors():
                    gone = [g.decode() for g in await self._expired(keys=keys, args=candidates)]
                found += gone
                offset += len(candidates) - len(gone)
            if len(raw) < _CHUNK:
                break
        return found

    async def aclose(self) -> None:
        with anyio.CancelScope(shield=True):
            await self._heads.aclose()
            await self._touches.aclose()
            await self._redis.aclose()
            await self._watches.aclose()

    # --- state --------------------------------------------------------------------------

    async def save_state(self, session_id: str, key: str, value: Any) -> int:
        packed = _pack(value)

        def prepare(head: _Head, fields: Any) -> tuple[bytes, list[Any], None]:
            return head.changed(state_version=1), [key, packed], None

        head = await self._write(session_id, "state", prepare, [key])
        return head.state_version + 1

    async def state_version(self, session_id: str) -> int:
        return (await self._head(session_id)).state_version

    async def versions(self, session_id: str) -> tuple[int, int]:
        raw = await self._heads.get(self._head_key(session_id))
        if raw is None:
            raise await self._not_live(session_id)
        return _versions(raw)

    def versions_soon(
        self,
        session_id: str,
        then: Callable[[tuple[int, int] | None, Exception | None], None],
    ) -> bool:
        # (every session call of a Redis-store session comes here: kept short; the id
        # is a bound session's, checked when it was bound)
        def done(raw: bytes | None, error: Exception | None) -> None:
            then(None if raw is None else _versions(raw), error)

        return self._heads.soon(f"{self._prefix}s:{session_id}:head", done)

    def _head_key(self, session_id: str) -> str:
        return f"{self._prefix}s:{check_session_id(session_id)}:head"

    async def load_state(self, session_id: str) -> dict[str, Any]:
        _, raw = await self._read(session_id, "state", "HGETALL")
        return {k.decode(): _unpack(v) for k, v in _pairs(raw)}

    # --- variables ----------------------------------------------------------------------

    async def variables(self, session_id: str) -> dict[str, VariableRecord]:
        _, raw = await self._read(session_id, "vars", "HGETALL")
        return {k.decode(): _record(v) for k, v in _pairs(raw)}

    async def version(self, session_id: str) -> int:
        return (await self._head(session_id)).version

    async def define(
        self, session_id: str, spec: VariableSpec, value: Any, metadata: Mapping[str, Any]
    ) -> VariableRecord:
        defined: list[VariableRecord] = []

        def prepare(head: _Head, fields: Any) -> tuple[bytes, list[Any], bytes] | None:
            defined.clear()
            if fields[0] is not None:
                record = _record(fields[0])
                if record.spec.to_dict() != _unpack(_pack(spec.to_dict())):  # as msgpack keeps it
                    raise ValueError(
                        f"variable {spec.name!r} is already defined as {record.spec.type} "
                        f"{dict(record.spec.constraints)}; it cannot be redefined differently"
                    )
                defined.append(record)
                return None
            record = VariableRecord(
                spec=spec, value=spec.validate(value), version=1, metadata=dict(metadata)
            )
            defined.append(record)
            update = [spec.name, record.value, 1, record.metadata]
            message = _pack({"v": head.version + 1, "u": [update]})
            return head.changed(version=1), [spec.name, _pack_record(record)], message

        await self._write(session_id, "vars", prepare, [spec.name])
        return defined[0]

    async def update(
        self, session_id: str, changes: Mapping[str, tuple[Any, Mapping[str, Any] | None]]
    ) -> list[VariableUpdate]:
        names = list(changes)
        updates: list[VariableUpdate] = []

        def prepare(head: _Head, fields: Any) -> tuple[bytes, list[Any], bytes]:
            current = {n: _record(d) for n, d in zip(names, fields, strict=True) if d is not None}
            updated = check_changes(current, changes, session_id)
            updates[:] = [
                VariableUpdate(n, r.value, r.version, r.metadata) for n, r in updated.items()
            ]
            pairs: list[Any] = []
            for name, record in updated.items():
                pairs += [name, _pack_record(record)]
            message = _pack(
                {
                    "v": head.version + 1,
                    "u": [[u.name, u.value, u.version, dict(u.metadata)] for u in updates],
                }
            )
            return head.changed(version=1), pairs, message

        await self._write(session_id, "vars", prepare, names)
        return updates

    @contextlib.asynccontextmanager
    async def watch(
        self, session_id: str, names: Iterable[str]
    ) -> AsyncIterator[AsyncIterator[VariableUpdate]]:
        wanted = frozenset(names)
        pubsub = self._watches.pubsub()
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
            base = await self.version(session_id)
            yield _Watcher(self, pubsub, session_id, wanted, base)
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
                raise SessionStoreUnavailable(
                    f"watch on session {self._session_id!r} missed updates "
                    f"{self._last + 1}..{version - 1} (the redis connection was interrupted)"
                )
            self._last = version
            for name, value, var_version, metadata in payload["u"]:
                if not self._names or name in self._names:
                    self._pending.append(VariableUpdate(name, value, var_version, metadata))
        return self._pending.popleft()
