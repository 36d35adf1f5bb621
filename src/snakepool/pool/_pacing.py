"""Send-ahead pacing: how many calls a busy worker may hold beyond those it runs.

Pure bookkeeping with an injected clock (no I/O, no event loop), like the
circuit breaker: ``WorkerHandle`` feeds it its answers and reads ``ahead``;
the dispatcher asks ``holds_briefly`` before taking calls back.

A worker runs ``concurrency`` calls and may hold ``ahead`` more, which it
starts in arrival order as slots free. ``ahead`` adapts between
``concurrency`` and ``limit`` (the pool's ``send_ahead``): about as many calls
as the worker answers in ``AHEAD_HORIZON``, judged by a moving average of the
time between its answers while it had work waiting.
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["AHEAD_HORIZON", "Pacing"]

#: How many calls a busy worker holds beyond those it runs (sent ahead): about
#: as many as it answers in this many seconds, between ``concurrency`` and the
#: pool's ``send_ahead``. Quick calls get a deep pipeline (no idle gap while
#: the next frame travels); slow ones wait in the pool's queue, where any
#: worker can take them. It is also about the longest a call sent ahead
#: behind quick calls waits to start. Why 2 ms: the answer gap is timed by
#: the host, so a host slowed by load (the usual bottleneck with quick
#: calls) sees every worker answer more slowly. With 1 ms it then held fewer
#: calls and queued the rest in the pool: more host work per call, a slower
#: host. Under one CPU hog, 64 callers: 1 ms queued 39-45% of calls and made
#: 34-45k calls/s; 2 ms queued 2% and made 41-48k; 4 ms 0% and 44-49k.
#: Deeper costs the other way: calls parked behind a call that turns out
#: slow wait for it (p99 of quick calls mixed with 2% slow ones: 1 ms 537,
#: 2 ms 571, 4 ms 604 ms). 2 ms is the knee. (Read at each use: a probe such
#: as ``stress/pacing.py`` may set it on this module.)
AHEAD_HORIZON = 0.002
_FIRST_AHEAD = 4  # (until answers have been timed)
_GAP_WEIGHT = 1 / 16  # of each new gap in the moving average


class Pacing:
    """The send-ahead depth of one worker, from the pace of its answers.

    ``Pacing(concurrency, limit)``: the worker runs ``concurrency`` calls at
    once and may hold up to ``limit`` more (``0``: none, pacing off).
    ``answered(count, pending)`` after answers arrive; ``ahead`` is the
    current depth; ``holds_briefly(pending)`` whether the calls it holds all
    start soon.
    """

    __slots__ = (
        "_answered_at",
        "_clock",
        "_gap",
        "_saturated",
        "ahead",
        "concurrency",
        "latency",
        "limit",
    )

    def __init__(
        self,
        concurrency: int,
        limit: int,
        clock: Callable[[], float] = time.perf_counter,
        latency: float = 0.0,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        self.concurrency = concurrency
        self.limit = limit
        #: Seconds the transport adds to each round trip, added to the horizon
        #: (a worker far away needs more calls in its pipeline to never idle).
        self.latency = latency
        #: Calls the worker may hold beyond the ``concurrency`` it runs.
        self.ahead = min(limit, max(concurrency, _FIRST_AHEAD))
        self._clock = clock
        self._answered_at = 0.0  # (clock) when the last answer arrived
        self._saturated = False  # it had ``concurrency`` calls or more after that answer
        self._gap = 0.0  # moving average of the time between answers while saturated

    @property
    def answer_gap(self) -> float:
        """Seconds between answers while the worker was saturated (moving average)."""
        return self._gap

    def answered(self, count: int, pending: int) -> int:
        """``count`` answers just arrived (read together) and the worker still
        has ``pending`` calls; returns the new ``ahead``.

        Holds about as many calls as the worker answers in ``AHEAD_HORIZON``,
        which covers the round trip to the next frame without parking more
        than needed behind a slow call. The gap between answers counts only
        while the worker had work queued; answers read together share the
        time since the last read.
        """
        limit = self.limit
        if not limit:
            return self.ahead
        now = self._clock()
        if self._saturated:
            gap = self._gap
            gap += ((now - self._answered_at) / count - gap) * min(1.0, count * _GAP_WEIGHT)
            self._gap = gap
            horizon = AHEAD_HORIZON + self.latency
            if gap * limit <= horizon:  # (quick calls: the usual case)
                self.ahead = limit
            else:
                self.ahead = max(self.concurrency, int(horizon / gap))
        self._answered_at = now
        self._saturated = pending >= self.concurrency
        return self.ahead

    def holds_briefly(self, pending: int) -> bool:
        """With ``pending`` calls in the worker, the ones it holds beyond those it
        runs should all start within ``AHEAD_HORIZON``, judging by how quickly
        it answers and how long ago it last did: taking one back would not
        make it start sooner."""
        waiting = pending - self.concurrency
        horizon = AHEAD_HORIZON + self.latency
        stalled = self._clock() - self._answered_at >= horizon
        return not stalled and waiting * self._gap < horizon
