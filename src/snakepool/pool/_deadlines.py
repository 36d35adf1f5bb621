"""Call deadlines in coarse buckets: one event-loop timer per bucket, not per call.

A ``loop.call_later`` per call costs a timer handle, a heap push and a
cancellation, on every call, for a deadline that almost never fires. Here a
call joins the set of its deadline's bucket (``RESOLUTION`` seconds wide,
rounded *up*, so a deadline is never early and at most ``RESOLUTION`` late)
and leaves it when it ends; only the first call of a bucket arms a timer.
With thousands of calls per second that is one timer per bucket instead of
one per call.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from ._calls import PendingCall

__all__ = ["RESOLUTION", "Deadlines"]

#: Bucket width in seconds: how late a deadline may fire at most.
RESOLUTION = 0.01
_PER_SECOND = round(1 / RESOLUTION)


class Deadlines:
    """Per-pool deadlines of calls waiting on the asyncio fast path."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, expire: Callable[[PendingCall], None]
    ) -> None:
        self._loop = loop
        self._expire = expire
        self._buckets: dict[int, set[PendingCall]] = {}

    def add(self, call: PendingCall, seconds: float) -> int:
        """Expire ``call`` in ``seconds`` (up to ``RESOLUTION`` later); returns its bucket."""
        key = int((self._loop.time() + seconds) * _PER_SECOND) + 1  # rounded up
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = set()
            self._loop.call_at(key / _PER_SECOND, self._fire, key)
        bucket.add(call)
        return key

    @staticmethod
    def due_at(key: int) -> float:
        """The event-loop time at which bucket ``key`` expires its calls."""
        return key / _PER_SECOND

    def remove(self, call: PendingCall, key: int) -> None:
        """``call`` ended (or its caller left): its deadline no longer matters."""
        bucket = self._buckets.get(key)
        if bucket is not None:
            bucket.discard(call)

    def _fire(self, key: int) -> None:
        for call in self._buckets.pop(key, ()):
            self._expire(call)

    def __len__(self) -> int:
        """Calls with a pending deadline (for tests: nothing is left behind)."""
        return sum(len(bucket) for bucket in self._buckets.values())
