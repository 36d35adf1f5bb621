"""Calls in flight on the host side, and mapping worker failures to exceptions."""

from __future__ import annotations

import math
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from .. import protocol as p
from ..errors import BadArguments, RemoteError, SnakepoolError, UnknownCommand, WrongMode
from ._backend import Wakeup

__all__ = ["PendingCall", "failure_to_exception"]

_STREAM = p.CallMode.STREAM


class PendingCall(p.Call):
    """One call sent to a worker and not yet answered: the ``Call`` message
    the worker gets (its fields are the wire's), and what the host tracks
    about it until its answer (one object per call, not two).

    The worker handle's reader resolves it (``resolve``/``fail``/``push``/
    ``end``); the caller waits on ``waiter`` (a bare future on asyncio: see
    ``_backend``; or is called back by it: the socket server) or reads
    ``items`` (streams). ``done``, an event made on
    first use, is for background watchers. ``abandoned`` means the caller
    left (timeout, cancellation, a stream closed early): the answer is then
    dropped when it arrives.

    A call keeps its ``frame``: one that a worker never started (it waited
    behind other calls there, then was withdrawn, or the worker died) is sent
    again, elsewhere, instead of failing (a session's call on its session's
    route: another worker is made current for it first; only a call without
    a session is ever withdrawn).
    """

    # Slots, every one set in __init__: measured in instructions (valgrind),
    # a call with 64 callers costs less this way than with class-level
    # defaults and an instance dict (reading a default through an instance
    # is an unspecialised lookup on 3.11, and the dict grows as fields are set).
    __slots__ = (
        "_done", "_items_in", "abandoned", "deadline", "error", "expired", "finished",
        "frame", "in_store", "items", "limit", "probe", "queued", "sent", "span",
        "started", "value", "waiter", "want", "withdrawing", "worker",
    )  # fmt: skip

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
        self.worker: Any = None  # the WorkerHandle it was sent to
        self.finished = False
        self.expired = False  # its deadline passed
        self.frame = b""  # the Call frame, to send it again if it never started
        self.deadline = 0.0  # (event-loop time) when it expires (inf: never)
        # its time limit in seconds (None: none); a stream's is per item (CallStream)
        self.limit: float | None = timeout
        self.started = 0.0  # (time.perf_counter()) when its caller made it
        self.sent = False  # sent to a worker, or queued (the hand-off sends it)
        self.in_store = False  # its session is being read from the store (a timeout says so)
        self.queued: Any = None  # its place in the pool's queue while it has one
        self.want: Any = None  # the only worker it may go to (a session's, current for it)
        self.withdrawing = False  # asked back from its worker (it may have started already)
        self.probe = False  # the circuit breaker's half-open probe: report its outcome
        self.waiter: Wakeup | None = None
        self.span: Any = None  # its OpenTelemetry span, when the pool traces calls
        self.value: Any = None
        self.error: SnakepoolError | None = None
        self.abandoned = False
        self._done: anyio.Event | None = None
        self._items_in: MemoryObjectSendStream[Any] | None = None
        self.items: MemoryObjectReceiveStream[Any] | None = None
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
