"""The lifecycle a ``Pool`` and a ``Supervisor`` share.

::

    new --begin_start--> starting --started--> running --begin_close--> closing --closed--> closed
     |                       |                                                  ^
     |                       +--start_failed--> closing --closed(broken)--> broken
     +--begin_close (never started: nothing to stop) ---------------------------+
    running --broke--> broken --begin_close--> closing --closed--> closed

Runs once: start, use, close. ``begin_start`` on a closed (or broken) one
raises ``PoolClosed``, on a started one ``RuntimeError``. Closing is
idempotent and waits: a close while starting waits for the start to end,
and a close while another task closes waits for that close to finish.
*Closed* (someone closed it) is kept apart from *broken* (something else
ended it: a start that failed, or, once running, the loss of what its workers
run on: a Ray cluster gone; ``reason`` says which).

Only the states and who waits for what live here; what starting and closing
do is the owner's. The events are made by ``begin_start``/``begin_close``
(which run on the event loop), not at construction (which may not).
"""

from __future__ import annotations

import enum
from typing import Self

import anyio
import anyio.abc

from ..errors import PoolClosed

__all__ = ["Lifecycle", "LifecycleOwner", "State"]


class State(enum.Enum):
    NEW = "new"
    STARTING = "starting"
    RUNNING = "running"
    CLOSING = "closing"
    CLOSED = "closed"
    BROKEN = "broken"  # ended by something else than a close (a failed start)


_ENDED = frozenset({State.CLOSING, State.CLOSED, State.BROKEN})


class Lifecycle:
    """``state``, and the events a concurrent start or close waits on.

    ``what`` names the owner in error messages (``"pool 'default'"``), ``kind``
    its class (``"Pool"``).
    """

    __slots__ = ("_close_done", "_running_broke", "_start_done", "kind", "reason", "state", "what")

    def __init__(self, what: str, kind: str) -> None:
        self.what = what
        self.kind = kind
        self.state = State.NEW
        self.reason = "its start failed"  # (why it is broken, if it is)
        self._running_broke = False  # broken while running: still to be closed
        self._start_done: anyio.Event | None = None
        self._close_done: anyio.Event | None = None

    @property
    def ended(self) -> bool:
        """Closing, closed or broken: it takes no more work (the owner's ``closed``)."""
        return self.state in _ENDED

    def __str__(self) -> str:
        return self.state.value

    # --- starting ------------------------------------------------------------------

    def begin_start(self) -> None:
        """new -> starting; ``PoolClosed`` if it has ended, ``RuntimeError`` if started."""
        if self.state in _ENDED:
            raise PoolClosed(
                f"{self.what} is {self.state.value} and cannot be started again: create a "
                f"new {self.kind} (a {self.kind.lower()} runs once: start, use, close)"
            )
        if self.state is not State.NEW:
            raise RuntimeError(f"{self.what} was already started ({self.state.value})")
        self.state = State.STARTING
        self._start_done = anyio.Event()
        self._close_done = anyio.Event()

    def started(self) -> None:
        """starting -> running."""
        assert self.state is State.STARTING and self._start_done is not None
        self.state = State.RUNNING
        self._start_done.set()

    def start_failed(self) -> None:
        """starting -> closing: the owner cleans up, then calls ``closed(broken=True)``."""
        assert self.state is State.STARTING
        self.state = State.CLOSING

    def broke(self, reason: str) -> None:
        """running -> broken: it can no longer work (``reason``); ``aclose()`` still cleans up."""
        if self.state is State.RUNNING:
            self.state = State.BROKEN
            self.reason = reason
            self._running_broke = True

    # --- closing -------------------------------------------------------------------

    async def begin_close(self) -> State | None:
        """Decide who closes; call it shielded from cancellation.

        Returns the state the caller now closes it from (``NEW``: it never
        started, nothing runs; ``RUNNING``), having set ``closing``: the
        caller closes, then calls ``closed()``. Returns ``None`` when it has
        ended or another task closes it: this waited until that close
        finished.
        """
        state = self.state
        if state is State.NEW:
            self._start_done = anyio.Event()
            self._start_done.set()
            self._close_done = anyio.Event()
            self.state = State.CLOSING
            return State.NEW
        assert self._start_done is not None and self._close_done is not None
        if state is State.STARTING:  # closed from another task while starting
            await self._start_done.wait()
        if self.state is State.BROKEN and self._running_broke:  # broken, not yet closed
            self._running_broke = False
            self.state = State.CLOSING
            return State.RUNNING
        if self.state is not State.RUNNING:  # someone else closes it (or did)
            await self._close_done.wait()
            return None
        self.state = State.CLOSING
        return State.RUNNING

    def closed(self, *, broken: bool = False) -> None:
        """closing -> closed (or broken); wakes whoever waits for the close."""
        assert self._start_done is not None and self._close_done is not None
        self.state = State.BROKEN if broken else State.CLOSED
        self._close_done.set()
        self._start_done.set()


class LifecycleOwner(anyio.abc.AsyncResource):
    """The face a ``Lifecycle`` gives its owner (``Pool``, ``Supervisor``):
    ``async with`` (start, then ``aclose``), ``closed`` and ``state``. The owner
    sets ``_lifecycle`` and defines ``start`` and ``aclose``."""

    _lifecycle: Lifecycle

    async def start(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    @property
    def closed(self) -> bool:
        """Closing, closed, or broken (its start failed): it takes no more calls."""
        return self._lifecycle.ended

    @property
    def state(self) -> str:
        """``new``, ``starting``, ``running``, ``closing``, ``closed``, or ``broken``
        (ended by something else than ``aclose()``: its start failed)."""
        return self._lifecycle.state.value
