"""A client connection's requests in flight: their records, and the order of
a session's requests (a lane). See ``_connection``."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from ..pool._calls import PendingCall
    from ..pool._route import CallRoute

__all__ = ["DONE", "HELD", "RUNNING", "WOKEN", "Answering", "Lane", "Request"]

#: A request's state: held back (waiting for room), running, woken (a plain
#: call whose answer is due: the next thing it does is answer), answered.
HELD, RUNNING, WOKEN, DONE = 1, 2, 3, 4


class Answering(Protocol):
    """What a plain call's request needs of its connection: a way to be answered."""

    def _answer_soon(self, request: Request) -> None: ...


class Lane:
    """The order of one session's requests on one connection."""

    __slots__ = ("calls", "last_op", "users")

    def __init__(self) -> None:
        self.last_op: asyncio.Future[None] | None = None  # done: every request before it too
        self.calls: list[asyncio.Future[None]] = []  # calls since that operation
        self.users = 0


class Request:
    """One request of a client, held back or running. A plain call (one
    without a session) runs with no task: its request is the call's waiter
    (``pool._backend.Wakeup``), which the pool sets when the answer, the
    deadline or the pool's closing comes, and which then has its connection
    answer it. A task would cost an object, a registration and a loop turn
    before the call even reached its worker; the call's route
    (``pool._route``) is synchronous but for the wait."""

    __slots__ = (
        "by_client",
        "call",
        "credit",
        "effect",
        "frame",
        "id",
        "kind",
        "lane",
        "owner",
        "route",
        "size",
        "state",
        "task",
        "unstarted",
        "waits",
        "wakeup",
    )

    def __init__(self, owner: Answering, request_id: int, kind: str, frame: dict[str, Any]) -> None:
        self.owner = owner
        self.id = request_id
        self.kind = kind
        self.frame = frame
        self.size = 0  # its share of the bytes read (known at the end of the read)
        self.state = 0
        self.task: asyncio.Task[None] | None = None  # (None: a plain call, or not started)
        self.call: PendingCall | None = None  # a plain call's, in its pool
        self.route: CallRoute | None = None  # ... and its pool's route
        self.by_client = False  # cancelled by the client (not: the connection closed)
        self.unstarted = False  # a task that has not taken its first step yet
        self.lane: tuple[str, str] | None = None  # (pool, session) of a session's request
        self.effect: asyncio.Future[None] | None = None  # done once it took effect
        self.waits: Sequence[asyncio.Future[None]] = ()  # the earlier requests of its session
        self.credit: int | None = None  # a stream's items it may still send (None: any)
        self.wakeup: asyncio.Future[None] | None = None  # a stream waiting to send

    # A plain call's waiter (pool._backend.Wakeup): set once, by its pool.

    def done(self) -> bool:
        return self.state >= WOKEN

    def set_result(self, result: None) -> None:
        self.state = WOKEN
        self.owner._answer_soon(self)
