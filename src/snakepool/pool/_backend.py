"""What a call's route needs from the event loop, on asyncio and on any other
anyio backend (trio): the loop's clock, a timer, and a *waiter* (what a caller
awaits until its call is answered or expires).

On asyncio these are the loop's own ``time``, ``call_at`` and bare futures:
the cheapest things the loop has (an ``anyio.Event`` costs an
``asyncio.Event`` and a cancel scope costs a task-state switch per call).
Elsewhere the same three are built from anyio: the clock is
``anyio.current_time``, a timer is a task in the pool's task group that
sleeps until its time, and a waiter wraps an ``anyio.Event``. The call path
is written once against :class:`Loop`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Generator
from typing import Any, Protocol

import anyio
import anyio.abc

__all__ = ["Loop", "NotStarted", "Waiter", "Wakeup", "current_loop", "running_on_asyncio"]


def running_on_asyncio() -> bool:
    """True inside an asyncio event loop (anyio's asyncio backend, uvloop too); false on trio."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class Wakeup(Protocol):
    """What wakes a call's caller, as the route sees it: set once (the answer,
    the deadline or the pool closing), then done. A caller that is not a
    coroutine (the socket server) passes one of its own that calls it back."""

    def done(self) -> bool: ...

    def set_result(self, result: None) -> None: ...


class Waiter(Wakeup, Protocol):
    """A one-shot wake-up to await: an ``asyncio.Future`` on asyncio, :class:`_EventWaiter` elsewhere."""

    def __await__(self) -> Generator[Any, None, Any]: ...


class Loop:
    """The clock, timers and waiters of the running event loop."""

    time: Callable[[], float]
    new_waiter: Callable[[], Waiter]

    def call_at(self, when: float, fn: Callable[[], None]) -> None:
        """Run ``fn()`` in the loop at ``when`` (``time()``'s clock), or soon after."""
        raise NotImplementedError


class _AsyncioLoop(Loop):
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.time = loop.time
        self.new_waiter = loop.create_future
        self._call_at = loop.call_at

    def call_at(self, when: float, fn: Callable[[], None]) -> None:
        self._call_at(when, fn)


class _EventWaiter:
    """A future-like waiter made of an ``anyio.Event`` (for trio)."""

    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event = anyio.Event()

    def done(self) -> bool:
        return self._event.is_set()

    def set_result(self, result: None) -> None:
        self._event.set()

    def __await__(self) -> Generator[Any, None, Any]:
        return self._event.wait().__await__()


class _AnyioLoop(Loop):
    def __init__(self, group: Callable[[], anyio.abc.TaskGroup]) -> None:
        self.time = anyio.current_time
        self.new_waiter = _EventWaiter
        self._group = group

    def call_at(self, when: float, fn: Callable[[], None]) -> None:
        self._group().start_soon(_run_at, when, fn)


async def _run_at(when: float, fn: Callable[[], None]) -> None:
    await anyio.sleep_until(when)
    fn()


class NotStarted(Loop):
    """The loop of a pool that has not started: every use says so."""

    def __init__(self) -> None:
        self.time = self.new_waiter = self._refuse

    @staticmethod
    def _refuse() -> Any:
        raise RuntimeError("no event loop yet: start the pool first")

    def call_at(self, when: float, fn: Callable[[], None]) -> None:
        self._refuse()


def current_loop(group: Callable[[], anyio.abc.TaskGroup]) -> Loop:
    """The running loop's :class:`Loop`; timers off asyncio run as tasks of ``group()``."""
    if running_on_asyncio():
        return _AsyncioLoop(asyncio.get_running_loop())
    return _AnyioLoop(group)
