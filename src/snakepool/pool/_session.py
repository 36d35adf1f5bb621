"""Sessions on the host: the public ``Session`` and ``Variables``, and affinity.

The session store is the single source of truth (state, variables,
versions, expiry); workers only cache. Before a session's call is sent to a
worker, :meth:`SessionManager.prepare` makes that worker current: a worker
that has not seen the session yet, or holds an older variables version, gets
a ``SessionSync`` frame first, on the same pipe and so strictly before the
call. That is why a call made after ``set()`` returned sees the new value,
and why a session outlives its worker: the next worker receives the state
persisted with ``ctx.save_state`` and runs ``restore_session`` from it.

A session call costs no store access when nothing needs one
(:meth:`SessionManager.send_now`): the host knows which versions each worker
holds (``worker.sessions``), a store that can vouch for the current ones
without I/O says them (``known_versions``: the memory store), and the
sliding TTL is refreshed at most once per ``TOUCH_EVERY`` of it. Such a call
is sent, or sent ahead, to its worker like a call without a session. Calls of
one session keep their order: while one of them is on the slow route (the
store read, or a wait for its worker), the later ones queue behind it.
"""

from __future__ import annotations

import contextlib
import functools
import time
import uuid
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Iterable,
    Mapping,
    Sequence,
)
from types import TracebackType
from typing import Any, Protocol, Self

import anyio

from .. import protocol as p
from ..errors import (
    PoolClosed,
    PoolOverloaded,
    SessionStoreUnavailable,
    SessionWorkerUnavailable,
    SnakepoolError,
)
from ._calls import PendingCall
from ._config import PoolConfig
from ._dispatch import Dispatcher
from ._store import SessionStore, check_session_id
from ._variables import VariableSpec, VariableUpdate
from ._worker import WorkerHandle

__all__ = ["TOUCH_EVERY", "ItemStream", "Session", "SessionManager", "SessionPool", "Variables"]

#: A session's TTL is refreshed in its store at most once per this fraction
#: of the TTL (on a call; the reaper refreshes sessions with calls in flight),
#: so it never expires in use, and a call costs no store write.
TOUCH_EVERY = 0.1


class ItemStream(Protocol):
    """What ``Session.stream`` returns: the pool's ``CallStream``."""

    #: Awaited before the stream's call is sent (a session creates itself first).
    _before_open: Callable[[], Awaitable[Any]] | None

    def __aiter__(self) -> AsyncIterator[Any]: ...

    async def __anext__(self) -> Any: ...

    async def aclose(self) -> None: ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


class SessionPool(Protocol):
    """What a ``Session`` uses of its pool (``Pool``, which imports this module)."""

    name: str
    config: PoolConfig

    async def call(
        self,
        command: str,
        args: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
        session: str | None = None,
        idempotent: bool = False,
    ) -> Any: ...

    def stream(
        self,
        command: str,
        args: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
        session: str | None = None,
    ) -> ItemStream: ...

    async def cast(
        self, command: str, args: Mapping[str, Any] | None = None, *, session: str | None = None
    ) -> None: ...

    def _sessions_manager(self) -> SessionManager: ...


class SessionManager:
    """Which worker each session is bound to, and keeping workers current."""

    def __init__(
        self,
        store: SessionStore,
        *,
        pool: str,
        config: PoolConfig,
        dispatcher: Dispatcher,
        workers: Sequence[WorkerHandle],
    ) -> None:
        """``workers``: the pool's own list of handles (read at each use, never changed)."""
        self.name = pool
        self.config = config
        self.store = store
        self._dispatcher = dispatcher
        self._workers = workers
        self.bindings: dict[str, WorkerHandle] = {}
        self.count_estimate = 0  # live sessions, as of the last count
        # Sessions this host created -> their first worker ((slot, pid); None
        # until one is chosen). That worker runs no restore_session for it;
        # every later one does. (A session made by another host process and
        # reattached here may have landed there: every worker here restores.)
        self._first: dict[str, tuple[int, int | None] | None] = {}
        # session id -> (time.monotonic()) when its TTL is next refreshed in the store
        self._touch_due: dict[str, float] = {}
        # session id -> the route its calls queue on while one takes the slow way
        self._routes: dict[str, _Route] = {}
        # session id -> its latest call queued for its worker (later calls of
        # the session queue behind it while it waits: they keep their order)
        self._queued: dict[str, PendingCall] = {}
        #: Starts a task in the pool's background (set while the pool runs): the
        #: slow route of a call whose store read came back without the caller.
        self.spawn: Callable[..., object] | None = None

    def bound_count(self, worker: WorkerHandle) -> int:
        return len(worker.sessions)

    async def create(self, session_id: str, ttl: float) -> None:
        check_session_id(session_id)
        if await self.store.status(session_id) != "live":
            count = await self.store.count()
            if count >= self.config.max_sessions:
                raise PoolOverloaded(
                    f"pool {self.name!r} has {count} live sessions "
                    f"(max_sessions={self.config.max_sessions}); close some or raise the limit"
                )
        if await self.store.create(session_id, ttl):
            self.count_estimate += 1
            self._first[session_id] = None
            self._touch_due[session_id] = time.monotonic() + ttl * TOUCH_EVERY

    def send_now(self, call: PendingCall, frame: bytes) -> bool:
        """Send a session's call now, if that needs no store I/O and keeps the
        session's order, or hand it to a store that reads versions for many
        calls at once (Redis): the read's answer sends it (:meth:`_read`).
        False: queue it for ``call.want`` (its worker, made current, has no
        slot for it yet) when that is set, else :meth:`place` it.

        The worker is chosen by affinity (:meth:`_reserve`); one that is behind
        on the session is made current first, from what a store holds in this
        process (the memory store: ``current_now``).
        """
        session_id = call.session_id
        assert session_id is not None
        known = self.store.known_versions(session_id)
        if known is not None:
            return self._send_if_current(session_id, call, frame, known)
        if session_id in self._routes or session_id not in self.bindings or self.spawn is None:
            return False  # (an earlier call is on the slow route; or the session is new here)
        call.in_store = True  # (a timeout while it is read blames the store)
        read = functools.partial(self._read, call, frame)
        if self.store.versions_soon(session_id, read):
            return True
        call.in_store = False
        return False

    def _read(
        self,
        call: PendingCall,
        frame: bytes,
        versions: tuple[int, int] | None,
        error: Exception | None,
    ) -> None:
        """The store's answer for a call ``send_now`` handed to it: send the call
        if its worker holds these versions, else continue on the slow route
        (a task); fail it if the store failed. Nothing if its caller left."""
        session_id = call.session_id
        assert session_id is not None
        if call.abandoned or call.expired or call.finished:
            return  # (its caller left, or raises CallTimeout at its deadline)
        if error is not None:
            call.fail(error if isinstance(error, SnakepoolError) else _unavailable(error))
            return
        try:
            if versions is not None and self._send_if_current(session_id, call, frame, versions):
                call.in_store = False
                return
            if call.want is not None:  # it waits in the queue for its worker
                call.in_store = False
                call.queued = self._dispatcher.enqueue_call(
                    call, frame, call.deadline, want=call.want
                )
                return
        except SnakepoolError as exc:  # (affinity refused it: strict_fail_fast, overloaded)
            call.fail(exc)
            return
        # (not live: the slow route's read says whether it expired or never was)
        if not self.place_soon(call, frame, versions):
            call.fail(PoolClosed(f"pool {self.name!r} closed before call {call.command!r} ran"))

    def _send_if_current(
        self, session_id: str, call: PendingCall, frame: bytes, versions: tuple[int, int]
    ) -> bool:
        """Send ``call`` now if ``versions`` (the session's current ones) are what
        its worker holds, or what the store can bring it to without I/O."""
        if session_id in self._routes:
            return False  # an earlier call of the session is on the slow route
        home = self.bindings.get(session_id)
        if home is None or not home.is_ready:
            return False  # (not bound yet, or its worker died: the slow route binds it)
        behind = self._waits_in_queue(session_id)  # (then it queues behind that call)
        if not behind and self._touch_due.get(session_id, 0.0) <= time.monotonic():
            return False  # its TTL is due for a refresh (the slow route refreshes it)
        worker = None
        if not behind:
            # Hint's fallback to a free worker that is not current would first
            # need a store read, which costs more than waiting in the session's
            # own current worker: then only a current one will do.
            current = home.sessions.get(session_id) == versions
            only_current = not self.store.holds_sessions and current
            worker = self._reserve(session_id, home, versions if only_current else None)
            if worker is None and self._moves(home):
                return False  # (the slow route moves it)
        target = home if worker is None else worker
        if target.sessions.get(session_id) != versions:
            now = self.store.current_now(session_id)
            if now is None:  # (it would be read from the store first: the slow route)
                if worker is not None:
                    self._dispatcher.release(worker)
                return False
            variables, state = now
            self._sync(
                target, session_id, versions, variables, state, self._lands(target, session_id)
            )
        if worker is None:
            # No slot on its worker now (or callers queued first): it waits in
            # the pool's queue for that worker, as a plain call waits for any
            # (the hand-off sends it: no task, no store read). The caller queues it.
            call.want = home
            self._queued[session_id] = call
            return False
        worker.submit(call, frame)
        return True

    def _moves(self, home: WorkerHandle) -> bool:
        """A call with no slot on its worker ``home`` moves to another one
        instead of waiting for it: with ``hint``, when ``home`` is full (no
        caller queued first) and another worker has a free slot now."""
        dispatcher = self._dispatcher
        if self.config.affinity != "hint" or dispatcher.queued:
            return False
        free = dispatcher.pick()
        return free is not None and free is not home

    def _waits_in_queue(self, session_id: str) -> bool:
        """An earlier call of the session waits in the pool's queue for its worker."""
        call = self._queued.get(session_id)
        if call is None:
            return False
        if call.worker is None and not (call.finished or call.abandoned or call.expired):
            return True
        del self._queued[session_id]  # (sent, or gone)
        return False

    def place_soon(
        self, call: PendingCall, frame: bytes, versions: tuple[int, int] | None = None
    ) -> bool:
        """``place`` from a background task, its place on the session's route
        taken now (so calls placed one after another keep their order); a
        failure fails the call. ``versions``: as read since the call began.
        False once the pool is closing (nothing is placed)."""
        session_id = call.session_id
        assert session_id is not None
        if self.spawn is None:
            return False
        route = self._enter_route(session_id)

        async def on_route() -> None:
            try:
                await self._on_route(call, frame, route, versions)
            except SnakepoolError as exc:
                call.fail(exc)

        self.spawn(on_route)
        return True

    async def place(self, call: PendingCall, frame: bytes) -> None:
        """Send a session's call once its worker is chosen (by affinity) and
        current, reading the store as needed; after every earlier call of the
        session that took this route."""
        session_id = call.session_id
        assert session_id is not None
        await self._on_route(call, frame, self._enter_route(session_id), None)

    def _enter_route(self, session_id: str) -> _Route:
        """A place on the session's slow route, taken now (calls keep their order)."""
        route = self._routes.get(session_id)
        if route is None:
            route = self._routes[session_id] = _Route()
        route.users += 1
        return route

    async def _on_route(
        self,
        call: PendingCall,
        frame: bytes,
        route: _Route,
        versions: tuple[int, int] | None,
    ) -> None:
        """The slow route, from a place taken on it: after the session's earlier
        calls, a worker by affinity, made current (``versions``: as read since
        the call began; none: read them), then the call is sent."""
        session_id = call.session_id
        assert session_id is not None
        try:
            async with route.lock:
                while True:
                    worker = await self.acquire(session_id)
                    try:
                        call.in_store = True
                        await self.prepare(worker, session_id, versions)
                        call.in_store = False
                    except BaseException:
                        self._dispatcher.release(worker)
                        raise
                    if call.abandoned or call.expired or call.finished:
                        self._dispatcher.release(worker)  # (its caller left meanwhile)
                        return
                    if worker.is_ready:
                        worker.submit(call, frame)
                        return
                    self._dispatcher.release(worker)  # it died while the session was prepared
        finally:
            route.users -= 1
            if not route.users:
                del self._routes[session_id]

    async def acquire(self, session_id: str) -> WorkerHandle:
        """A reserved slot for the session's call, by the pool's affinity mode."""
        check_session_id(session_id)  # `pool.call(..., session=ID)`: before any binding
        dispatcher = self._dispatcher
        bound = self.bindings.get(session_id)
        if bound is not None and bound.is_ready:
            worker = self._reserve(session_id, bound)
            if worker is not None:
                return worker
            if self.config.affinity == "strict_queue":
                worker = await dispatcher.acquire(want=bound)
                self.bindings[session_id] = worker  # another one if `bound` died meanwhile
                return worker
            return await dispatcher.acquire(bound_sessions=self.bound_count)  # hint: any worker
        worker = dispatcher.try_reserve(bound_sessions=self.bound_count)
        if worker is None and self.config.affinity != "hint":
            # Strict affinity: bind before waiting, so that concurrent first
            # calls of the session all wait for the same worker.
            target = self._least_bound()
            if target is not None:
                self.bindings[session_id] = target
                worker = await dispatcher.acquire(want=target)
        if worker is None:
            worker = await dispatcher.acquire(bound_sessions=self.bound_count)
        current = self.bindings.get(session_id)
        if self.config.affinity != "hint" or current is None or not current.is_ready:
            self.bindings[session_id] = worker
        return worker

    def _reserve(
        self,
        session_id: str,
        home: WorkerHandle,
        only_at: tuple[int, int] | None = None,
    ) -> WorkerHandle | None:
        """A slot for a session's call, by the affinity mode; none: it must wait.

        A free slot on ``home``, its worker; else, with ``hint``, a free slot on
        another worker (the caller makes it current; ``only_at``: only a worker
        that holds these versions of the session); else a slot to wait in on
        ``home``, sent ahead (``Dispatcher.reserve_home``: the session waits
        for that worker anyway). ``strict_fail_fast`` never
        waits in a busy worker: ``SessionWorkerUnavailable``.
        """
        dispatcher = self._dispatcher
        worker = dispatcher.try_reserve(want=home)
        if worker is not None:
            return worker
        mode = self.config.affinity
        if mode == "hint":
            free = dispatcher.pick(self.bound_count)
            if free is not None and (only_at is None or free.sessions.get(session_id) == only_at):
                return dispatcher.try_reserve(want=free)
        elif mode == "strict_fail_fast":
            raise SessionWorkerUnavailable(
                f"session {session_id!r}: its {home.describe()} is busy "
                f"({home.load}/{home.concurrency} calls) and affinity is strict_fail_fast"
            )
        return dispatcher.reserve_home(home)

    def _least_bound(self) -> WorkerHandle | None:
        ready = [w for w in self._workers if w.is_ready]
        return min(ready, key=lambda w: (len(w.sessions), w.load), default=None)

    async def prepare(
        self, worker: WorkerHandle, session_id: str, versions: tuple[int, int] | None = None
    ) -> None:
        """Refresh the session's TTL and bring ``worker`` up to date with it
        (reading the store: the slow route's half of what ``send_now`` does).
        ``versions``: the session's, as read since the call began (none: read them)."""
        # (decided before any await: of concurrent first calls, those on the
        # worker that claims the session first are on its first worker)
        claimed = session_id in self._first and self._first[session_id] is None
        first_landing = self._lands(worker, session_id)
        synced = False
        try:
            store = self.store
            await self._touch_if_due(session_id)
            if versions is None:
                versions = store.known_versions(session_id) or await store.versions(session_id)
            if worker.sessions.get(session_id) == versions:
                synced = True
                return
            records = await store.variables(session_id)
            variables = {name: record.value for name, record in records.items()}
            state = None
            if self._restores(worker, session_id, versions, first_landing):
                state = await store.load_state(session_id)
            if worker.sessions.get(session_id) != versions:  # (or a concurrent call did it)
                self._sync(worker, session_id, versions, variables, state, first_landing)
            synced = True
        finally:
            if (
                claimed
                and first_landing
                and not synced
                and session_id in self._first  # (not closed meanwhile)
                and worker.sessions.get(session_id) is None
            ):
                self._first[session_id] = None  # (the store failed: it has not landed yet)

    def _lands(self, worker: WorkerHandle, session_id: str) -> bool:
        """Whether ``worker`` is the session's first worker (it runs no
        ``restore_session``); a session made here claims the first worker it
        lands on. (One reattached from elsewhere may have landed before: every
        worker here restores it.)"""
        if worker.sessions.get(session_id) is not None or session_id not in self._first:
            return False
        first = self._first[session_id]
        if first is None:
            first = self._first[session_id] = (worker.slot, worker.pid)
        return first == (worker.slot, worker.pid)

    @staticmethod
    def _restores(
        worker: WorkerHandle, session_id: str, versions: tuple[int, int], first_landing: bool
    ) -> bool:
        """Whether ``worker`` must rebuild the session from its saved state: it
        moved here from another worker (its worker died or was recycled, or
        affinity "hint" fell back), or another worker saved state since this
        one last saw the session."""
        known = worker.sessions.get(session_id)
        if known is None:
            return not first_landing
        return known[1] != versions[1]

    def _sync(
        self,
        worker: WorkerHandle,
        session_id: str,
        versions: tuple[int, int],
        variables: dict[str, Any],
        state: dict[str, Any] | None,
        first_landing: bool,
    ) -> None:
        """Send ``worker`` the session's variables (and, when it must rebuild the
        session, its saved ``state``: ``{}`` when nothing was saved, the adapter
        still learns the session moved), on the pipe, before the session's next call."""
        restore = state if self._restores(worker, session_id, versions, first_landing) else None
        sync = p.SessionSync(
            session_id=session_id, version=versions[0], variables=variables, restore=restore
        )
        worker.post_message(sync)
        worker.sessions[session_id] = versions

    async def _touch_if_due(self, session_id: str) -> None:
        now = time.monotonic()
        if self._touch_due.get(session_id, 0.0) > now:
            return
        ttl = await self.store.touch(session_id)  # (SessionExpired / SessionNotFound if not live)
        self._touch_due[session_id] = now + ttl * TOUCH_EVERY

    def saved_state(self, worker: WorkerHandle, session_id: str, state_version: int) -> None:
        """``worker`` itself saved state: it does not need to rebuild from it."""
        known = worker.sessions.get(session_id)
        if known is not None and known[1] == state_version - 1:
            worker.sessions[session_id] = (known[0], state_version)

    def forget(self, session_id: str) -> None:
        """The session ended: drop it from every worker that holds it."""
        self.bindings.pop(session_id, None)
        self._first.pop(session_id, None)
        self._touch_due.pop(session_id, None)
        self._queued.pop(session_id, None)
        for worker in self._workers:
            if worker.sessions.pop(session_id, None) is not None and worker.is_ready:
                worker.post_message(p.SessionDrop(session_id=session_id))

    async def reap(self) -> list[str]:
        """Find expired sessions, drop them from the workers; returns their ids.

        Sessions with calls in flight are refreshed first: one in use never expires.
        """
        in_use = {
            call.session_id
            for worker in self._workers
            for call in worker.pending.values()
            if call.session_id is not None
        }
        for session_id in in_use:
            with contextlib.suppress(Exception):  # (gone already: reported below)
                await self._touch_if_due(session_id)
        expired = await self.store.expired()
        found = set(expired)
        bound = [session_id for session_id in self.bindings if session_id not in found]
        for session_id, status in zip(bound, await self.store.statuses(bound), strict=True):
            if status != "live":
                expired.append(session_id)
        for session_id in expired:
            self.forget(session_id)
        self.count_estimate = await self.store.count()
        return expired


def _unavailable(error: Exception) -> SessionStoreUnavailable:
    """A store failure that is not one of ours (a store's own errors are mapped)."""
    unavailable = SessionStoreUnavailable(f"the session store failed: {error!r}")
    unavailable.__cause__ = error
    return unavailable


class _Route:
    """The slow route of one session's calls: one at a time, in order (a FIFO lock)."""

    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = anyio.Lock()
        self.users = 0


class Variables:
    """A session's typed variables (host side); see ``Session.variables``."""

    def __init__(self, session: Session) -> None:
        self._session = session

    async def define(
        self,
        name: str,
        type: str,
        initial: Any,
        constraints: Mapping[str, Any] | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        """Define ``name``; ``ValueError`` if ``initial`` breaks a rule."""
        store = await self._session._store()
        spec = VariableSpec(name=name, type=type, constraints=dict(constraints or {}))
        await store.define(self._session.id, spec, initial, dict(metadata or {}))

    async def get(self, name: str, default: Any = None) -> Any:
        store = await self._session._store()
        record = (await store.variables(self._session.id)).get(name)
        return default if record is None else record.value

    async def get_many(self, names: Iterable[str]) -> dict[str, Any]:
        """Values of ``names`` (undefined ones are left out)."""
        store = await self._session._store()
        records = await store.variables(self._session.id)
        return {name: records[name].value for name in names if name in records}

    async def set(self, name: str, value: Any, metadata: Mapping[str, Any] | None = None) -> None:
        """Set ``name``; ``ValueError`` naming the rule if invalid (nothing changes)."""
        store = await self._session._store()
        await store.update(self._session.id, {name: (value, metadata)})

    async def set_many(self, values: Mapping[str, Any]) -> None:
        """Set several at once: all of them, or (on any invalid value) none."""
        store = await self._session._store()
        await store.update(
            self._session.id, {name: (value, None) for name, value in values.items()}
        )

    def watch(self, *names: str) -> _Watch:
        """Every later update of ``names`` (all if none), in order, none merged.

        ``async with session.variables.watch("t") as updates: async for u in updates``
        starts watching on entry; plain ``async for`` starts on the first item.
        """
        return _Watch(self._session, names)


class _Watch:
    """An async iterator of ``VariableUpdate``, also an async context manager."""

    def __init__(self, session: Session, names: tuple[str, ...]) -> None:
        self._session = session
        self._names = names
        self._stack: contextlib.AsyncExitStack | None = None
        self._updates: AsyncIterator[VariableUpdate] | None = None

    async def __aenter__(self) -> Self:
        await self._open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def _open(self) -> None:
        if self._stack is None:
            store = await self._session._store()
            stack = contextlib.AsyncExitStack()
            self._updates = await stack.enter_async_context(
                store.watch(self._session.id, self._names)
            )
            self._stack = stack

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> VariableUpdate:
        await self._open()
        assert self._updates is not None
        try:
            return await self._updates.__anext__()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            raise StopAsyncIteration from None

    async def aclose(self) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            await stack.aclose()


class Session:
    """A session of a pool: calls with affinity, variables, persisted state.

    Usable at once (it is created in the store on first use) and an async
    context manager that closes it at exit. An id given follows
    ``SESSION_ID_RULE`` (1 to 128 of ``A-Z a-z 0-9 . _ : -``, not starting
    with ``.``); otherwise one is generated (uuid4 hex, which follows it).
    """

    def __init__(self, pool: SessionPool, session_id: str | None, ttl: float | None) -> None:
        if session_id is not None:
            check_session_id(session_id)  # InvalidSessionId (a ValueError) naming the rule
        if ttl is not None and (not isinstance(ttl, int | float) or not ttl > 0):
            raise ValueError(f"ttl must be a number > 0, got {ttl!r}")
        self._pool = pool
        self.id = session_id if session_id is not None else uuid.uuid4().hex
        self.ttl = float(ttl if ttl is not None else pool.config.session_ttl)
        self._created = False
        self._creating = anyio.Lock()  # concurrent first calls create it once
        self.variables = Variables(self)

    async def _store(self) -> SessionStore:
        """The store, after making sure the session exists in it."""
        manager = self._pool._sessions_manager()
        if not self._created:
            async with self._creating:
                if not self._created:
                    await manager.create(self.id, self.ttl)
                    self._created = True
        return manager.store

    async def open(self) -> Self:
        """Create the session in its store now (otherwise its first use does)."""
        await self._store()
        return self

    def call(
        self,
        command: str,
        args: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
        idempotent: bool = False,
    ) -> Coroutine[Any, Any, Any]:
        """``Pool.call`` in this session (``await session.call(...)``).

        Once the session exists this is the pool's own coroutine, not one
        wrapped in another: a session call costs what a plain call does.
        """
        if not self._created:
            return self._call_once_created(command, args, timeout, idempotent)
        return self._pool.call(
            command, args, timeout=timeout, session=self.id, idempotent=idempotent
        )

    async def _call_once_created(
        self, command: str, args: Mapping[str, Any] | None, timeout: float | None, idempotent: bool
    ) -> Any:
        await self._store()  # (then the pool's call checks that it is open)
        return await self._pool.call(
            command, args, timeout=timeout, session=self.id, idempotent=idempotent
        )

    def stream(
        self, command: str, args: Mapping[str, Any] | None = None, *, timeout: float | None = None
    ) -> ItemStream:
        stream = self._pool.stream(command, args, timeout=timeout, session=self.id)
        stream._before_open = self._store
        return stream

    async def cast(self, command: str, args: Mapping[str, Any] | None = None) -> None:
        if not self._created:
            await self._store()
        await self._pool.cast(command, args, session=self.id)

    async def close(self) -> None:
        """End the session (its state and variables go); closing it again is a no-op."""
        manager = self._pool._sessions_manager()
        with anyio.CancelScope(shield=True):
            if await manager.store.delete(self.id):
                manager.count_estimate = max(0, manager.count_estimate - 1)
        manager.forget(self.id)

    async def __aenter__(self) -> Self:
        await self._store()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<Session {self.id!r} of pool {self._pool.name!r}>"
