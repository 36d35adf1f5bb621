"""A pool's running counts, for metrics and ``snakepool status``: calls by command,
worker and outcome with their latencies, and worker exits by cause.

Counting is on every call's path, so it is a few list and dict updates and
nothing else (no lock: the pool's event loop is the only writer). Readers
(``Pool.statistics()``, a Prometheus scrape, the dashboard) add them up when
they look. Latencies go into fixed buckets (Prometheus' ``le`` bounds), so a
call costs one ``bisect`` whatever its duration, and percentiles are
estimated from the buckets the way ``histogram_quantile`` does.
"""

from __future__ import annotations

import collections
import time
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "BUCKETS",
    "CallCounts",
    "ExitCounts",
    "WorkerRecent",
    "WorkerWindow",
    "exit_cause",
    "quantile",
]

#: Upper bounds (seconds) of the latency buckets; a last one, +Inf, is implied.
BUCKETS: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
)  # fmt: skip
_N = len(BUCKETS) + 1  # (the +Inf bucket)
#: A cell: a count per bucket, then the sum of the durations.
_SUM = _N
#: The slot of calls that never reached a worker (queued until their deadline, refused).
NO_WORKER = -1
#: Distinct command names counted apart; calls of any other are counted as
#: ``OTHER`` (a client sending made-up names must not grow the counts forever).
MAX_COMMANDS = 500
OTHER = "(other)"
#: How far back ``snakepool status`` looks for calls/s and percentiles.
WINDOW_SECONDS = 60.0
_perf_counter = time.perf_counter


class CallCounts:
    """Calls of one pool: per (command, worker slot), a latency histogram; per
    (command, outcome category), the failures. Successes are the rest."""

    __slots__ = ("_by_slot", "_commands", "cells", "failed")

    def __init__(self) -> None:
        #: (command, slot) -> [count per bucket ..., sum of seconds]
        self.cells: dict[tuple[str, int], list[Any]] = {}
        #: (command, category) -> failed calls
        self.failed: collections.Counter[tuple[str, str]] = collections.Counter()
        self._commands: set[str] = set()
        #: slot -> command -> its cell (the cells again, looked up per call without a tuple)
        self._by_slot: dict[int, dict[str, list[Any]]] = {}

    def ok(self, command: str, slot: int, started: float) -> None:
        """A call that succeeded (``started``: its ``time.perf_counter()``)."""
        seconds = _perf_counter() - started
        try:
            cell = self._by_slot[slot][command]
        except KeyError:
            cell = self._cell(command, slot)
        cell[bisect_left(BUCKETS, seconds)] += 1
        cell[_SUM] += seconds

    def _cell(self, command: str, slot: int) -> list[Any]:
        counted = self._counted_as(command)
        cell = self.cells.get((counted, slot))
        if cell is None:
            cell = self.cells[(counted, slot)] = [0] * _N + [0.0]
        if counted == command:  # (names counted as OTHER are not kept: they are unbounded)
            self._by_slot.setdefault(slot, {})[command] = cell
        return cell

    def _counted_as(self, command: str) -> str:
        if command not in self._commands:
            if len(self._commands) >= MAX_COMMANDS:
                return OTHER
            self._commands.add(command)
        return command

    def failure(self, command: str, slot: int, started: float | None, category: str) -> None:
        """A call that failed (``started`` None: refused before it began, no duration)."""
        self.failed[(self._counted_as(command), category)] += 1
        self.ok(command, slot, _perf_counter() if started is None else started)

    # --- reading (off the call path) ---------------------------------------------------

    def by_command(self) -> dict[str, list[Any]]:
        """command -> [count per bucket ..., sum of seconds], over every worker."""
        return _summed((command, cell) for (command, _), cell in tuple(self.cells.items()))

    def by_slot(self) -> dict[int, list[Any]]:
        """worker slot -> [count per bucket ..., sum of seconds], over every command."""
        return _summed(
            (slot, cell) for (_, slot), cell in tuple(self.cells.items()) if slot != NO_WORKER
        )

    def outcomes(self) -> Iterator[tuple[str, str, int]]:
        """(command, outcome, calls): ``ok`` or an error category."""
        failed = self.failed.copy()
        per_command: collections.Counter[str] = collections.Counter()
        for (command, category), count in failed.items():
            per_command[command] += count
            yield command, category, count
        for command, cell in self.by_command().items():
            yield command, "ok", sum(cell[:_N]) - per_command[command]


def _summed(cells: Iterable[tuple[Any, list[Any]]]) -> dict[Any, list[Any]]:
    total: dict[Any, list[Any]] = {}
    for key, cell in cells:
        into = total.get(key)
        if into is None:
            total[key] = list(cell)
        else:
            for i, value in enumerate(cell):
                into[i] += value
    return total


def quantile(q: float, buckets: Sequence[float]) -> float | None:
    """The ``q`` quantile (0..1) of a histogram's per-bucket counts, interpolated
    within its bucket; None without calls. (+Inf: the last finite bound.)"""
    total = sum(buckets[:_N])
    if total <= 0:
        return None
    rank = q * total
    seen = 0.0
    for i, count in enumerate(buckets[:_N]):
        if count and seen + count >= rank:
            if i == len(BUCKETS):
                return BUCKETS[-1]
            low = BUCKETS[i - 1] if i else 0.0
            return low + (BUCKETS[i] - low) * ((rank - seen) / count)
        seen += count
    return BUCKETS[-1]


@dataclass(frozen=True, slots=True)
class WorkerRecent:
    """One worker slot's calls over the last ``seconds``."""

    calls_per_s: float
    p50: float | None
    p99: float | None


class WorkerWindow:
    """Per-slot rates and percentiles over about the last minute.

    Each look (``recent``) keeps a mark of the counts, at most one a second,
    for a minute; the window runs from the oldest mark to now. Until there is
    a mark a second old, the window is the pool's whole life.
    """

    def __init__(self, counts: CallCounts, now: float | None = None) -> None:
        self.counts = counts
        self.born = time.monotonic() if now is None else now
        self._marks: collections.deque[tuple[float, dict[int, list[Any]]]] = collections.deque()

    def recent(self, now: float | None = None) -> dict[int, WorkerRecent]:
        now = time.monotonic() if now is None else now
        current = self.counts.by_slot()
        marks = self._marks
        while len(marks) > 1 and now - marks[1][0] >= WINDOW_SECONDS:
            marks.popleft()
        if marks and now - marks[0][0] >= 1.0:
            since, before = marks[0]
        else:
            since, before = self.born, {}
        if not marks or now - marks[-1][0] >= 1.0:
            marks.append((now, current))
        seconds = max(now - since, 1e-9)
        recent: dict[int, WorkerRecent] = {}
        for slot, cell in current.items():
            old = before.get(slot)
            delta = (
                cell[:_N]
                if old is None
                else [a - b for a, b in zip(cell[:_N], old[:_N], strict=True)]
            )
            calls = sum(delta)
            recent[slot] = WorkerRecent(
                calls_per_s=calls / seconds, p50=quantile(0.5, delta), p99=quantile(0.99, delta)
            )
        return recent


class ExitCounts:
    """Worker exits of one pool by (kind, cause): ``recycled`` (``max_requests``,
    ``worker_ttl``, ``recovery``) or ``restarted`` (``limit``, ``crashed``)."""

    __slots__ = ("counts",)

    def __init__(self) -> None:
        self.counts: collections.Counter[tuple[str, str]] = collections.Counter()

    def add(self, worker: Any) -> None:
        found = exit_cause(worker)
        if found is not None:
            self.counts[found] += 1


def exit_cause(worker: Any) -> tuple[str, str] | None:
    """Why ``worker`` (a handle that exited) went, from its facts (never its
    message): None for a worker the pool stopped (closing)."""
    if worker.retiring is not None:
        limit = worker.request_limit
        if limit is not None and worker.requests >= limit:
            return ("recycled", "max_requests")
        ttl = worker.ttl_limit
        if ttl is not None and worker.age >= ttl:
            return ("recycled", "worker_ttl")
        return ("recycled", "recovery")
    info = worker.exit_info
    if info is not None and info.planned:
        return None
    if worker.limit_crossed is not None:
        return ("restarted", "limit")
    return ("restarted", "crashed")
