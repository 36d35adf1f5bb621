"""Call deadlines in coarse buckets: one event-loop timer per bucket, not per call.

A ``loop.call_later`` per call costs a timer handle, a heap push and a
cancellation, on every call, for a deadline that almost never fires. Here a
call joins the set of its deadline's bucket and leaves it when it ends; only
the first call of a bucket arms a timer. A bucket is ``RESOLUTION`` seconds
wide, or 0.1% of the timeout for timeouts over 10 s, and deadlines round *up*
to its end: never early, at most that much late. An emptied bucket is dropped
(its timer, if it fires, finds nothing) unless it is the newest one, which
the next calls are likely to reuse; so what stays alive is bounded by the
number of buckets a timeout spans (about 1,000), not by the number of calls.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from ._backend import Loop
from ._calls import PendingCall

__all__ = ["RESOLUTION", "Deadlines"]

#: The narrowest bucket, in seconds: how late a short deadline may fire at most.
RESOLUTION = 0.01
#: Wider buckets for long timeouts: a deadline may be this fraction of its timeout late.
_RELATIVE = 0.001
_WIDER_FROM = RESOLUTION / _RELATIVE  # (timeouts up to this get RESOLUTION)


class Deadlines:
    """Per-pool deadlines of the calls in flight (on any event loop: see ``Loop``)."""

    def __init__(self, loop: Loop, expire: Callable[[PendingCall], None]) -> None:
        self._loop = loop
        self._time = loop.time
        self._expire = expire
        self._buckets: dict[float, set[PendingCall]] = {}  # due time -> its calls
        self._armed: set[float] = set()  # due times with a timer set
        self._newest = 0.0  # the bucket new calls join (kept while empty)

    def add(self, call: PendingCall, seconds: float) -> float:
        """Expire ``call`` in ``seconds`` (a little later, see above); returns its due time."""
        width = RESOLUTION if seconds <= _WIDER_FROM else seconds * _RELATIVE
        due = (int((self._time() + seconds) / width) + 1) * width  # rounded up
        bucket = self._buckets.get(due)
        if bucket is None:
            bucket = self._buckets[due] = set()
            newest, self._newest = self._newest, due
            if not self._buckets.get(newest, True):
                del self._buckets[newest]  # emptied while it was the newest
            if due not in self._armed:
                self._armed.add(due)
                self._loop.call_at(due, functools.partial(self._fire, due))
        bucket.add(call)
        return due

    def remove(self, call: PendingCall, due: float) -> None:
        """``call`` ended (or its caller left): its deadline no longer matters."""
        bucket = self._buckets.get(due)
        if bucket is not None:
            bucket.discard(call)
            if not bucket and due != self._newest:
                del self._buckets[due]  # (a set keeps its size once grown: drop it)

    def _fire(self, due: float) -> None:
        self._armed.discard(due)
        for call in self._buckets.pop(due, ()):
            self._expire(call)

    def __len__(self) -> int:
        """Calls with a pending deadline (for tests: nothing is left behind)."""
        return sum(len(bucket) for bucket in self._buckets.values())
