"""Session stores: the host-side single source of truth for session state.

A store keeps, per session: its expiry (a sliding TTL, refreshed by use), the
state adapters persist with ``ctx.save_state`` (what ``restore_session``
gets on another worker), and the typed variables with their versions.
Workers only cache. ``memory`` lives in the host process; ``redis`` (see
``_redis_store``) is shared by several host processes or machines.
"""

from __future__ import annotations

import abc
import collections
import contextlib
import math
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import anyio
from anyio.streams.memory import MemoryObjectSendStream

from .._session_ids import SESSION_ID_MAX_LENGTH as SESSION_ID_MAX_LENGTH
from .._session_ids import SESSION_ID_RULE as SESSION_ID_RULE
from .._session_ids import check_session_id as check_session_id
from ..errors import SessionExpired, SessionNotFound
from ._variables import VariableSpec, VariableUpdate

__all__ = [
    "SESSION_ID_MAX_LENGTH",
    "SESSION_ID_RULE",
    "MemorySessionStore",
    "SessionStatus",
    "SessionStore",
    "VariableRecord",
    "check_session_id",
]

SessionStatus = Literal["live", "expired", "unknown"]
_TOMBSTONES = 100_000  # expired/closed ids remembered, to say "expired" rather than "not found"


@dataclass(frozen=True, slots=True)
class VariableRecord:
    """A variable as stored: spec, current value, version, metadata."""

    spec: VariableSpec
    value: Any
    version: int
    metadata: Mapping[str, Any] = field(default_factory=dict)


class SessionStore(abc.ABC):
    """What a pool needs from a session store. Every method is safe to call concurrently."""

    @abc.abstractmethod
    async def create(self, session_id: str, ttl: float) -> bool:
        """Create the session if it does not exist; true if it was created."""

    @abc.abstractmethod
    async def status(self, session_id: str) -> SessionStatus:
        """``live``, ``expired`` (or closed), or ``unknown``."""

    async def statuses(self, session_ids: Iterable[str]) -> list[SessionStatus]:
        """``status`` of each (stores may read them all at once)."""
        return [await self.status(session_id) for session_id in session_ids]

    @abc.abstractmethod
    async def touch(self, session_id: str) -> float:
        """Refresh the session's TTL and return it (seconds);
        ``SessionExpired``/``SessionNotFound`` if not live."""

    @abc.abstractmethod
    async def delete(self, session_id: str) -> bool:
        """Close the session; true if it was live."""

    @abc.abstractmethod
    async def count(self) -> int:
        """Live sessions."""

    @abc.abstractmethod
    async def save_state(self, session_id: str, key: str, value: Any) -> int:
        """Keep ``value`` under ``key`` in the session's persisted state; the new state version."""

    @abc.abstractmethod
    async def state_version(self, session_id: str) -> int:
        """A counter that grows with every ``save_state`` of the session."""

    async def versions(self, session_id: str) -> tuple[int, int]:
        """``(variables version, state version)``; stores may read both at once.

        Compared for equality only: a store may fold more into them (the Redis
        store: the session's incarnation, so that a session created anew under
        the same id never matches a worker's copy of the old one)."""
        return await self.version(session_id), await self.state_version(session_id)

    def versions_soon(
        self,
        session_id: str,
        then: Callable[[tuple[int, int] | None, Exception | None], None],
    ) -> bool:
        """Read ``versions()`` in the background and call ``then(versions, None)``
        with them, ``then(None, None)`` if the session is not live, or
        ``then(None, error)``; never before this returns (``session_id``: a bound
        session's, checked when it was bound). False: this store does
        not (the caller awaits ``versions()``). The Redis store does: the reads of
        one moment go together, and ``then`` runs in their shared completion, so
        that every session call of the moment is sent before any caller wakes."""
        return False

    #: The store holds its sessions in this process: ``known_versions`` and
    #: ``current_now`` answer without I/O (a worker is made current for free).
    holds_sessions: ClassVar[bool] = False

    def known_versions(self, session_id: str) -> tuple[int, int] | None:
        """``versions()`` without I/O, when this store can vouch that they are
        current and the session is live (the memory store: it holds them);
        None: ask ``versions()``."""
        return None

    def current_now(self, session_id: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """The session's variable values and saved state without I/O, when this
        store holds them (the memory store); None: read them."""
        return None

    @abc.abstractmethod
    async def load_state(self, session_id: str) -> dict[str, Any]:
        """The session's persisted state (what ``restore_session`` receives)."""

    @abc.abstractmethod
    async def variables(self, session_id: str) -> dict[str, VariableRecord]:
        """Every variable of the session."""

    @abc.abstractmethod
    async def version(self, session_id: str) -> int:
        """A counter that grows with every variable change of the session."""

    @abc.abstractmethod
    async def define(
        self, session_id: str, spec: VariableSpec, value: Any, metadata: Mapping[str, Any]
    ) -> VariableRecord:
        """Define a variable; redefining it with the same spec keeps it as it is."""

    @abc.abstractmethod
    async def update(
        self, session_id: str, changes: Mapping[str, tuple[Any, Mapping[str, Any] | None]]
    ) -> list[VariableUpdate]:
        """Validate and apply every change, or none (``KeyError``/``ValueError``)."""

    @abc.abstractmethod
    def watch(
        self, session_id: str, names: Iterable[str]
    ) -> contextlib.AbstractAsyncContextManager[AsyncIterator[VariableUpdate]]:
        """Updates of ``names`` (all if empty) from now on, in order."""

    async def expired(self) -> list[str]:
        """Sessions that expired since the last call (for ``session.expired`` events)."""
        return []

    async def aclose(self) -> None:
        """Release connections."""
        await anyio.lowlevel.checkpoint()


def check_changes(
    current: Mapping[str, VariableRecord],
    changes: Mapping[str, tuple[Any, Mapping[str, Any] | None]],
    session_id: str,
) -> dict[str, VariableRecord]:
    """The new records for ``changes``, validated against ``current`` (nothing applied)."""
    updated: dict[str, VariableRecord] = {}
    for name, (value, metadata) in changes.items():
        record = current.get(name)
        if record is None:
            raise KeyError(
                f"variable {name!r} is not defined in session {session_id!r}; define() it first"
            )
        updated[name] = VariableRecord(
            spec=record.spec,
            value=record.spec.validate(value),
            version=record.version + 1,
            metadata=dict(metadata) if metadata is not None else dict(record.metadata),
        )
    return updated


class _MemorySession:
    __slots__ = ("expires_at", "state", "state_version", "ttl", "variables", "version", "watchers")

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self.expires_at = time.monotonic() + ttl
        self.state: dict[str, Any] = {}
        self.variables: dict[str, VariableRecord] = {}
        self.version = 0
        self.state_version = 0
        self.watchers: list[tuple[frozenset[str], MemoryObjectSendStream[VariableUpdate]]] = []


class MemorySessionStore(SessionStore):
    """Sessions in this host process (the default)."""

    holds_sessions = True

    def __init__(self) -> None:
        self._sessions: dict[str, _MemorySession] = {}
        self._tombstones: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._newly_expired: list[str] = []

    def _bury(self, session_id: str) -> None:
        session = self._sessions.pop(session_id, None)
        if session is not None:
            for _, stream in session.watchers:
                stream.close()
        self._tombstones[session_id] = None
        while len(self._tombstones) > _TOMBSTONES:
            self._tombstones.popitem(last=False)

    def _live(self, session_id: str) -> _MemorySession:
        check_session_id(session_id)
        session = self._sessions.get(session_id)
        if session is not None and time.monotonic() >= session.expires_at:
            self._bury(session_id)
            self._newly_expired.append(session_id)
            session = None
        if session is None:
            if session_id in self._tombstones:
                raise SessionExpired(f"session {session_id!r} expired or was closed")
            raise SessionNotFound(f"no session {session_id!r}")
        return session

    async def create(self, session_id: str, ttl: float) -> bool:
        check_session_id(session_id)
        await anyio.lowlevel.checkpoint()
        with contextlib.suppress(SessionNotFound, SessionExpired):
            self._live(session_id)
            return False
        if session_id in self._tombstones:
            raise SessionExpired(f"session {session_id!r} expired or was closed; use a new id")
        self._sessions[session_id] = _MemorySession(ttl)
        return True

    async def status(self, session_id: str) -> SessionStatus:
        await anyio.lowlevel.checkpoint()
        try:
            self._live(session_id)
        except SessionExpired:
            return "expired"
        except SessionNotFound:
            return "unknown"
        return "live"

    async def touch(self, session_id: str) -> float:
        session = self._live(session_id)
        session.expires_at = time.monotonic() + session.ttl
        await anyio.lowlevel.checkpoint()
        return session.ttl

    def known_versions(self, session_id: str) -> tuple[int, int] | None:
        session = self._sessions.get(session_id)
        if session is None or time.monotonic() >= session.expires_at:
            return None  # (the slow route says why)
        return session.version, session.state_version

    def current_now(self, session_id: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
        session = self._sessions.get(session_id)
        if session is None or time.monotonic() >= session.expires_at:
            return None
        variables = {name: record.value for name, record in session.variables.items()}
        return variables, dict(session.state)

    async def delete(self, session_id: str) -> bool:
        await anyio.lowlevel.checkpoint()
        try:
            self._live(session_id)  # an expired one is buried (and reported) here
        except (SessionExpired, SessionNotFound):
            return False
        self._bury(session_id)
        return True

    async def count(self) -> int:
        await anyio.lowlevel.checkpoint()
        now = time.monotonic()
        return sum(1 for s in self._sessions.values() if s.expires_at > now)

    async def save_state(self, session_id: str, key: str, value: Any) -> int:
        session = self._live(session_id)
        session.state[key] = value
        session.state_version += 1
        await anyio.lowlevel.checkpoint()
        return session.state_version

    async def state_version(self, session_id: str) -> int:
        await anyio.lowlevel.checkpoint()
        return self._live(session_id).state_version

    async def load_state(self, session_id: str) -> dict[str, Any]:
        await anyio.lowlevel.checkpoint()
        return dict(self._live(session_id).state)

    async def variables(self, session_id: str) -> dict[str, VariableRecord]:
        await anyio.lowlevel.checkpoint()
        return dict(self._live(session_id).variables)

    async def version(self, session_id: str) -> int:
        await anyio.lowlevel.checkpoint()
        return self._live(session_id).version

    async def define(
        self, session_id: str, spec: VariableSpec, value: Any, metadata: Mapping[str, Any]
    ) -> VariableRecord:
        await anyio.lowlevel.checkpoint()
        session = self._live(session_id)
        existing = session.variables.get(spec.name)
        if existing is not None:
            if existing.spec != spec:
                raise ValueError(
                    f"variable {spec.name!r} is already defined as {existing.spec.type} "
                    f"{dict(existing.spec.constraints)}; it cannot be redefined differently"
                )
            return existing
        record = VariableRecord(
            spec=spec, value=spec.validate(value), version=1, metadata=dict(metadata)
        )
        session.variables[spec.name] = record
        session.version += 1
        self._publish(session, [VariableUpdate(spec.name, record.value, 1, record.metadata)])
        return record

    async def update(
        self, session_id: str, changes: Mapping[str, tuple[Any, Mapping[str, Any] | None]]
    ) -> list[VariableUpdate]:
        await anyio.lowlevel.checkpoint()
        session = self._live(session_id)
        updated = check_changes(session.variables, changes, session_id)
        session.variables.update(updated)
        session.version += 1
        updates = [VariableUpdate(n, r.value, r.version, r.metadata) for n, r in updated.items()]
        self._publish(session, updates)
        return updates

    @staticmethod
    def _publish(session: _MemorySession, updates: list[VariableUpdate]) -> None:
        for names, stream in list(session.watchers):
            for update in updates:
                if not names or update.name in names:
                    try:
                        stream.send_nowait(update)
                    except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                        session.watchers.remove((names, stream))
                        break

    @contextlib.asynccontextmanager
    async def watch(
        self, session_id: str, names: Iterable[str]
    ) -> AsyncIterator[AsyncIterator[VariableUpdate]]:
        session = self._live(session_id)
        send, receive = anyio.create_memory_object_stream[VariableUpdate](math.inf)
        entry = (frozenset(names), send)
        session.watchers.append(entry)
        try:
            async with receive:
                yield receive
        finally:
            with contextlib.suppress(ValueError):
                session.watchers.remove(entry)
            send.close()

    async def expired(self) -> list[str]:
        await anyio.lowlevel.checkpoint()
        now = time.monotonic()
        for session_id in [sid for sid, s in self._sessions.items() if s.expires_at <= now]:
            self._bury(session_id)
            self._newly_expired.append(session_id)
        found, self._newly_expired = self._newly_expired, []
        return found
