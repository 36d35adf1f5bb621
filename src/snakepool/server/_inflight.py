"""A client connection's requests in flight: their records, the order of a
session's requests (a lane), and the stepper that runs a plain call without
a task (see ``_connection``)."""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Sequence
from typing import Any, Protocol

__all__ = ["DONE", "HELD", "RUNNING", "Answering", "Eager", "Lane", "Request"]

#: A request's state: held back (waiting for room), running, answered.
HELD, RUNNING, DONE = 1, 2, 3


class Answering(Protocol):
    """What a stepper needs of its connection: the loop, and ways to answer."""

    loop: asyncio.AbstractEventLoop

    def _send(self, frame: dict[str, Any]) -> None: ...
    def _finished(self, request: Request) -> None: ...
    def _failed(self, request: Request, exc: BaseException) -> None: ...


class Lane:
    """The order of one session's requests on one connection."""

    __slots__ = ("calls", "last_op", "users")

    def __init__(self) -> None:
        self.last_op: asyncio.Future[None] | None = None  # done: every request before it too
        self.calls: list[asyncio.Future[None]] = []  # calls since that operation
        self.users = 0


class Request:
    __slots__ = (
        "by_client",
        "credit",
        "effect",
        "frame",
        "id",
        "kind",
        "lane",
        "size",
        "state",
        "task",
        "unstarted",
        "waits",
        "wakeup",
    )

    def __init__(self, request_id: int, kind: str, frame: dict[str, Any]) -> None:
        self.id = request_id
        self.kind = kind
        self.frame = frame
        self.size = 0  # its share of the bytes read (known at the end of the read)
        self.state = 0
        self.task: asyncio.Task[None] | Eager | None = None
        self.by_client = False  # cancelled by the client (not: the connection closed)
        self.unstarted = False  # a task that has not taken its first step yet
        self.lane: tuple[str, str] | None = None
        self.effect: asyncio.Future[None] | None = None  # done once it took effect
        self.waits: Sequence[asyncio.Future[None]] = ()  # the earlier requests of its session
        self.credit: int | None = None  # a stream's items it may still send (None: any)
        self.wakeup: asyncio.Future[None] | None = None  # a stream waiting to send


class Eager:
    """Runs a plain call's ``pool.call`` coroutine without a task: its first
    step at once, in the read that brought the request (the call reaches its
    worker in the same loop turn), each later step when the future it waits
    on is done. A task per request would add an object, a registration and
    a loop turn before the call is even sent; ``pool.call`` of a call without
    a session awaits only futures, so it needs none (no cancel scope, no
    current task). Cancelling it cancels that future, as a task would; and
    like a task it runs in a context of its own (what a call sets in a
    context variable, a span for one, stays with it). Python 3.12's eager
    tasks (``asyncio.eager_task_factory``) are the same idea, with a task.
    """

    __slots__ = ("connection", "context", "coro", "must_cancel", "request", "waiting")

    def __init__(self, connection: Answering, request: Request, coro: Any) -> None:
        self.connection = connection
        self.request = request
        self.coro = coro
        self.context = contextvars.copy_context()
        self.waiting: asyncio.Future[Any] | None = None
        self.must_cancel = False

    def step(self, _: object = None) -> None:
        self.waiting = None
        connection, request = self.connection, self.request
        try:
            if self.must_cancel:
                self.must_cancel = False
                awaited = self.context.run(self.coro.throw, asyncio.CancelledError())
            else:
                awaited = self.context.run(self.coro.send, None)
        except StopIteration as stop:
            connection._send({"t": "result", "i": request.id, "r": stop.value})
            connection._finished(request)
        except BaseException as exc:
            try:
                connection._failed(request, exc)
            except asyncio.CancelledError:
                pass  # (the connection closed: nobody to answer)
            finally:
                connection._finished(request)
        else:
            if awaited is None:  # (a bare yield: sleep(0))
                connection.loop.call_soon(self.step)
            else:
                awaited._asyncio_future_blocking = False
                awaited.add_done_callback(self.step)
                self.waiting = awaited

    def cancel(self) -> None:
        waiting = self.waiting
        if waiting is None or not waiting.cancel():  # (else: step throws, as a task does)
            self.must_cancel = True
