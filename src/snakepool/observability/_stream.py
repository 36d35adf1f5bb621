"""Event subscriptions: ``async for event in pool.events(...)``.

A subscription is a listener of its pools (and of their DSPy monitors, where
``snakepool.dspy`` has one) that puts each matching event into a bounded
buffer of its own. A listener runs inside the pool's own code, so it must
never wait: when the buffer is full the oldest event is dropped and counted
(``dropped``), and the pool carries on at its own pace, however slowly the
subscriber reads.

A subscription that wants no ``call.*`` event (``names`` says so) is
registered with ``calls=False``, so calls keep their fast path while it
listens.
"""

from __future__ import annotations

import collections
import fnmatch
import importlib
import re
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Self

import anyio
import anyio.abc

from ..pool import Event, Pool

__all__ = ["DEFAULT_BUFFER", "Subscription", "name_matcher"]

#: Events a subscription holds for its reader before it drops the oldest.
DEFAULT_BUFFER = 1000
_MAX_BUFFER = 1_000_000
#: Names the per-call events have (a subscription wanting none of them keeps calls fast).
_CALL_EVENTS = ("call.completed", "call.failed")
_DSPY_EVENTS = ("dspy.evaluate.progress", "dspy.optimize.candidate", "dspy.fuse.opened")


def name_matcher(names: str | Sequence[str] | None) -> Callable[[str], bool] | None:
    """A test for event names matching any of ``names`` (shell patterns such as
    ``worker.*``); None: every name. A clear error for anything else."""
    if names is None:
        return None
    if isinstance(names, str):
        names = [names]
    if not isinstance(names, Sequence) or not all(isinstance(n, str) and n for n in names):
        raise TypeError(
            f"names must be a list of event names or patterns (e.g. ['worker.*']), got {names!r}"
        )
    pattern = re.compile("|".join(fnmatch.translate(name) for name in names))
    return lambda name: pattern.match(name) is not None


def check_buffer(buffer: Any) -> int:
    if type(buffer) is not int or not 1 <= buffer <= _MAX_BUFFER:
        raise ValueError(f"buffer must be an int from 1 to {_MAX_BUFFER}, got {buffer!r}")
    return buffer


class Subscription(anyio.abc.AsyncResource):
    """The events of some pools, newest last; iterate it with ``async for``.

    ``names``: event names or shell patterns (``["worker.*", "breaker.*"]``;
    default every event); ``pools``: names of the pools to hear from (default
    all given). ``dropped`` counts the events lost because the buffer was full.
    ``close()`` (or leaving ``async with``) ends the iteration.
    """

    def __init__(
        self,
        pools: Iterable[Pool],
        *,
        names: str | Sequence[str] | None = None,
        pool_names: str | Sequence[str] | None = None,
        buffer: int = DEFAULT_BUFFER,
    ) -> None:
        self.limit = check_buffer(buffer)
        self._match = name_matcher(names)
        sources = list(pools)
        if pool_names is not None:
            if isinstance(pool_names, str):  # (one name: as for ``names``)
                pool_names = [pool_names]
            if not isinstance(pool_names, Sequence) or not all(
                isinstance(n, str) for n in pool_names
            ):
                raise TypeError(f"pools must be a list of pool names, got {pool_names!r}")
            known = {pool.name for pool in sources}
            unknown = sorted(set(pool_names) - known)
            if unknown:
                raise KeyError(
                    f"no pool named {unknown[0]!r} (pools: {', '.join(sorted(known)) or 'none'})"
                )
            sources = [pool for pool in sources if pool.name in pool_names]
        #: Events dropped because the reader was behind by ``limit`` events.
        self.dropped = 0
        self._buffer: collections.deque[tuple[float, Event]] = collections.deque()
        self._wakeup: anyio.Event | None = None
        self._closed = False
        self._detach: list[Callable[[], None]] = []
        calls = self._wants(_CALL_EVENTS)
        for pool in sources:
            pool.add_listener(self._on_event, calls=calls)
            self._detach.append(lambda pool=pool: pool.remove_listener(self._on_event))  # type: ignore[misc]
            if self._wants(_DSPY_EVENTS):
                self._attach_dspy(pool)

    def _wants(self, names: Iterable[str]) -> bool:
        match = self._match
        return match is None or any(match(name) for name in names)

    def _attach_dspy(self, pool: Pool) -> None:
        """Hear the DSPy events of ``pool`` too (evaluation and optimization
        progress, LM fuses), where the installed snakepool has a DSPy monitor."""
        try:
            monitors = importlib.import_module("snakepool.dspy._monitor")
        except ImportError:
            return
        monitor = monitors.monitor(pool)
        monitor.add_listener(self._on_event)
        self._detach.append(lambda: monitor.remove_listener(self._on_event))

    def _on_event(self, event: Event) -> None:
        """(a listener: called by the pool; it never waits)"""
        if self._closed or (self._match is not None and not self._match(event.name)):
            return
        buffer = self._buffer
        if len(buffer) >= self.limit:
            buffer.popleft()
            self.dropped += 1
        buffer.append((time.time(), event))
        wakeup = self._wakeup
        if wakeup is not None:
            self._wakeup = None
            wakeup.set()

    def pending(self) -> int:
        """Events waiting to be read."""
        return len(self._buffer)

    def take_nowait(self) -> tuple[float, Event] | None:
        """The next event held and when it happened, or None if none is held."""
        return self._buffer.popleft() if self._buffer else None

    async def next_stamped(self) -> tuple[float, Event]:
        """The next event and when it happened (``time.time()``)."""
        while not self._buffer:
            if self._closed:
                raise StopAsyncIteration
            self._wakeup = wakeup = anyio.Event()
            await wakeup.wait()
        return self._buffer.popleft()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Event:
        return (await self.next_stamped())[1]

    def close(self) -> None:
        """Stop listening; the iteration ends once the events held are read."""
        if self._closed:
            return
        self._closed = True
        for detach in self._detach:
            detach()
        self._detach.clear()
        if self._wakeup is not None:
            self._wakeup.set()

    async def aclose(self) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Subscription pending={len(self._buffer)} dropped={self.dropped}>"
