"""Calls in flight on the host side, and mapping worker failures to exceptions."""

from __future__ import annotations

import math
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from .. import protocol as p
from ..errors import RemoteError, SnakepoolError, UnknownCommand

__all__ = ["PendingCall", "failure_to_exception"]


class PendingCall:
    """One call sent to a worker and not yet answered.

    The worker handle's reader resolves it (``resolve``/``fail``/``push``/
    ``end``); the caller waits on ``done`` (plain calls) or reads ``items``
    (streams). ``abandoned`` means the caller left (timeout, cancellation, a
    stream closed early): the answer is then dropped when it arrives.
    """

    __slots__ = (
        "_items_in",
        "abandoned",
        "command",
        "done",
        "error",
        "id",
        "items",
        "mode",
        "session_id",
        "value",
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
        self.done = anyio.Event()
        self.value: Any = None
        self.error: SnakepoolError | None = None
        self.abandoned = False
        self._items_in: MemoryObjectSendStream[Any] | None = None
        self.items: MemoryObjectReceiveStream[Any] | None = None
        if mode == p.CallMode.STREAM:
            self._items_in, self.items = anyio.create_memory_object_stream[Any](math.inf)

    def resolve(self, value: Any) -> None:
        self.value = value
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
        self.done.set()


def failure_to_exception(failure: p.Failure) -> SnakepoolError:
    """The exception a worker-side ``Failure`` becomes on the host."""
    cls = UnknownCommand if failure.kind == p.FailureKind.UNKNOWN_COMMAND else RemoteError
    return cls(failure.type, failure.message, failure.traceback)
