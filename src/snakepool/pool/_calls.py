"""Calls in flight on the host side, and mapping worker failures to exceptions."""

from __future__ import annotations

import math
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from .. import protocol as p
from ..errors import BadArguments, RemoteError, SnakepoolError, UnknownCommand, WrongMode
from ._backend import Waiter

__all__ = ["PendingCall", "failure_to_exception"]

_STREAM = p.CallMode.STREAM


class PendingCall(p.Call):
    """One call sent to a worker and not yet answered: the ``Call`` message
    the worker gets (its fields are the wire's), and what the host tracks
    about it until its answer (one object per call, not two).

    The worker handle's reader resolves it (``resolve``/``fail``/``push``/
    ``end``); the caller waits on ``waiter`` (a bare future on asyncio: see
    ``_backend``) or reads ``items`` (streams). ``done``, an event made on
    first use, is for background watchers. ``abandoned`` means the caller
    left (timeout, cancellation, a stream closed early): the answer is then
    dropped when it arrives.

    A call keeps its ``frame``: one that a worker never started (it waited
    behind other calls there, then was withdrawn, or the worker died) is sent
    again, elsewhere, instead of failing (a session's call on its session's
    route: another worker is made current for it first; only a call without
    a session is ever withdrawn).
    """

    # No __slots__ of its own: a call sets only what differs from these
    # class-level defaults (a slots class must set every field in __init__,
    # which costs more than the rest of making a call).
    worker: Any = None  # the WorkerHandle it was sent to
    finished = False
    expired = False  # its deadline passed
    frame = b""  # the Call frame, to send it again if it never started
    deadline = 0.0  # (event-loop time) when it expires (inf: never)
    limit: float | None = None  # its time limit in seconds (None: none)
    started = 0.0  # (time.perf_counter()) when its caller made it
    sent = False  # sent to a worker, or queued (the hand-off sends it)
    in_store = False  # its session is being read from the store (for a timeout's message)
    queued: Any = None  # its place in the pool's queue while it has one
    want: Any = None  # the only worker it may go to (a session's, current for it)
    withdrawing = False  # asked back from its worker (it may have started already)
    probe = False  # the circuit breaker's half-open probe: report its outcome
    _done: anyio.Event | None = None
    waiter: Waiter | None = None
    span: Any = None  # its OpenTelemetry span, when the pool traces calls
    value: Any = None
    error: SnakepoolError | None = None
    abandoned = False
    _items_in: MemoryObjectSendStream[Any] | None = None
    items: MemoryObjectReceiveStream[Any] | None = None

    # A call is itself, not equal to another with the same fields (sets, dicts).
    __eq__ = object.__eq__
    __hash__ = object.__hash__

    def __init__(
        self,
        call_id: int,
        command: str,
        args: dict[str, Any],
        mode: str = p.CallMode.CALL,
        timeout: float | None = None,
        session_id: str | None = None,
        trace: str | None = None,
    ) -> None:
        self.id = call_id
        self.command = command
        self.args = args
        self.mode = mode
        self.timeout = timeout  # (on the wire; `limit` is the host's)
        self.session_id = session_id
        self.trace = trace
        # (read on every call: set here, since reading a class-level default
        # through an instance is an unspecialised lookup on Python 3.11)
        self.error = None
        self.probe = False
        self._done = None
        self._items_in = None
        if mode == _STREAM:
            self._items_in, self.items = anyio.create_memory_object_stream[Any](math.inf)

    @property
    def done(self) -> anyio.Event:
        """Set once the call has its answer (result, failure or stream end)."""
        done = self._done
        if done is None:
            done = self._done = anyio.Event()
            if self.finished:
                done.set()
        return done

    def resolve(self, value: Any) -> None:
        self.value = value
        waiter = self.waiter
        if waiter is not None and self._done is None and self._items_in is None:
            self.finished = True  # (= _finish for a plain call: this runs per call)
            if not waiter.done():
                waiter.set_result(None)
            return
        self._finish()

    def fail(self, error: SnakepoolError) -> None:
        self.error = error
        self._finish()

    def push(self, item: Any) -> None:
        if self._items_in is not None and not self.abandoned:
            self._items_in.send_nowait(item)

    def end(self) -> None:
        self._finish()

    def _finish(self) -> None:
        if self._items_in is not None:
            self._items_in.close()  # the reader sees EndOfStream once items run out
        self.finished = True
        if self._done is not None:
            self._done.set()
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


def failure_to_exception(failure: p.Failure) -> SnakepoolError:
    """The exception a worker-side ``Failure`` becomes on the host."""
    cls = _FAILURE_CLASSES.get(failure.kind, RemoteError)
    return cls(failure.type, failure.message, failure.traceback)


#: The worker's failure kinds that have a class (with a kind) of their own.
_FAILURE_CLASSES: dict[str, type[RemoteError]] = {
    p.FailureKind.UNKNOWN_COMMAND: UnknownCommand,
    p.FailureKind.BAD_ARGUMENTS: BadArguments,
    p.FailureKind.WRONG_MODE: WrongMode,
}
