"""The one route every call takes: encode, admit, send (or queue), wait, time
out, record.

``Pool.call``, ``Pool.cast`` and ``Pool.stream`` all go this way, with or
without a session, on any event loop::

    new_call()   check and encode (bad args / oversized -> error, nothing sent)
    send()       ask the breaker; place the call synchronously: sent to a worker
                 with a free slot, sent ahead to one that will start it when a
                 slot frees, or queued (full -> PoolOverloaded); a session call
                 goes to its worker when that worker is current (no store read)
    place()      only a session call that send() left: its worker is chosen by
                 affinity and brought up to date from the store, then it is sent
    await call.waiter   the answer wakes it, or its deadline (one timer per bucket);
                 (the socket server passes a waiter that calls it back instead)
    outcome()    count it, feed the breaker, apply the recovery policy; the value
                 or the mapped exception (RemoteError, WorkerCrashed, CallTimeout...)

``left()`` is the way out for a caller that goes before its answer
(cancelled, or the call could not be sent): it takes the call out of the
queue, cancels it in its worker, and gives the breaker's probe back.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import math
import time
import urllib.parse
from collections.abc import Callable, Mapping
from typing import Any

import anyio

from .. import protocol as p
from .._timeouts import check_timeout
from ..errors import (
    CallTimeout,
    CircuitOpen,
    ErrorCategory,
    PoolClosed,
    ProtocolError,
    ResourceExceeded,
    SnakepoolError,
    WorkerCrashed,
)
from ..observability._tracing import CallTracer, tracer_for
from ._backend import Loop, NotStarted, Wakeup
from ._calls import PendingCall
from ._counters import NO_WORKER, CallCounts
from ._deadlines import Deadlines
from ._lifecycle import State
from ._parts import PoolParts
from ._recovery import Recovery
from ._store import check_session_id
from ._worker import WorkerHandle

__all__ = ["CallRoute"]

_log = logging.getLogger("snakepool.pool")
#: Seconds between RSS checks after calls (psutil walks the process tree).
_MEMORY_CHECK_INTERVAL = 0.05
# (module globals: read on every call, cheaper than attribute lookups)
_RUNNING = State.RUNNING
_STREAM = p.CallMode.STREAM
#: The deadline of a call without a time limit (``call_timeout=None``, the default).
_NO_DEADLINE = math.inf


def _expire(call: PendingCall) -> None:
    """A call's deadline: wake the caller, who finds its call unfinished."""
    call.expired = True
    waiter = call.waiter
    if waiter is not None and not waiter.done():
        waiter.set_result(None)


class CallRoute:
    """Calls of one pool from their caller to a worker and back (see above)."""

    def __init__(
        self,
        parts: PoolParts,
        *,
        check_open: Callable[[], None],
        recovery: Mapping[ErrorCategory, Recovery],
    ) -> None:
        self.name = parts.name
        self.config = config = parts.config
        self.check_open = check_open
        self.recovery = recovery
        self._parts = parts
        # (read on every call: attributes of their own)
        self._dispatcher, self._sessions = parts.dispatcher, parts.sessions
        self._breaker, self._listeners = parts.breaker, parts.listeners
        self._call_timeout = check_timeout(config.call_timeout)
        self.cancel_grace = float(config.cancel_grace)
        # Calls are framed once, before a worker is chosen (so they need no
        # copy of args): by a connection of their own, which only sends.
        self._calls_out = p.Connection(p.Role.HOST, max_frame_bytes=config.max_frame_bytes)
        self._ids = itertools.count(1)
        self.loop: Loop = NotStarted()  # the event loop's clock, timers, waiters (start())
        self.deadlines = Deadlines(self.loop, _expire)
        self.completed = 0
        self.failed: dict[str, int] = collections.defaultdict(int)
        #: Calls by command, worker and outcome, with latencies (metrics, status).
        self.counts = CallCounts()
        #: Spans for calls (snakepool.observability._tracing), when the host traces.
        self.tracer: CallTracer | None = None
        #: Nothing but counting to do after a plain call's success (see outcome).
        self._plain = config.max_memory_mb is None

    def start(self, loop: Loop) -> None:
        """Calls may come: on ``loop``."""
        self.loop = loop
        self.deadlines = Deadlines(loop, _expire)
        self.tracer = tracer_for(self.name)
        self._plain = self.config.max_memory_mb is None and self.tracer is None

    def new_call(
        self,
        command: str,
        args: Mapping[str, Any] | None,
        timeout: float | None,
        session: str | None,
        mode: str,
        started: float,
    ) -> tuple[PendingCall, bytes]:
        """The call and its frame, or a clear error before anything is queued or sent."""
        if self._parts.lifecycle.state is not _RUNNING or not self._parts.workers:
            self.check_open()
        call_id = next(self._ids)
        if self.tracer is None:
            call, frame = self._encode(call_id, command, args, timeout, session, mode)
        else:
            span, trace = self.tracer.start(command, mode, session)
            try:
                call, frame = self._encode(call_id, command, args, timeout, session, mode, trace)
            except BaseException as exc:
                self.tracer.end(span, None, "refused", exc)
                raise
            call.span = span
        call.started = started
        return call, frame

    def send(self, call: PendingCall, frame: bytes, waiter: Wakeup | None = None) -> None:
        """Ask the breaker, then send ``call`` to a worker, or queue it (or leave
        a session call that needs its store to ``place``); its deadline starts now.
        ``waiter`` wakes the caller (default: a new one of the loop's, to await)."""
        if not self._breaker.closed:
            call.probe = self.admit(call.command)
        deadlines = self.deadlines
        try:
            call.frame = frame  # (sent again if a worker gives it back unstarted)
            if call.session_id is None:
                # A worker that can take it now, or hold it until a slot frees,
                # unless someone queued comes first (then it queues, below).
                worker = self._dispatcher.try_reserve(ahead=True)
                if worker is not None:
                    worker.submit(call, frame)
                    call.sent = True
            else:
                call.sent = self._sessions.send_now(call, frame)
            # Set up after the write, off the round trip's path: no answer is
            # read before this task yields. One deadline for queueing and
            # running: it marks the call expired (a hand-off in the deadline's
            # own loop turn then does not send it late).
            call.waiter = self.loop.new_waiter() if waiter is None else waiter
            limit = call.limit
            call.deadline = _NO_DEADLINE if limit is None else deadlines.add(call, limit)
            if not call.sent and (call.session_id is None or call.want is not None):
                # (a session's call waits for its own worker, which is current)
                call.queued = self._dispatcher.enqueue_call(
                    call, frame, call.deadline, want=call.want
                )
                call.sent = True  # (the hand-off sends it)
        except BaseException as exc:  # (full: PoolOverloaded)
            if call.span is not None:
                self.trace_end(call, exc)
            self.left(call)
            raise

    async def place(self, call: PendingCall, frame: bytes) -> None:
        """Send a session call once its worker is current (the store may be read);
        within the call's deadline, blaming the store when that is what it waited on."""
        if call.deadline != _NO_DEADLINE:
            remaining = call.deadline - self.loop.time()
        else:  # (no deadline; a stream: the limit of its first item)
            remaining = math.inf if call.limit is None else call.limit
        if remaining == math.inf:  # (a cancel scope costs ~8 us a call: none when it never fires)
            await self._sessions.place(call, frame)
            call.sent = True
            return
        with anyio.move_on_after(remaining if remaining > 0 else 0) as scope:
            await self._sessions.place(call, frame)
            call.sent = True
        if scope.cancelled_caught:
            error = self.timeout_error(call, None)
            self.left(call)
            self.record(call.command, None, call.started, error)
            raise error

    async def finish_cast(self, call: PendingCall, frame: bytes) -> None:
        """The rest of a cast's route, in the background: counted and logged, never raised."""
        try:
            if not call.sent:
                await self.place(call, frame)
            await call.waiter  # type: ignore[misc]
        except CallTimeout:  # (place() timed out: recorded there)
            return
        except SnakepoolError as exc:  # (its route failed: the store, affinity)
            self.left(call)
            self.record(call.command, None, call.started, exc)
            return
        except BaseException:
            self.left(call)
            raise
        with contextlib.suppress(SnakepoolError):
            self.outcome(call, call.started)

    def outcome(self, call: PendingCall, started: float) -> Any:
        """The value of a call its caller woke for, or the error to raise."""
        if call.deadline != _NO_DEADLINE:
            self.deadlines.remove(call, call.deadline)
        if call.finished:
            quiet = not self._listeners.active and self._plain
            if call.error is None and self._breaker.steady and not call.probe and quiet:
                self.completed += 1  # (= _record when it has nothing else to do)
                self.counts.ok(call.command, call.worker.slot, started)
                return call.value
            self.record(call.command, call.worker, started, call.error, probe=call.probe)
            if call.span is not None:
                self.trace_end(call, call.error)
            if call.error is not None:
                raise call.error
            return call.value
        error = self._unfinished(call, started)
        if call.span is not None:
            self.trace_end(call, error)
        raise error

    def left(self, call: PendingCall) -> None:
        """The caller left (cancelled, or the call could not be sent) before the answer."""
        self.deadlines.remove(call, call.deadline)
        if call.worker is None:
            call.abandoned = True  # (a session call its store is reading is then not sent)
            if call.queued is not None:
                self._dispatcher.leave(call.queued)
        if call.worker is not None and not call.finished:
            self.abandon(call.worker, call)
        if call.probe:
            call.probe = False
            self._breaker.release_probe()
        if call.span is not None:
            self.trace_end(call, call.error if call.finished else None, cancelled=not call.finished)

    def trace_end(
        self, call: PendingCall, error: BaseException | None, *, cancelled: bool = False
    ) -> None:
        """End ``call``'s span (once) with its outcome."""
        span, call.span = call.span, None
        if span is None or self.tracer is None:
            return
        if cancelled:
            outcome = "cancelled"
        elif error is None:
            outcome = "ok"
        else:
            category = getattr(error, "category", None)
            outcome = category.value if isinstance(category, ErrorCategory) else "error"
        worker = call.worker.slot if call.worker is not None else None
        self.tracer.end(span, worker, outcome, error)

    def _unfinished(self, call: PendingCall, started: float) -> SnakepoolError:
        """A call woke unanswered: the pool closed while it was queued, or its
        deadline passed (then it is cancelled or dropped)."""
        worker, queued = call.worker, call.queued
        if worker is None and queued is not None and queued.error is not None:
            if call.probe:  # the pool closed while the call was queued
                self._breaker.release_probe()
            closed: SnakepoolError = queued.error
            return closed
        error = self.timeout_error(call, worker)
        if worker is None:
            if queued is not None:
                self._dispatcher.leave(queued)
        else:
            self.abandon(worker, call)
        self.record(call.command, worker, started, error, probe=call.probe)
        return error

    def timeout_error(self, call: PendingCall, worker: WorkerHandle | None) -> CallTimeout:
        command, session = call.command, call.session_id
        limit = math.inf if call.limit is None else call.limit  # (None: never times out)
        if worker is None and call.in_store:
            return CallTimeout(
                f"call {command!r} of session {session!r} timed out after {limit:g}s while "
                f"reading the session from its store ({self._store_description()}), before it "
                f"was sent to any worker: is the session store reachable and answering?"
            )
        if worker is not None and worker.waits_here(call):
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
        trace: str | None = None,
    ) -> tuple[PendingCall, bytes]:
        """The call and its frame, or a clear error before anything is queued or sent.

        Encoded at once, so ``args`` need no copy. A stream's timeout bounds
        each item, not the whole stream: its frame carries no limit.
        """
        if not isinstance(command, str) or not command:
            raise TypeError(f"command must be a non-empty str, got {command!r}")
        if type(args) is not dict:
            if args is None:
                args = {}
            elif isinstance(args, Mapping):
                args = dict(args)
            else:
                raise TypeError(
                    f"args of {command!r} must be a dict of keyword arguments, "
                    f"got {type(args).__name__}"
                )
        for key in args:
            if not isinstance(key, str):
                raise TypeError(
                    f"args of {command!r} must have str keys (they are keyword arguments)"
                )
        limit = self._call_timeout  # (None: no limit)
        if timeout is not None:
            limit = check_timeout(timeout)
        if mode == _STREAM:
            limit = None
        if session is not None and session not in self._sessions.bindings:
            check_session_id(session)  # (a bound session's id was checked when it was bound)
        call = PendingCall(call_id, command, args, mode, limit, session, trace)
        try:
            return call, self._calls_out.send(call)
        except TypeError as exc:
            raise TypeError(f"args of {command!r} are {exc}") from None
        except ProtocolError as exc:
            raise ProtocolError(
                f"args of {command!r} are too large: {exc}; nothing was sent"
            ) from None

    def admit(self, command: str) -> bool:
        """Ask the breaker; a refusal is counted and raised as ``CircuitOpen``."""
        try:
            return self._breaker.admit()
        except CircuitOpen as exc:
            self.failed[exc.category.value] += 1
            self.counts.failure(command, NO_WORKER, None, exc.category.value)
            self._listeners.emit("call.failed", None, command=command, category=exc.category.value,
                                 error="CircuitOpen", message=str(exc))  # fmt: skip
            raise

    def record(
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
            self.completed += 1
            self.counts.ok(command, NO_WORKER if slot is None else slot, started)
            if self._listeners.active:
                duration = time.perf_counter() - started
                self._listeners.emit("call.completed", slot, command=command, duration=duration)
        else:
            self.failed[error.category.value] += 1
            where = NO_WORKER if slot is None else slot
            self.counts.failure(command, where, started, error.category.value)
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
            self.check_memory(worker, limit)

    def check_memory(self, worker: WorkerHandle, limit_mb: float) -> None:
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

    def abandon(self, worker: WorkerHandle, call: PendingCall) -> None:
        """The caller left: cancel in the worker; the timeout policy decides the rest."""
        if call.id not in worker.pending:
            return
        worker.cancel(call)
        if (
            self._parts.background.running
            and self.recovery[ErrorCategory.TIMEOUT] is not Recovery.NONE
        ):
            self._parts.background.group.start_soon(self._watch_abandoned, worker, call)

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

    # --- choosing a worker (synchronous decisions) ---------------------------------

    def send_again(self, call: PendingCall) -> None:
        """``call`` left its worker without starting (withdrawn, or the worker
        died): send it to a free worker, or queue it first in line."""
        call.worker = call.want = call.queued = None
        call.withdrawing = False
        if call.finished or call.abandoned or call.expired:
            return  # its caller has left, or leaves at its deadline
        if self.loop.time() >= call.deadline:
            return  # (its timer runs later in this loop turn: never sent again)
        if call.session_id is not None:
            # (its session's worker died: another one is made current first, on
            # the session's route, entered now: calls sent again keep their order)
            running = self._parts.lifecycle.state is _RUNNING
            if not (running and self._sessions.place_soon(call, call.frame)):
                call.fail(PoolClosed(f"pool {self.name!r} closed before call {call.command!r} ran"))
            return
        worker = self._dispatcher.try_reserve_first() if call.frame else None
        if worker is not None:
            worker.submit(call, call.frame)
        elif self._parts.lifecycle.state is _RUNNING and call.frame:
            call.queued = self._dispatcher.enqueue_call(call, call.frame, call.deadline, first=True)
        else:  # closing: nothing would send it any more
            call.fail(PoolClosed(f"pool {self.name!r} closed before call {call.command!r} ran"))
