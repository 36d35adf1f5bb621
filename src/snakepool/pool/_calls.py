"""Calls in flight on the host side, and mapping worker failures to exceptions."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from .. import protocol as p
from ..errors import BadArguments, RemoteError, SnakepoolError, UnknownCommand, WrongMode

__all__ = ["PendingCall", "failure_to_exception"]


class PendingCall:
    """One call sent to a worker and not yet answered.

    The worker handle's reader resolves it (``resolve``/``fail``/``push``/
    ``end``); the caller waits on ``done`` (plain calls) or reads ``items``
    (streams). ``abandoned`` means the caller left (timeout, cancellation, a
    stream closed early): the answer is then dropped when it arrives.
    ``done`` is made on first use: the asyncio fast path waits on ``waiter``
    (a bare future) instead, which costs far less per call.

    A fast-path call keeps its ``frame``: one that a worker never started
    (it waited behind other calls there, then was withdrawn, or the worker
    died) is sent again, elsewhere, instead of failing.
    """

    __slots__ = (
        "_done",
        "_items_in",
        "abandoned",
        "command",
        "deadline",
        "error",
        "expired",
        "finished",
        "frame",
        "id",
        "items",
        "mode",
        "probe",
        "queued",
        "session_id",
        "value",
        "waiter",
        "withdrawing",
        "worker",
    )

    def __init__(
        self, call_id: int, command: str, mode: str, session_id: str | None = None
    ) -> None:
        self.id = call_id
        self.command = command
        self.mode = mode
        self.session_id = session_id
        self.worker: Any = None  # the WorkerHandle it was sent to
        self.finished = False
        self.expired = False  # the fast path's deadline passed
        self.frame = b""  # fast path: the Call frame, to send it again if it never started
        self.deadline = 0.0  # fast path: (event-loop time) when it expires
        self.queued: Any = None  # fast path: its place in the pool's queue while it has one
        self.withdrawing = False  # asked back from its worker (it may have started already)
        self.probe = False  # the circuit breaker's half-open probe: report its outcome
        self._done: anyio.Event | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.value: Any = None
        self.error: SnakepoolError | None = None
        self.abandoned = False
        self._items_in: MemoryObjectSendStream[Any] | None = None
        self.items: MemoryObjectReceiveStream[Any] | None = None
        if mode == p.CallMode.STREAM:
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
            self.finished = True  # (= _finish for a fast-path call: this runs per call)
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
