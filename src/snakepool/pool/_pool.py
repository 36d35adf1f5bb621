"""``Pool``: long-lived worker subprocesses behind an async call API.

``Pool`` is a facade: the API, the lifecycle and the wiring of the modules
that do the work, each named for its role. Where a call travels::

    pool.call / cast / stream
      |
      v
    CallRoute (_route)      encode the Call frame once (bad args -> error, nothing
      |                     sent); ask the CircuitBreaker (_breaker); place it:
      |     SessionManager (_session)  a session's call goes to its worker (affinity),
      |                     made current first (SessionSync) when the store says so
      v
    Dispatcher (_dispatch)  synchronous pick of the least-loaded ready worker: one
      |                     with a free slot, else one that holds the call until a
      |                     slot frees (sent ahead, paced by _pacing); none -> the
      |                     bounded FIFO (full -> PoolOverloaded), sent by the
      |                     hand-off when a slot frees
      v
    WorkerHandle (_worker)  register the PendingCall (_calls), write the frame
      |                     (batched per event-loop turn)
      v   stdin pipe --> worker process (starts calls in arrival order) --> stdout pipe
                                                                       |
    PendingCall <---- Result / Failure / Item / End (decoded by the handle's Connection)
      |
      v  CallRoute.outcome: value, or the mapped exception; counted, the breaker
         fed, the recovery policy (_recovery) applied; the deadline (_deadlines)
         wakes a caller whose time ran out

Beside the route: WorkerSlots (_slots) starts each worker (from a template
process, _template, where one can run) and replaces it when it exits, with
backoff; HostTools (_tools) runs the host functions workers call back;
Lifecycle (_lifecycle, shared with Supervisor) says whether the pool is new,
running, closed (by its owner) or broken (its start failed).

Decisions (which worker, who waits, what to withdraw, what to replace) are
synchronous and happen on the event loop; only pipe I/O and waiting await. A
worker that dies fails only the calls it had started; the ones it held but
never started are sent again. The pool itself never becomes broken once
started.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Never

import anyio

from .. import protocol as p
from ..adapters import Adapter
from ..adapters._loading import check_importable
from ..errors import ErrorCategory, PoolClosed, PoolDisabled, WorkerCrashed
from ._backend import current_loop
from ._breaker import BreakerState, CircuitBreaker
from ._config import OPTIONS, PoolConfig, did_you_mean, options_docstring
from ._counters import CallCounts, ExitCounts, WorkerRecent, WorkerWindow
from ._deadlines import Deadlines
from ._dispatch import Dispatcher
from ._events import Event, Listeners, PoolStatistics, WorkerStatistics
from ._lifecycle import Lifecycle, LifecycleOwner, State
from ._parts import PoolParts
from ._recovery import Recovery, recovery_table
from ._registry import RunRegistry
from ._route import CallRoute
from ._runner import BackgroundTasks
from ._session import Session, SessionManager
from ._slots import WorkerSlots
from ._store import SessionStore
from ._stores import open_store
from ._stream import CallStream
from ._tools import HostTools
from ._worker import WorkerHandle

if TYPE_CHECKING:
    from ..observability._stream import Subscription

__all__ = ["CallStream", "Pool"]

_log = logging.getLogger("snakepool.pool")
_CALL = p.CallMode.CALL  # (a module global: read on every call)


def _refuse_unknown_options(unknown: Mapping[str, Any]) -> None:
    """``Pool(max_workers=4)``: a TypeError naming the option to use instead."""
    valid = tuple(
        name
        for name, param in inspect.signature(Pool.__init__).parameters.items()
        if name != "self" and param.kind is not inspect.Parameter.VAR_KEYWORD
    )
    key = next(iter(unknown))
    raise TypeError(
        f"Pool() got an unexpected keyword argument {key!r}{did_you_mean(key, valid)}; "
        f"its options: {', '.join(sorted(valid))}"
    )


class Pool(LifecycleOwner):
    """A pool of worker processes running one adapter.

    Use ``async with Pool(...) as pool``, or ``await pool.start()`` and
    ``await pool.aclose()`` (from any task).
    """

    # The parameters are PoolConfig's fields, in its order, with its defaults
    # (test_config_one_source checks it), spelt out for IDEs and type checkers;
    # their documentation is PoolConfig's (options_docstring, below).
    def __init__(
        self,
        adapter: str | type[Adapter],
        *,
        name: str = "default",
        size: int | None = None,
        python: str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        pythonpath: Sequence[str | os.PathLike[str]] = (),
        adapter_config: Mapping[str, Any] | None = None,
        worker_concurrency: int = 1,
        startup_timeout: float = 30.0,
        call_timeout: float | None = None,
        queue_size: int = 1000,
        max_requests: int | None = None,
        max_memory_mb: float | None = None,
        worker_ttl: float | None = None,
        health_interval: float = 5.0,
        health_timeout: float = 5.0,
        affinity: str = "hint",
        session_ttl: float = 3600.0,
        max_sessions: int = 10_000,
        breaker_threshold: int = 5,
        breaker_reset_timeout: float = 30.0,
        max_frame_bytes: int = p.DEFAULT_MAX_FRAME_BYTES,
        gpus: str | Sequence[int] | None = None,
        workers_per_gpu: int = 1,
        preload: Sequence[str] = (),
        session_store: str | SessionStore = "memory",
        backend: str = "local",
        ray: Mapping[str, Any] | None = None,
        start_method: str = "auto",
        recovery: Mapping[ErrorCategory | str, Recovery | str] | None = None,
        send_ahead: int = 64,
        drain_grace: float = 10.0,
        stop_grace: float = 3.0,
        cancel_grace: float = 2.0,
        limits: Mapping[str, float | None] | None = None,
        user: str | int | None = None,
        network: bool = True,
        writable_paths: Sequence[str | os.PathLike[str]] | None = None,
        sandbox: bool = False,
        **unknown: Never,  # (a clear TypeError: "did you mean 'size'?")
    ) -> None:
        if unknown:
            _refuse_unknown_options(unknown)
        if isinstance(adapter, type):
            if not issubclass(adapter, Adapter):
                raise TypeError(
                    f"adapter {adapter!r} is not a subclass of snakepool.adapters.Adapter"
                )
            adapter = f"{adapter.__module__}:{adapter.__qualname__}"
        if isinstance(adapter, str):
            check_importable(adapter)  # (a class in __main__: no worker can import it)
        arguments = locals()  # (the parameters by name: each is a PoolConfig option)
        options = {key: arguments[key] for key in OPTIONS}
        if not isinstance(session_store, str):  # (the config holds its kind; the pool, the store)
            options["session_store"] = type(session_store).__name__
        self.config = config = PoolConfig(**options)
        self.name = name
        self.drain_grace = float(config.drain_grace)  # (a caller may change it before aclose())
        self.recovery = recovery_table(recovery)
        self._lifecycle = Lifecycle(f"pool {name!r}", "Pool")
        self._listeners = Listeners(name)
        self._background = BackgroundTasks(name)
        self._breaker = CircuitBreaker(
            threshold=breaker_threshold,
            reset_timeout=breaker_reset_timeout,
            pool=name,
            on_change=self._on_breaker_change,
        )
        # One list of handles, filled and changed in place by the slots and
        # read by the dispatcher, the sessions and the route.
        self._workers: list[WorkerHandle] = []
        self._dispatcher = Dispatcher(name, queue_size, self._workers, self._check_open)
        self._sessions = SessionManager(
            open_store(session_store, namespace=name),
            pool=name,
            config=config,
            dispatcher=self._dispatcher,
            workers=self._workers,
        )
        parts = PoolParts(
            name=name,
            config=config,
            lifecycle=self._lifecycle,
            workers=self._workers,
            dispatcher=self._dispatcher,
            sessions=self._sessions,
            breaker=self._breaker,
            listeners=self._listeners,
            background=self._background,
        )
        self._route = CallRoute(parts, check_open=self._check_open, recovery=self.recovery)
        self._tools = HostTools(self._background, self._sessions)
        self._slots = WorkerSlots(
            parts,
            registry=RunRegistry(name),
            closed=lambda: self.closed,
            on_capacity=self._on_capacity,
            on_exit=self._on_worker_exit,
            on_host_call=self._tools.on_host_call,
            on_unstarted=self._route.send_again,
            check_memory=self._route.check_memory,
        )
        self._drained: anyio.Event | None = None
        self._exits = ExitCounts()
        self._window = WorkerWindow(self._route.counts)

    __init__.__doc__ = options_docstring()

    # (options a test or a caller may still change before start() or aclose())
    cancel_grace = property(
        lambda self: self._route.cancel_grace,
        lambda self, seconds: setattr(self._route, "cancel_grace", float(seconds)),
        doc="Seconds a cancelled call may take to stop before its worker is replaced.",
    )
    stop_grace = property(
        lambda self: self._slots.stop_grace,
        lambda self, seconds: setattr(self._slots, "stop_grace", float(seconds)),
        doc="Seconds a worker may take to exit after it was asked to, before it is killed.",
    )
    send_ahead = property(
        lambda self: self._slots.send_ahead,
        lambda self, calls: setattr(self._slots, "send_ahead", calls),
        doc="Calls a busy worker may hold beyond those it runs (for workers started later).",
    )

    @property
    def _deadlines(self) -> Deadlines:
        return self._route.deadlines

    # --- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        """Start every worker in parallel; ``WorkerStartError`` if one cannot start."""
        lifecycle, slots = self._lifecycle, self._slots
        lifecycle.begin_start()  # (PoolClosed once closed: a pool runs once)
        loop = current_loop(lambda: self._background.group)
        self._route.start(loop)
        self._dispatcher.loop = loop
        count = self.config.worker_count
        self._workers[:] = [slots.new_handle(slot, restarts=0) for slot in range(count)]
        if count == 0:  # disabled (no GPUs): it exists, says why, and refuses calls
            _log.warning("pool %s is disabled: %s", self.name, self.config.disabled_reason)
            await self._background.start()
            lifecycle.started()
            return
        try:
            await slots.start_all(self._background)
            self._background.group.start_soon(self._reap_sessions_forever)
            self._sessions.spawn = self._background.group.start_soon
            lifecycle.started()
        except BaseException:
            lifecycle.start_failed()
            try:
                with anyio.CancelScope(shield=True):
                    await slots.stop_all()
                    await slots.close_template()
                    await self._background.aclose()
            finally:
                lifecycle.closed(broken=True)
            raise

    async def aclose(self) -> None:
        """Stop accepting, drain in-flight calls, then stop every worker (shielded)."""
        with anyio.CancelScope(shield=True):
            was = await self._lifecycle.begin_close()
            if was is None:  # closed already, or by another task (it waited)
                return
            try:
                if was is State.NEW:  # never started: nothing runs but the store
                    with contextlib.suppress(Exception):
                        await self._sessions.store.aclose()
                else:
                    await self._drain_and_stop()
            finally:
                self._lifecycle.closed()

    async def _drain_and_stop(self) -> None:
        """Fail queued calls, wait for in-flight ones (up to drain_grace), stop workers."""
        self._sessions.spawn = None  # (a session call read from its store now fails)
        self._dispatcher.fail_all(
            PoolClosed(f"pool {self.name!r} closed while the call was queued")
        )
        with anyio.move_on_after(self.drain_grace):
            while any(w.pending for w in self._workers):
                self._drained = anyio.Event()
                await self._drained.wait()
        # (a call a worker gave back unstarted during the drain may wait here)
        self._dispatcher.fail_all(PoolClosed(f"pool {self.name!r} closed before the call ran"))
        await self._slots.stop_all()
        await self._slots.close_template()
        await self._background.aclose()
        with contextlib.suppress(Exception):
            await self._sessions.store.aclose()

    # --- calls (each takes the one route: see _route) -------------------------------

    async def call(
        self,
        command: str,
        args: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
        session: str | None = None,
        idempotent: bool = False,
    ) -> Any:
        """Run ``command(**args)`` on a worker and return its result.

        ``timeout`` (default ``call_timeout``) covers queueing and running.
        ``idempotent=True`` retries once on another worker if the first one
        crashed; other calls are never retried.
        """
        route = self._route
        started = time.perf_counter()
        try:
            call, frame = route.new_call(command, args, timeout, session, _CALL, started)
            route.send(call, frame)
            try:
                if not call.sent:  # (a session call whose worker must be made current first)
                    await route.place(call, frame)
                await call.waiter  # type: ignore[misc]
            except BaseException:
                route.left(call)
                raise
            return route.outcome(call, started)
        except WorkerCrashed:
            if not idempotent or self.recovery[ErrorCategory.COMMUNICATION] is not Recovery.RETRY:
                raise
            limit = self.config.call_timeout if timeout is None else timeout
            remaining = None if limit is None else limit - (time.perf_counter() - started)
            if remaining is not None and remaining <= 0:
                raise
            _log.warning(
                "pool %s: retrying idempotent call %r after a worker crash", self.name, command
            )
            return await self.call(command, args, timeout=remaining, session=session)

    def stream(
        self,
        command: str,
        args: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
        session: str | None = None,
    ) -> CallStream:
        """Iterate the items a generator command yields.

        ``timeout`` bounds the wait for each item (default ``call_timeout``).
        Leaving the loop early (``aclose()``, ``async with``, or dropping the
        iterator) cancels the generator in the worker.
        """
        return CallStream(self._route, command, args, timeout, session)

    async def cast(
        self, command: str, args: Mapping[str, Any] | None = None, *, session: str | None = None
    ) -> None:
        """Fire and forget: returns once the call is sent or queued.

        ``PoolOverloaded`` if the queue is full. Failures are logged and
        counted in ``statistics()``, never raised.
        """
        self._cast_nowait(command, args, session)
        await anyio.lowlevel.checkpoint()

    def _cast_nowait(
        self, command: str, args: Mapping[str, Any] | None, session: str | None = None
    ) -> None:
        """``cast`` for a caller that does not await (the socket server): the
        call is sent or queued when this returns (or it raised)."""
        route = self._route
        call, frame = route.new_call(
            command, args, None, session, p.CallMode.CAST, time.perf_counter()
        )
        route.send(call, frame)
        self._background.group.start_soon(route.finish_cast, call, frame)

    def session(self, session_id: str | None = None, *, ttl: float | None = None) -> Session:
        """A session: a new one, or (given an id) the existing one it reattaches to.

        Usable at once; ``async with pool.session() as s`` closes it at exit.
        """
        return Session(self, session_id, ttl)

    def register_tool(self, name: str, fn: Callable[..., Any]) -> None:
        """Let worker code call ``fn(**args)`` with ``ctx.call_host(name, args)``.

        ``fn`` may be sync (it runs in a thread) or async. Registering a name
        again replaces the tool.
        """
        self._tools.register(name, fn)

    def _sessions_manager(self) -> SessionManager:
        self._check_open()
        return self._sessions

    def add_listener(self, fn: Callable[[Event], Any], *, calls: bool = True) -> None:
        """Call ``fn(event)`` for every telemetry event of this pool.

        ``calls=False``: not the per-call events (``call.completed``,
        ``call.failed``), which calls then do not even make.
        """
        self._listeners.add(fn, calls=calls)

    def remove_listener(self, fn: Callable[[Event], Any]) -> None:
        self._listeners.remove(fn)

    def events(
        self, names: str | Sequence[str] | None = None, *, buffer: int = 1000
    ) -> Subscription:
        """``async for event in pool.events(["worker.*"])``: this pool's events.

        ``names``: event names or shell patterns (default: all). At most
        ``buffer`` events wait for the reader; beyond that the oldest are
        dropped and counted (``.dropped``): a slow reader never slows the pool.
        Ends at ``.close()`` (or when ``async with`` exits).
        """
        from ..observability._stream import Subscription

        return Subscription([self], names=names, buffer=buffer)

    def statistics(self) -> PoolStatistics:
        """A frozen snapshot of the pool and its workers."""
        recent = self._window.recent()
        return PoolStatistics(
            name=self.name,
            size=self.config.worker_count,
            queued=self._dispatcher.queued,
            sessions=self._sessions.count_estimate,
            breaker_state=self._breaker.state.value,
            workers=tuple(
                WorkerStatistics(
                    id=w.slot,
                    pid=w.pid,
                    state=str(w.state),
                    inflight=len(w.pending),
                    requests=w.requests,
                    restarts=w.restarts,
                    rss_bytes=w.rss_bytes(),
                    gpu=w.gpu,
                    **_recent_fields(recent.get(w.slot), w),
                    node_id=w.transport.node_id,
                    node_address=w.transport.node_address,
                    gpu_ids=w.transport.gpu_ids,
                )
                for w in self._workers
            ),
            completed=self._route.completed,
            failed=dict(self._route.failed),
            closed=self.closed,
            enabled=self.config.worker_count > 0,
            disabled_reason=self.config.disabled_reason,
            start_method=self._slots.start_method,
        )

    # --- wiring --------------------------------------------------------------------

    def _check_open(self) -> None:
        state = self._lifecycle.state
        if state is State.RUNNING:
            if not self._workers:
                raise PoolDisabled(f"pool {self.name!r} is disabled: {self.config.disabled_reason}")
            return
        if state is State.BROKEN:
            raise PoolClosed(f"pool {self.name!r} is broken: {self._lifecycle.reason}")
        if self._lifecycle.ended:
            raise PoolClosed(f"pool {self.name!r} is closed")
        raise RuntimeError(
            f"pool {self.name!r} is not started: use 'async with pool' or 'await pool.start()'"
        )

    def _on_capacity(self, worker: WorkerHandle) -> None:
        """A slot freed (or a worker became ready): hand it on; notice a finished drain."""
        dispatcher = self._dispatcher
        if dispatcher.has_work_for(worker):  # (usually not: nothing queued, no slot free)
            dispatcher.on_capacity(worker)
        if self._drained is not None and not any(w.pending for w in self._workers):
            self._drained.set()

    def _on_worker_exit(self, worker: WorkerHandle) -> None:
        """A worker exited (its slot starts another): its queued callers take any worker."""
        if not self.closed:
            self._exits.add(worker)
        for call in self._dispatcher.on_worker_exit(worker):
            self._route.send_again(call)  # (a session's call queued for it: another worker)
        if self._drained is not None and not any(w.pending for w in self._workers):
            self._drained.set()

    def _on_breaker_change(self, old: BreakerState, new: BreakerState, failures: int) -> None:
        names = {BreakerState.OPEN: "breaker.opened", BreakerState.CLOSED: "breaker.closed"}
        if new is BreakerState.OPEN:
            _log.warning("pool %s: circuit breaker opened after %d failures", self.name, failures)
        self._listeners.emit(
            names.get(new, "breaker.half_open"),
            None,
            previous=old.value,
            consecutive_failures=failures,
        )

    async def _reap_sessions_forever(self) -> None:
        """Drop expired sessions from the workers and announce ``session.expired``."""
        interval = min(1.0, self.config.session_ttl / 4)
        while True:
            await anyio.sleep(interval)
            try:
                expired = await self._sessions.reap()
            except Exception as exc:  # the store is down: try again next time
                _log.warning("pool %s: session reaper: %s", self.name, exc)
                continue
            for session_id in expired:
                self._listeners.emit("session.expired", None, session_id=session_id)

    def _counts(self) -> tuple[CallCounts, ExitCounts]:
        """The running counts behind metrics (read by ``snakepool.observability``)."""
        return self._route.counts, self._exits

    def __repr__(self) -> str:
        return f"<Pool {self.name!r} adapter={self.config.adapter!r} {self._lifecycle} workers={len(self._workers)}>"


def _recent_fields(recent: WorkerRecent | None, worker: WorkerHandle) -> dict[str, Any]:
    """``WorkerStatistics``' calls/s, percentiles and uptime for ``worker``'s slot."""
    running = worker.pid is not None and worker.exit_info is None
    fields: dict[str, Any] = {"uptime_seconds": worker.age if running else None}
    if recent is not None:
        fields.update(
            calls_per_s=recent.calls_per_s, p50_seconds=recent.p50, p99_seconds=recent.p99
        )
    return fields
