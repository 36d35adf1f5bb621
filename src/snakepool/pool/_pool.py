"""``Pool``: long-lived worker subprocesses behind an async call API.

Where a call travels::

    pool.call(command, args)
      |  encode the Call frame once (bad args / oversized -> error, nothing sent)
      v
    Dispatcher  -- synchronous pick of the least-loaded ready worker: one with
      |            a free slot, else (plain calls) one that may hold the call
      |            until a slot frees (sent ahead); none -> the bounded FIFO
      |            (full -> PoolOverloaded), sent by the hand-off when a slot frees
      v
    WorkerHandle.submit()  -- register PendingCall, write the frame (batched per loop turn)
      |
      v  stdin pipe --> worker process (starts calls in arrival order) --> stdout pipe
                                                                       |
    PendingCall <---- Result / Failure / Item / End (decoded in data_received)
      |
      v  value, or the mapped exception (RemoteError, WorkerCrashed, ...)

Decisions (which worker, who waits, what to withdraw, what to replace) are
synchronous and happen on the event loop; only pipe I/O and waiting await. A
worker that dies fails only the calls it had started; the ones it held but
never started are sent again. Its slot task starts a replacement with
exponential backoff (tenacity). The pool itself never becomes broken (only a
start that failed leaves it ``broken``: see ``_lifecycle``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import inspect
import itertools
import logging
import math
import os
import random
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping, Sequence
from types import TracebackType
from typing import Any, Never, Self

import anyio
import anyio.abc
import tenacity

from .. import protocol as p
from ..adapters import Adapter
from ..adapters._loading import adapter_imports, check_importable
from ..errors import (
    CallTimeout,
    CircuitOpen,
    ErrorCategory,
    PoolClosed,
    PoolDisabled,
    ProtocolError,
    ResourceExceeded,
    SnakepoolError,
    UnknownTool,
    WorkerCrashed,
    WorkerStartError,
    wire_type_name,
)
from ._backend import running_on_asyncio
from ._breaker import BreakerState, CircuitBreaker
from ._calls import PendingCall
from ._config import OPTIONS, PoolConfig, did_you_mean, options_docstring
from ._deadlines import Deadlines
from ._dispatch import Dispatcher
from ._events import Event, Listeners, PoolStatistics, WorkerStatistics
from ._isolation import prepare as prepare_isolation
from ._lifecycle import Lifecycle, LifecycleOwner, State
from ._recovery import Recovery, recovery_table
from ._registry import RunRegistry, runtime_dir
from ._runner import BackgroundTasks
from ._session import Session, SessionManager
from ._store import SessionStore, check_session_id
from ._stores import open_store
from ._template import TemplateStartError, TemplateUnavailable, WorkerTemplate
from ._worker import WorkerHandle, format_exit

__all__ = ["CallStream", "Pool"]

_log = logging.getLogger("snakepool.pool")
#: Seconds between RSS checks after calls (psutil walks the process tree).
_MEMORY_CHECK_INTERVAL = 0.05
#: A worker that crashes younger than this counts as a failed start (crash loops back off).
_EARLY_DEATH = 5.0
#: Backoff between restarts: exponential with jitter, from 0.1 s up to 30 s.
_RESTART_BACKOFF = tenacity.wait_exponential(multiplier=0.1, max=30.0) + tenacity.wait_random(
    0, 0.1
)


_NUMBER = (int, float)
_RUNNING = State.RUNNING  # (a module global: read on every call)
#: The deadline of a call without a time limit (``call_timeout=None``, the default).
_NO_DEADLINE = math.inf


class _Progress:
    """How far a session call got, for the message of its timeout."""

    __slots__ = ("in_store",)

    def __init__(self) -> None:
        self.in_store = False  # reading or refreshing the session in its store


def _expire(call: PendingCall) -> None:
    """A fast-path call's timer: wake the caller, who finds its call unfinished."""
    call.expired = True
    waiter = call.waiter
    if waiter is not None and not waiter.done():
        waiter.set_result(None)


def _no_loop_yet() -> asyncio.Future[None]:
    raise RuntimeError("the pool has no event loop yet: start it first")


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


def _restart_delay(failures: int) -> float:
    """Seconds to wait before restart number ``failures`` (tenacity's backoff)."""
    state = tenacity.RetryCallState(retry_object=None, fn=None, args=(), kwargs={})  # type: ignore[arg-type]
    state.attempt_number = failures
    return float(_RESTART_BACKOFF(state))


class Pool(LifecycleOwner):
    """A pool of worker processes running one adapter.

    Use ``async with Pool(...) as pool``, or ``await pool.start()`` and
    ``await pool.aclose()`` (from any task).
    """

    # (options, also attributes that a test or a caller may change before start())
    cancel_grace: float
    drain_grace: float
    stop_grace: float
    send_ahead: int
    #: Start attempts per worker when the pool starts.
    start_attempts: int = 3

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
        self.config = PoolConfig(**options)
        self.name = name
        # (attributes: a test or a caller may still change them before start())
        self.send_ahead = self.config.send_ahead
        self.drain_grace = float(self.config.drain_grace)
        self.stop_grace = float(self.config.stop_grace)
        self.cancel_grace = float(self.config.cancel_grace)
        timeout = self.config.call_timeout
        self._call_timeout: float | None = None if timeout is None else float(timeout)
        self.recovery = recovery_table(recovery)
        self._listeners = Listeners(name)
        self._breaker = CircuitBreaker(
            threshold=breaker_threshold,
            reset_timeout=breaker_reset_timeout,
            pool=name,
            on_change=self._on_breaker_change,
        )
        self._registry = RunRegistry(name)
        self._random = random.Random()
        # Calls are framed once, before a worker is chosen (so they need no
        # copy of args): by a connection of their own, which only sends.
        self._calls_out = p.Connection(p.Role.HOST, max_frame_bytes=max_frame_bytes)
        self._ids = itertools.count(1)
        self._workers: list[WorkerHandle] = []
        self._dispatcher = Dispatcher(name, queue_size, self._workers, self._check_open)
        self._sessions = SessionManager(
            open_store(session_store, namespace=name),
            pool=name,
            config=self.config,
            dispatcher=self._dispatcher,
            workers=self._workers,
        )
        self._tools: dict[str, Callable[..., Any]] = {}
        self._background = BackgroundTasks(name)
        self._lifecycle = Lifecycle(f"pool {name!r}", "Pool")
        self._drained: anyio.Event | None = None
        self._completed = 0
        self._failed: dict[str, int] = collections.defaultdict(int)
        self._on_asyncio = False  # set by start(): enables the asyncio fast path
        self._deadlines: Deadlines | None = None  # the fast path's timers
        self._new_future: Callable[[], asyncio.Future[None]] = _no_loop_yet
        self._template: WorkerTemplate | None = None  # forks workers (preload)
        self._start_method = "spawn"  # what start() chose, and why (statistics)

    __init__.__doc__ = options_docstring()

    # --- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        """Start every worker in parallel; ``WorkerStartError`` if one cannot start."""
        lifecycle = self._lifecycle
        lifecycle.begin_start()  # (PoolClosed once closed: a pool runs once)
        self._on_asyncio = running_on_asyncio()
        if self._on_asyncio:
            self._deadlines = Deadlines(asyncio.get_running_loop(), _expire)
            self._new_future = asyncio.get_running_loop().create_future
        count = self.config.worker_count
        # (filled in place: the dispatcher holds this very list)
        self._workers[:] = [self._new_handle(slot, restarts=0) for slot in range(count)]
        errors: list[WorkerStartError] = []
        if count == 0:  # disabled (no GPUs): it exists, says why, and refuses calls
            _log.warning("pool %s is disabled: %s", self.name, self.config.disabled_reason)
            await self._background.start()
            lifecycle.started()
            return
        try:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self._registry.reap_leftovers)
            await self._background.start()
            await anyio.to_thread.run_sync(prepare_isolation, self.config)  # or refuse
            await self._start_template()
            async with anyio.create_task_group() as starters:
                for slot in range(count):
                    starters.start_soon(self._start_first, slot, errors)
            if errors:
                raise errors[0]
            tg = self._background.group
            for slot in range(count):
                tg.start_soon(self._keep_slot_filled, slot)
            tg.start_soon(self._check_health_forever)
            tg.start_soon(self._reap_sessions_forever)
            lifecycle.started()
        except BaseException:
            lifecycle.start_failed()
            try:
                with anyio.CancelScope(shield=True):
                    await self._stop_workers()
                    await self._close_template()
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
        self._dispatcher.fail_all(
            PoolClosed(f"pool {self.name!r} closed while the call was queued")
        )
        with anyio.move_on_after(self.drain_grace):
            while any(w.pending for w in self._workers):
                self._drained = anyio.Event()
                await self._drained.wait()
        # (a call a worker gave back unstarted during the drain may wait here)
        self._dispatcher.fail_all(PoolClosed(f"pool {self.name!r} closed before the call ran"))
        await self._stop_workers()
        await self._close_template()
        await self._background.aclose()
        with contextlib.suppress(Exception):
            await self._sessions.store.aclose()

    # --- calls ---------------------------------------------------------------------

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
        started = time.perf_counter()
        try:
            if session is None and self._on_asyncio:
                # The asyncio fast path, in this frame (one coroutine per call):
                # one bare future and one deadline, no cancel scope or events.
                # Same outcomes as the general path: the caller's own
                # cancellation still arrives as CancelledError at the await. A
                # queued call is sent by the hand-off itself (enqueue_call),
                # so the caller wakes once: for the answer, or at the deadline.
                limit = self._call_timeout if timeout is None else timeout
                call = self._send_fast(command, args, timeout, limit)
                try:
                    await call.waiter  # type: ignore[misc]
                except BaseException:
                    self._left_fast(call)
                    raise
                return self._outcome_fast(call, limit, started)
            return await self._call_general_once(command, args, timeout, session, started)
        except WorkerCrashed:
            if not idempotent or self.recovery[ErrorCategory.COMMUNICATION] is not Recovery.RETRY:
                raise
            limit = self._call_timeout if timeout is None else timeout
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
        self._check_open()
        return CallStream(self, command, args, timeout, session)

    async def cast(
        self, command: str, args: Mapping[str, Any] | None = None, *, session: str | None = None
    ) -> None:
        """Fire and forget: returns once the call is sent or queued.

        ``PoolOverloaded`` if the queue is full. Failures are logged and
        counted in ``statistics()``, never raised.
        """
        self._check_open()
        call_id = next(self._ids)
        frame = self._encode(call_id, command, args, None, session, p.CallMode.CAST)
        probe = self._admit(command)
        call = PendingCall(call_id, command, p.CallMode.CAST, session)
        try:
            worker = self._dispatcher.try_reserve() if session is None else None
            if worker is not None:
                worker.submit(call, frame)
                waiter = None
            elif session is None:  # queue it now (or refuse it now), send it when a slot frees
                waiter = self._dispatcher.enqueue()
            else:
                waiter = None  # a session's cast goes through its affinity, in the background
        except BaseException:
            if probe:
                self._breaker.release_probe()
            raise
        self._background.group.start_soon(self._run_cast, call, frame, waiter, session, probe)
        await anyio.lowlevel.checkpoint()

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
        if not isinstance(name, str) or not name or name.startswith(p.RESERVED_TOOL_PREFIX):
            raise ValueError(
                "tool name must be a non-empty str not starting with "
                f"{p.RESERVED_TOOL_PREFIX!r}, got {name!r}"
            )
        if not callable(fn):
            raise TypeError(f"tool {name!r} must be callable, got {type(fn).__name__}")
        self._tools[name] = fn

    def _sessions_manager(self) -> SessionManager:
        self._check_open()
        return self._sessions

    def add_listener(self, fn: Callable[[Event], Any]) -> None:
        """Call ``fn(event)`` for every telemetry event of this pool."""
        self._listeners.add(fn)

    def remove_listener(self, fn: Callable[[Event], Any]) -> None:
        self._listeners.remove(fn)

    def statistics(self) -> PoolStatistics:
        """A frozen snapshot of the pool and its workers."""
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
                )
                for w in self._workers
            ),
            completed=self._completed,
            failed=dict(self._failed),
            closed=self.closed,
            enabled=self.config.worker_count > 0,
            disabled_reason=self.config.disabled_reason,
            start_method=self._start_method,
        )

    # --- one call ------------------------------------------------------------------

    def _call_general_once(
        self,
        command: str,
        args: Mapping[str, Any] | None,
        timeout: float | None,
        session: str | None,
        started: float,
    ) -> Coroutine[Any, Any, Any]:
        """One attempt on the general path: check and encode it, ask the breaker."""
        if self._lifecycle.state is not _RUNNING or not self._workers:
            self._check_open()
        call_id = next(self._ids)
        frame = self._encode(call_id, command, args, timeout, session, p.CallMode.CALL)
        limit = self._call_timeout if timeout is None else timeout
        call = PendingCall(call_id, command, p.CallMode.CALL, session)
        call.probe = False if self._breaker.closed else self._admit(command)
        return self._call_general(call, frame, limit, started)

    async def _call_general(
        self, call: PendingCall, frame: bytes, limit: float | None, started: float
    ) -> Any:
        """Any backend, sessions included: a cancel scope and events."""
        command, session, probe = call.command, call.session_id, call.probe
        progress = _Progress() if session is not None else None
        with anyio.move_on_after(limit) as scope:
            try:
                await self._dispatch(call, frame, session, progress)
                await call.done.wait()
            except BaseException:
                if call.worker is not None and not call.done.is_set():
                    self._abandon(call.worker, call)
                if probe:
                    self._breaker.release_probe()
                raise
        worker = call.worker
        if not call.done.is_set():
            assert scope.cancelled_caught
            in_store = progress is not None and progress.in_store
            error = self._timeout_error(command, limit, worker, session=session, in_store=in_store)
            if worker is not None:
                self._abandon(worker, call)
            self._record(command, worker, started, error, probe=probe)
            raise error
        self._record(command, worker, started, call.error, probe=probe)
        if call.error is not None:
            raise call.error
        return call.value

    def _outcome_fast(self, call: PendingCall, limit: float | None, started: float) -> Any:
        """The value of a fast-path call its caller woke for, or the error to raise."""
        self._deadlines.remove(call, call.deadline)  # type: ignore[union-attr]
        if call.finished:
            quiet = not self._listeners.active and self.config.max_memory_mb is None
            if call.error is None and self._breaker.steady and not call.probe and quiet:
                self._completed += 1  # (= _record when it has nothing else to do)
                return call.value
            self._record(call.command, call.worker, started, call.error, probe=call.probe)
            if call.error is not None:
                raise call.error
            return call.value
        raise self._unfinished_fast(call, limit, started)

    def _send_fast(
        self,
        command: str,
        args: Mapping[str, Any] | None,
        timeout: float | None,
        limit: float | None,
    ) -> PendingCall:
        """Check and encode the call, ask the breaker, then send it to a worker
        (or one that may hold it until a slot frees), else queue it."""
        if self._lifecycle.state is not _RUNNING or not self._workers:
            self._check_open()
        call_id = next(self._ids)
        frame = self._encode(call_id, command, args, timeout, None, p.CallMode.CALL)
        call = PendingCall(call_id, command, p.CallMode.CALL)
        if not self._breaker.closed:
            call.probe = self._admit(command)
        call.frame = frame  # (sent again if a worker gives it back unstarted)
        deadlines = self._deadlines
        assert deadlines is not None
        try:
            sent = self._dispatcher.send_ahead(call, frame)
            # Set up after the write, off the round trip's path: no answer is
            # read before this task yields. One deadline for queueing and
            # running: it marks the call expired (a hand-off in the deadline's
            # own loop turn then does not send it late).
            call.waiter = self._new_future()
            # (no limit: no deadline, never expires; remove() finds no bucket)
            call.deadline = _NO_DEADLINE if limit is None else deadlines.add(call, limit)
            if not sent:
                call.queued = self._dispatcher.enqueue_call(call, frame, call.deadline)
        except BaseException:  # (full: PoolOverloaded)
            deadlines.remove(call, call.deadline)
            if call.probe:
                self._breaker.release_probe()
            raise
        return call

    def _left_fast(self, call: PendingCall) -> None:
        """The caller of a fast-path call left (cancelled) before its answer."""
        self._deadlines.remove(call, call.deadline)  # type: ignore[union-attr]
        if call.worker is None and call.queued is not None:
            self._dispatcher.leave(call.queued)
        if call.worker is not None and not call.finished:
            self._abandon(call.worker, call)
        if call.probe:
            self._breaker.release_probe()

    def _unfinished_fast(
        self, call: PendingCall, limit: float | None, started: float
    ) -> SnakepoolError:
        """A fast-path call woke unanswered: the pool closed while it was
        queued, or its deadline passed (then it is cancelled or dropped)."""
        worker, queued = call.worker, call.queued
        if worker is None and queued is not None and queued.error is not None:
            if call.probe:  # the pool closed while the call was queued
                self._breaker.release_probe()
            closed: SnakepoolError = queued.error
            return closed
        waited = worker is not None and worker.waits_here(call)
        error = self._timeout_error(call.command, limit, worker, never_started=waited)
        if worker is None:
            if queued is not None:
                self._dispatcher.leave(queued)
        else:
            self._abandon(worker, call)
        self._record(call.command, worker, started, error, probe=call.probe)
        return error

    def _timeout_error(
        self,
        command: str,
        limit: float | None,
        worker: WorkerHandle | None,
        *,
        never_started: bool = False,
        session: str | None = None,
        in_store: bool = False,
    ) -> CallTimeout:
        limit = math.inf if limit is None else limit  # (a limit-less call never times out)
        if worker is None and in_store:
            return CallTimeout(
                f"call {command!r} of session {session!r} timed out after {limit:g}s while "
                f"reading the session from its store ({self._store_description()}), before it "
                f"was sent to any worker: is the session store reachable and answering?"
            )
        if worker is not None and never_started:
            # ("had not started" as far as the host knows: an answer on its way
            # could have freed the slot a moment ago)
            return CallTimeout(
                f"call {command!r} was still waiting on {worker.describe()} behind longer "
                f"calls when its {limit:g}s ran out (it had not started); it was cancelled"
            )
        if worker is None:
            return CallTimeout(
                f"call {command!r} waited {limit:g}s for a free worker in pool {self.name!r} "
                f"({self._dispatcher.queued} queued); it was never sent"
            )
        return CallTimeout(
            f"call {command!r} did not finish within {limit:g}s on {worker.describe()}; "
            f"it was cancelled (the worker is replaced if it does not stop within "
            f"{self.cancel_grace:g}s)"
        )

    def _store_description(self) -> str:
        """The pool's session store, for messages (a URL without its password)."""
        store = self.config.session_store
        if "://" not in store:
            return f"session store {store!r}"
        try:
            parts = urllib.parse.urlsplit(store)
            netloc = parts.netloc.rsplit("@", 1)[-1]  # (no user or password)
            shown = urllib.parse.urlunsplit(parts._replace(netloc=netloc, query=""))
        except ValueError:
            shown = f"{store.split(':', 1)[0]}://..."
        return f"session store {shown}"

    def _encode(
        self,
        call_id: int,
        command: str,
        args: Mapping[str, Any] | None,
        timeout: float | None,
        session: str | None,
        mode: str,
    ) -> bytes:
        """The Call frame, or a clear error before anything is queued or sent."""
        if type(args) is dict and type(command) is str and command and session is None:
            # The usual call, checked in short (same rules as below).
            for key in args:
                if type(key) is not str:
                    break
            else:
                if timeout is None:
                    limit: float | None = None if mode == p.CallMode.STREAM else self._call_timeout
                    return self._frame(call_id, command, args, mode, limit, None)
        if not isinstance(command, str) or not command:
            raise TypeError(f"command must be a non-empty str, got {command!r}")
        if args is None:
            args = {}
        elif type(args) is not dict:
            if not isinstance(args, Mapping):
                raise TypeError(
                    f"args of {command!r} must be a dict of keyword arguments, "
                    f"got {type(args).__name__}"
                )
            args = dict(args)
        for key in args:
            if not isinstance(key, str):
                raise TypeError(
                    f"args of {command!r} must have str keys (they are keyword arguments)"
                )
        if timeout is not None and (
            not isinstance(timeout, _NUMBER) or isinstance(timeout, bool) or not timeout > 0
        ):
            raise ValueError(f"timeout must be a number > 0 or None, got {timeout!r}")
        if session is not None:
            check_session_id(session)  # (a cast's caller must see it too)
        # Encoded at once, so args need no copy. A stream's timeout bounds
        # each item, not the whole stream: no deadline.
        if mode == p.CallMode.STREAM:
            limit = None
        elif timeout is not None:
            limit = float(timeout)
        else:
            limit = self._call_timeout  # (None: no limit)
        return self._frame(call_id, command, args, mode, limit, session)

    def _frame(
        self,
        call_id: int,
        command: str,
        args: dict[str, Any],
        mode: str,
        limit: float | None,
        session: str | None,
    ) -> bytes:
        try:
            return self._calls_out.send(p.Call(call_id, command, args, mode, limit, session))
        except TypeError as exc:
            raise TypeError(f"args of {command!r} are {exc}") from None
        except ProtocolError as exc:
            raise ProtocolError(
                f"args of {command!r} are too large: {exc}; nothing was sent"
            ) from None

    def _admit(self, command: str) -> bool:
        """Ask the breaker; a refusal is counted and raised as ``CircuitOpen``."""
        try:
            return self._breaker.admit()
        except CircuitOpen as exc:
            self._failed[exc.category.value] += 1
            self._listeners.emit("call.failed", None, command=command, category=exc.category.value,
                                 error="CircuitOpen", message=str(exc))  # fmt: skip
            raise

    def _record(
        self,
        command: str,
        worker: WorkerHandle | None,
        started: float,
        error: SnakepoolError | None,
        *,
        probe: bool = False,
    ) -> None:
        """Count the outcome, feed the breaker, apply the recovery policy."""
        slot = worker.slot if worker is not None else None
        if error is None:
            self._breaker.success(probe=probe)
        else:
            self._breaker.failure(error.category, probe=probe)
        if worker is not None and (error is not None or self.config.max_memory_mb is not None):
            self._after_call(worker, error)
        if error is None:
            self._completed += 1
            if self._listeners.active:
                duration = time.perf_counter() - started
                self._listeners.emit("call.completed", slot, command=command, duration=duration)
        else:
            self._failed[error.category.value] += 1
            if self._listeners.active:
                self._listeners.emit(
                    "call.failed", slot, command=command, category=error.category.value,
                    error=type(error).__name__, message=str(error).split("\n", 1)[0],
                )  # fmt: skip

    def _after_call(self, worker: WorkerHandle, error: SnakepoolError | None) -> None:
        """Recovery for the worker a call ran on (application errors, memory)."""
        if error is not None and error.category is ErrorCategory.APPLICATION:
            self._recover(worker, ErrorCategory.APPLICATION, f"{type(error).__name__} in a call")
        limit = self.config.max_memory_mb
        if (
            limit is not None
            and worker.is_ready
            and worker.memory_check_due(_MEMORY_CHECK_INTERVAL)
        ):
            self._check_memory(worker, limit)

    def _check_memory(self, worker: WorkerHandle, limit_mb: float) -> None:
        rss = worker.rss_bytes()
        if rss is not None and rss > limit_mb * 2**20:
            reason = f"RSS {rss / 2**20:.0f} MiB is over max_memory_mb={limit_mb:g}"
            self._recover(worker, ErrorCategory.RESOURCE, reason)

    def _recover(self, worker: WorkerHandle, category: ErrorCategory, reason: str) -> None:
        """Apply the recovery policy for ``category`` to ``worker``."""
        action = self.recovery[category]
        if action is Recovery.NONE or not worker.is_ready:
            return
        if action is Recovery.RECYCLE:
            worker.retire(reason)
        else:
            error = ResourceExceeded if category is ErrorCategory.RESOURCE else WorkerCrashed
            worker.kill(reason, error=error)

    def _abandon(self, worker: WorkerHandle, call: PendingCall) -> None:
        """The caller left: cancel in the worker; the timeout policy decides the rest."""
        if call.id not in worker.pending:
            return
        worker.cancel(call)
        if self._background.running and self.recovery[ErrorCategory.TIMEOUT] is not Recovery.NONE:
            self._background.group.start_soon(self._watch_abandoned, worker, call)

    async def _watch_abandoned(self, worker: WorkerHandle, call: PendingCall) -> None:
        with anyio.move_on_after(self.cancel_grace):
            await call.done.wait()
            return
        if call.id in worker.pending:
            _log.warning(
                "pool %s: %s ignored the cancellation of %r for %gs",
                self.name, worker.describe(), call.command, self.cancel_grace,
            )  # fmt: skip
            reason = f"call {call.command!r} did not stop within {self.cancel_grace:g}s of its cancellation"
            self._recover(worker, ErrorCategory.TIMEOUT, reason)

    async def _run_cast(
        self,
        call: PendingCall,
        frame: bytes,
        waiter: Any,
        session: str | None,
        probe: bool,
    ) -> None:
        started = time.perf_counter()
        limit = self._call_timeout  # a cast is bounded like a call: queue + run (None: no limit)
        progress = _Progress() if session is not None else None
        with anyio.move_on_after(limit):
            try:
                if waiter is not None:
                    worker = await self._dispatcher.wait(waiter)
                    worker.submit(call, frame)
                elif call.worker is None:
                    await self._dispatch(call, frame, session, progress)
            except SnakepoolError as exc:
                call.fail(exc)
            except BaseException:
                if probe:
                    self._breaker.release_probe()
                raise
            await call.done.wait()
        error = call.error
        if not call.done.is_set():
            if call.worker is not None:
                self._abandon(call.worker, call)  # (its watchdog waits on call.done)
            in_store = progress is not None and progress.in_store
            error = self._timeout_error(
                call.command, limit, call.worker, session=session, in_store=in_store
            )
        self._record(call.command, call.worker, started, error, probe=probe)

    # --- choosing a worker (synchronous decisions) ---------------------------------

    def _check_open(self) -> None:
        state = self._lifecycle.state
        if state is _RUNNING:
            if not self._workers:
                raise PoolDisabled(f"pool {self.name!r} is disabled: {self.config.disabled_reason}")
            return
        if state is State.BROKEN:
            raise PoolClosed(f"pool {self.name!r} is closed: its start failed")
        if self._lifecycle.ended:
            raise PoolClosed(f"pool {self.name!r} is closed")
        raise RuntimeError(
            f"pool {self.name!r} is not started: use 'async with pool' or 'await pool.start()'"
        )

    def _send_again(self, call: PendingCall) -> None:
        """``call`` left its worker without starting (withdrawn, or the worker
        died): send it to a free worker, or queue it first in line."""
        call.worker = None
        call.withdrawing = False
        if call.finished or call.abandoned or call.expired:
            return  # its caller has left, or leaves at its deadline
        if asyncio.get_running_loop().time() >= call.deadline:
            return  # (its timer runs later in this loop turn: never sent again)
        worker = self._dispatcher.try_reserve_first() if call.frame else None
        if worker is not None:
            worker.submit(call, call.frame)
        elif self._lifecycle.state is _RUNNING and call.frame:
            call.queued = self._dispatcher.enqueue_call(call, call.frame, call.deadline, first=True)
        else:  # closing: nothing would send it any more
            call.fail(PoolClosed(f"pool {self.name!r} closed before call {call.command!r} ran"))

    def _on_capacity(self, worker: WorkerHandle) -> None:
        """A slot freed (or a worker became ready): hand it on; notice a finished drain."""
        dispatcher = self._dispatcher
        if dispatcher.has_work_for(worker):  # (usually not: nothing queued, no slot free)
            dispatcher.on_capacity(worker)
        if self._drained is not None and not any(w.pending for w in self._workers):
            self._drained.set()

    async def _dispatch(
        self,
        call: PendingCall,
        frame: bytes,
        session_id: str | None,
        progress: _Progress | None = None,
    ) -> WorkerHandle:
        """Choose a worker (affinity for sessions), make it current, send the call.

        ``progress.in_store`` is true while the session store is read (so that
        a timeout there blames the store, not the wait for a worker).
        """
        while True:
            if session_id is None:
                worker = await self._dispatcher.acquire()
            else:
                worker = await self._sessions.acquire(session_id)
                if progress is not None:
                    progress.in_store = True
                try:
                    await self._sessions.prepare(worker, session_id)
                except BaseException:
                    self._dispatcher.release(worker)
                    raise
                if progress is not None:
                    progress.in_store = False
            if worker.is_ready:
                worker.submit(call, frame)
                return worker
            self._dispatcher.release(worker)  # it died while the session was prepared

    # --- worker slots ----------------------------------------------------------------

    def _new_handle(self, slot: int, restarts: int) -> WorkerHandle:
        return WorkerHandle(
            pool=self.name,
            slot=slot,
            restarts=restarts,
            concurrency=self.config.worker_concurrency,
            gpu=self.config.gpu_slots[slot],
            on_capacity=self._on_capacity,
            on_host_call=self._on_host_call,
            on_exit=self._on_worker_exit,
            on_unstarted=self._send_again,
            template=self._template,
            ahead=max(self.config.worker_concurrency, self.send_ahead) if self.send_ahead else 0,
        )

    # --- preloaded warm starts -------------------------------------------------------

    async def _start_template(self) -> None:
        """Start the template that starts this pool's workers (``start_method``).

        "auto" forks warm workers where it can: Linux, asyncio, no GPU pinning
        unless ``preload`` asks for it, and a template whose imports started
        no threads; otherwise it spawns and says why (``statistics().start_method``,
        and a warning when ``preload`` was asked for). "forkserver" insists:
        ``start()`` fails when forking is not possible. A ``preload`` module
        that fails to import always fails ``start()``. Spawned workers are
        started by a template too, one that imports nothing and execs them:
        it keeps what they start from outliving them (the worker side's
        ``_descendants``).
        """
        config = self.config
        preload = list(config.preload)
        wanted = config.start_method
        if wanted == "spawn":
            self._start_method = "spawn (start_method='spawn')"
        elif wanted == "auto" and not preload and any(g is not None for g in config.gpu_slots):
            self._start_method = "spawn (GPU workers: pass preload=[...] to fork them)"
        else:
            await self._start_warm_template(preload)
        if self._template is None:
            await self._start_keeper()

    async def _start_warm_template(self, preload: list[str]) -> None:
        config = self.config
        launch = config.launch(0)
        env = dict(launch.env)
        if any(name.split(".")[0] in ("dspy", "litellm") for name in preload):
            # Read when dspy/litellm are imported, which now happens in the template.
            env.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
            env.setdefault("DSPY_CACHEDIR", str(runtime_dir() / "dspy-cache" / self.name))
        # (and what loading the adapter imports, so that no worker imports it again)
        modules = list(dict.fromkeys([*preload, *adapter_imports(config.adapter)]))
        try:
            template = await WorkerTemplate.start(
                python=config.interpreter,
                env=env,
                cwd=launch.cwd,
                preload=modules,
                sys_path=launch.init.sys_path,
                timeout=config.startup_timeout,
            )
        except (TemplateUnavailable, TemplateStartError) as exc:
            self._template_failed(exc, asked=bool(preload))
            return
        self._adopt_template(template)
        self._start_method = (
            f"forkserver (template pid {template.pid} imported {', '.join(modules)} "
            f"in {template.import_seconds:.2f}s)"
        )

    async def _start_keeper(self) -> None:
        """A template that execs fresh workers (where it cannot run, the host spawns them)."""
        launch = self.config.launch(0)
        try:
            keeper = await WorkerTemplate.start(
                python=self.config.interpreter,
                env=launch.env,
                cwd=launch.cwd,
                preload=(),
                sys_path=(),
                timeout=self.config.startup_timeout,
            )
        except (TemplateUnavailable, TemplateStartError) as exc:
            _log.info("pool %s: workers are spawned by the host itself: %s", self.name, exc)
            return
        keeper.warm = False
        self._adopt_template(keeper)

    def _adopt_template(self, template: WorkerTemplate) -> None:
        self._template = template
        self._registry.add(template.pid)

    def _template_failed(self, exc: Exception, *, asked: bool) -> None:
        """Spawn instead, or fail start() when the user asked for what failed."""
        if isinstance(exc, TemplateStartError) and asked:
            raise WorkerStartError(f"pool {self.name!r}: preload failed: {exc}") from None
        if self.config.start_method == "forkserver":
            raise WorkerStartError(
                f"pool {self.name!r}: start_method='forkserver' is not possible here: {exc}"
            ) from None
        # (auto without preload: the adapter import failed in the template; the
        # workers, spawned, report that failure the usual way.)
        self._start_method = f"spawn (cannot fork workers from a template here: {exc})"
        log = _log.warning if asked else _log.info
        log("pool %s: %s", self.name, self._start_method)

    async def _close_template(self) -> None:
        template, self._template = self._template, None
        if template is not None:
            await template.aclose()

    async def _spawn(self, slot: int, restarts: int) -> WorkerHandle:
        """Start a worker in ``slot`` and wait for its handshake."""
        try:
            launch = self.config.launch(slot)
        except Exception as exc:  # e.g. the host's cwd was deleted
            raise WorkerStartError(f"cannot prepare worker {self.name}/{slot}: {exc!r}") from exc
        worker = self._new_handle(slot, restarts)
        self._workers[slot] = worker
        await self._background.group.start(worker.run, launch)
        if worker.pid is not None:
            self._registry.add(worker.pid)
        await worker.wait_ready(self.config.startup_timeout)
        self._set_recycling_limits(worker)
        self._listeners.emit("worker.started", slot, pid=worker.pid, restarts=restarts)
        self._on_capacity(worker)
        return worker

    def _set_recycling_limits(self, worker: WorkerHandle) -> None:
        # Jitter, so that workers started together do not all recycle together.
        max_requests, ttl = self.config.max_requests, self.config.worker_ttl
        if max_requests is not None:
            worker.request_limit = max_requests - self._random.randint(0, max_requests // 10)
        if ttl is not None:
            worker.ttl_limit = ttl * (1.0 - self._random.uniform(0.0, 0.1))

    async def _check_health_forever(self) -> None:
        """Every ``health_interval``: ping each ready worker, check its TTL and memory."""
        while True:
            await anyio.sleep(self.config.health_interval)
            async with anyio.create_task_group() as tg:
                for worker in self._workers:
                    if worker.is_ready:
                        tg.start_soon(self._check_worker, worker)

    async def _check_worker(self, worker: WorkerHandle) -> None:
        timeout = self.config.health_timeout
        if not await worker.ping(timeout):
            if worker.is_ready:
                _log.warning("pool %s: %s missed its health check", self.name, worker.describe())
                worker.kill(f"missed its health check (no pong within {timeout:g}s)")
            return
        if worker.ttl_limit is not None and worker.age >= worker.ttl_limit:
            worker.retire(f"reached worker_ttl ({worker.age:.1f}s old)")
        elif self.config.max_memory_mb is not None:
            self._check_memory(worker, self.config.max_memory_mb)

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

    # --- host tools (the two-way bridge) ------------------------------------------

    def _on_host_call(self, worker: WorkerHandle, message: p.HostCall) -> None:
        if self._background.running:
            self._background.group.start_soon(self._run_tool, worker, message)

    async def _run_tool(self, worker: WorkerHandle, message: p.HostCall) -> None:
        failure: BaseException
        try:
            value = await self._call_tool(worker, message)
        except anyio.get_cancelled_exc_class():
            raise
        except BaseException as exc:  # SystemExit from a tool too: the pool goes on
            failure = exc
        else:
            try:
                worker.post_message(p.HostReply(id=message.id, value=value))
                return
            except TypeError as exc:  # (the encoder's: the result cannot be packed)
                failure = TypeError(f"result of host tool {message.tool!r} is {exc}")
            except ProtocolError as exc:  # (too large)
                failure = exc
        worker.post_message(
            p.HostFailure(id=message.id, type=wire_type_name(type(failure)), message=str(failure))
        )

    async def _call_tool(self, worker: WorkerHandle, message: p.HostCall) -> Any:
        if message.tool == p.SAVE_STATE_TOOL:
            call = worker.pending.get(message.call_id)
            if call is None or call.session_id is None:
                raise LookupError("save_state() outside a session call")
            state_version = await self._sessions.store.save_state(
                call.session_id, message.args["key"], message.args["value"]
            )
            self._sessions.saved_state(worker, call.session_id, state_version)
            return None
        fn = self._tools.get(message.tool)
        if fn is None:
            known = ", ".join(sorted(self._tools)) or "none"
            raise UnknownTool(
                f"no host tool named {message.tool!r} is registered (registered: {known})"
            )
        if inspect.iscoroutinefunction(fn):
            return await fn(**message.args)
        result = await anyio.to_thread.run_sync(functools.partial(fn, **message.args))
        if inspect.isawaitable(result):
            return await result
        return result

    async def _start_first(self, slot: int, errors: list[WorkerStartError]) -> None:
        retrying = tenacity.AsyncRetrying(
            stop=tenacity.stop_after_attempt(self.start_attempts),
            wait=tenacity.wait_exponential(multiplier=0.05, max=1.0)
            + tenacity.wait_random(0, 0.05),
            retry=tenacity.retry_if_exception_type(WorkerStartError),
            sleep=anyio.sleep,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    if errors:  # another slot already failed for good: stop trying
                        raise errors[0]
                    await self._spawn(slot, restarts=attempt.retry_state.attempt_number - 1)
        except WorkerStartError as exc:
            if exc not in errors:
                errors.append(exc)

    async def _keep_slot_filled(self, slot: int) -> None:
        """Replace the slot's worker whenever it exits, with backoff on failures.

        A worker that crashes soon after starting counts as a failed start, so
        a crash loop backs off exponentially like failing starts do.
        """
        early_deaths = 0
        while True:
            worker = self._workers[slot]
            await worker.exited.wait()
            if self.closed:
                return
            info = worker.exit_info
            # A crash loop is a worker dying soon after starting without having
            # served anything; one killed after serving calls is replaced at once.
            died_early = (
                info is not None
                and not info.planned
                and info.lifetime < _EARLY_DEATH
                and worker.requests == 0
            )
            early_deaths = early_deaths + 1 if died_early else 0
            if early_deaths:  # (the breaker counted this death through the calls it failed)
                await anyio.sleep(_restart_delay(early_deaths))
            try:
                await self._replace(slot, worker.restarts)
            except WorkerStartError:
                return  # only when the pool closed meanwhile

    async def _replace(self, slot: int, restarts: int) -> None:
        """Start a new worker in ``slot``, retrying failed starts with backoff."""
        retrying = tenacity.AsyncRetrying(
            wait=_RESTART_BACKOFF,
            retry=tenacity.retry_if_exception_type(WorkerStartError),
            sleep=anyio.sleep,
            before_sleep=functools.partial(self._replacement_failed, slot),
        )
        async for attempt in retrying:
            with attempt:
                if self.closed:
                    return
                await self._spawn(slot, restarts=restarts + attempt.retry_state.attempt_number)

    def _replacement_failed(self, slot: int, state: tenacity.RetryCallState) -> None:
        if self.closed:
            return
        error = state.outcome.exception() if state.outcome else None
        _log.warning(
            "pool %s: replacing worker %d failed (attempt %d): %s",
            self.name, slot, state.attempt_number, error,
        )  # fmt: skip
        self._breaker.failure(ErrorCategory.INITIALIZATION)  # a failed (re)start counts once

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

    def _on_worker_exit(self, worker: WorkerHandle) -> None:
        info = worker.exit_info
        if worker.pid is not None:
            self._registry.remove(worker.pid)
        if info is not None and not info.planned and not self.closed:
            # (one that never said hello is reported by its start's error instead)
            log = _log.warning if worker.hello is not None else _log.debug
            log("pool %s: %s exited: %s", self.name, worker.describe(), info.reason)
        if worker.retiring is not None:
            self._listeners.emit(
                "worker.recycled", worker.slot, pid=worker.pid, reason=worker.retiring
            )
        self._listeners.emit("worker.exited", worker.slot, pid=worker.pid, **format_exit(info))
        self._dispatcher.on_worker_exit(worker)
        if self._drained is not None and not any(w.pending for w in self._workers):
            self._drained.set()

    async def _stop_workers(self) -> None:
        async with anyio.create_task_group() as tg:
            for worker in self._workers:
                tg.start_soon(worker.stop, self.stop_grace)

    def __repr__(self) -> str:
        return f"<Pool {self.name!r} adapter={self.config.adapter!r} {self._lifecycle} workers={len(self._workers)}>"


class CallStream:
    """The async iterator ``Pool.stream()`` returns; also an async context manager."""

    def __init__(
        self,
        pool: Pool,
        command: str,
        args: Mapping[str, Any] | None,
        timeout: float | None,
        session: str | None,
    ) -> None:
        self._pool = pool
        self.command = command
        self._call_id = next(pool._ids)
        self._call: PendingCall | None = None  # (first: __del__ reads it if _encode raises)
        # Encode now so bad arguments fail at pool.stream(), before iteration.
        self._frame = pool._encode(
            self._call_id, command, args, timeout, session, p.CallMode.STREAM
        )
        self._timeout = pool.config.call_timeout if timeout is None else timeout
        self._worker: WorkerHandle | None = None
        self._session = session
        self._before_open: Callable[[], Awaitable[Any]] | None = None  # a Session creates itself
        self._finished = False
        self._consumed = 0  # items taken since the last Credit sent to the worker
        self._probe = False
        self._started = time.perf_counter()

    def __aiter__(self) -> AsyncIterator[Any]:
        return self

    async def __anext__(self) -> Any:
        if self._finished:
            raise StopAsyncIteration
        if self._call is None:
            await self._open()
        call = self._call
        assert call is not None and call.items is not None
        with anyio.move_on_after(self._timeout):
            try:
                item = await call.items.receive()
            except anyio.EndOfStream:
                self._finished = True
                self._pool._record(
                    self.command, self._worker, self._started, call.error, probe=self._probe
                )
                self._probe = False
                if call.error is not None:
                    raise call.error from None
                raise StopAsyncIteration from None
            self._consumed += 1
            if self._consumed >= p.STREAM_WINDOW // 2 and self._worker is not None:
                self._worker.grant(call, self._consumed)  # the worker may run ahead again
                self._consumed = 0
            return item
        await self.aclose()
        error = CallTimeout(
            f"stream {self.command!r} produced no item within {self._timeout:g}s; cancelled"
        )
        self._pool._record(self.command, self._worker, self._started, error, probe=self._probe)
        self._probe = False
        raise error

    async def _open(self) -> None:
        pool = self._pool
        pool._check_open()
        self._probe = pool._admit(self.command)
        call = PendingCall(self._call_id, self.command, p.CallMode.STREAM, self._session)
        progress = _Progress()
        with anyio.move_on_after(self._timeout):
            try:
                if self._before_open is not None:
                    progress.in_store = True  # (the session is created in its store first)
                    await self._before_open()
                    progress.in_store = False
                worker = await pool._dispatch(call, self._frame, self._session, progress)
            except BaseException:
                if call.worker is not None and not call.done.is_set():
                    pool._abandon(call.worker, call)
                if self._probe:
                    pool._breaker.release_probe()
                raise
            self._call, self._worker = call, worker
            return
        self._finished = True
        error = pool._timeout_error(
            self.command, self._timeout, None, session=self._session, in_store=progress.in_store
        )
        pool._record(self.command, None, self._started, error)
        raise error

    async def aclose(self) -> None:
        """Stop the stream; cancels the generator in the worker if it still runs."""
        self._abandon()
        await anyio.lowlevel.checkpoint()

    def _abandon(self) -> None:
        self._finished = True
        if self._probe:  # a half-open probe that ends without an outcome
            self._probe = False
            self._pool._breaker.release_probe()
        call, worker = self._call, self._worker
        if call is not None and worker is not None and not call.done.is_set():
            self._pool._abandon(worker, call)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __del__(self) -> None:
        # Dropped without closing: cancel in the worker, but only from the
        # event loop's own thread (the pool's state is not thread-safe).
        if self._call is not None and not self._finished:
            try:
                anyio.get_current_task()
            except Exception:
                return
            self._abandon()
