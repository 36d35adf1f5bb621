"""What the dashboard shows, gathered once a second for every viewer.

The hub samples each pool's running counts (the calls of the last second,
their rate and latency percentiles, failures by category) into a bounded
history for the charts, keeps the recent events (pool events and DSPy
progress, from a subscription that wants no per-call event, so calls keep
their fast path), and builds the state the page draws. Nothing here runs per
call: viewers get what the hub gathered, however many there are.
"""

from __future__ import annotations

import collections
import dataclasses
import platform
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ...pool import Pool
from ...pool._counters import quantile
from .._logs import WorkerLogs, worker_logs
from .._remote import event_item, plain
from .._stream import Subscription

if TYPE_CHECKING:
    from ...server._server import SocketServer

__all__ = ["Hub"]

#: The events the dashboard lists (every one but the per-call ones).
EVENT_NAMES = ["worker.*", "breaker.*", "session.*", "pool.*", "dspy.*"]
_EVENTS_KEPT = 500
_DSPY_RUNS_KEPT = 50
_CANDIDATES_KEPT = 200


class Hub:
    """The dashboard's data for ``pools`` (see the module's notes)."""

    def __init__(
        self,
        pools: Callable[[], list[Pool]],
        *,
        server: SocketServer | None = None,
        history_seconds: int = 600,
        logs: WorkerLogs | None = None,
    ) -> None:
        self.pools = pools
        self.server = server
        self.logs = logs if logs is not None else worker_logs()
        self.node = platform.node()
        #: pool -> [[time, calls/s, p50 s, p99 s, failures/s], ...] one a second
        self.history: dict[str, collections.deque[list[Any]]] = {}
        self._history_seconds = history_seconds
        self._previous: dict[str, tuple[float, list[Any], int]] = {}  # pool -> (t, hist, failed)
        self.events: collections.deque[dict[str, Any]] = collections.deque(maxlen=_EVENTS_KEPT)
        self.event_seq = 0
        #: (pool, kind, run) -> the latest fields of a DSPy evaluation/optimization
        self.runs: collections.OrderedDict[tuple[str, str, str], dict[str, Any]] = (
            collections.OrderedDict()
        )
        self._subscription: Subscription | None = None
        self._subscribed: set[str] = set()
        self.sampled_at = 0.0

    # --- gathering --------------------------------------------------------------------

    def refresh(self, now: float | None = None) -> bool:
        """Gather, at most once a second; whether it did."""
        now = time.time() if now is None else now
        if now - self.sampled_at < 1.0:
            return False
        self.sampled_at = now
        self._subscribe()
        self._take_events()
        for pool in self.pools():
            self._sample(pool, now)
        return True

    def _subscribe(self) -> None:
        """Listen to the pools not heard yet (a supervisor's pools are all known at once)."""
        pools = self.pools()
        names = {pool.name for pool in pools}
        if names == self._subscribed:
            return
        if self._subscription is not None:
            self._take_events()
            self._subscription.close()
        self._subscription = Subscription(pools, names=EVENT_NAMES, buffer=_EVENTS_KEPT)
        self._subscribed = names

    def _take_events(self) -> None:
        subscription = self._subscription
        if subscription is None:
            return
        while (taken := subscription.take_nowait()) is not None:
            stamp, event = taken
            self.event_seq += 1
            item = event_item(event, stamp, subscription.dropped)
            item["seq"] = self.event_seq
            self.events.append(item)
            if event.name.startswith("dspy.") and not event.name.startswith("dspy.fuse."):
                self._track_run(item)

    def _track_run(self, item: dict[str, Any]) -> None:
        """A DSPy evaluation or optimization: its latest fields, and each candidate's score."""
        data = item["data"] if isinstance(item["data"], dict) else {}
        kind = item["name"].split(".")[1] if item["name"].count(".") >= 1 else item["name"]
        run = str(data.get("run") or data.get("program_id") or data.get("id") or "")
        key = (item["pool"], kind, run)
        entry = self.runs.pop(key, None) or {
            "pool": item["pool"],
            "kind": kind,
            "run": run,
            "started": item["time"],
            "events": 0,
            "scores": [],
        }
        entry["events"] += 1
        entry["updated"] = item["time"]
        entry["event"] = item["name"]
        entry["fields"] = {**entry.get("fields", {}), **data}
        score = data.get("score")
        if item["name"].endswith(".candidate") and isinstance(score, int | float):
            entry["scores"] = [*entry["scores"], score][-_CANDIDATES_KEPT:]
        self.runs[key] = entry
        while len(self.runs) > _DSPY_RUNS_KEPT:
            self.runs.popitem(last=False)

    def _sample(self, pool: Pool, now: float) -> None:
        counts, _ = pool._counts()
        total: list[Any] | None = None
        for cell in counts.by_command().values():
            total = (
                list(cell) if total is None else [a + b for a, b in zip(total, cell, strict=True)]
            )
        failed = sum(counts.failed.values())
        history = self.history.get(pool.name)
        if history is None:
            history = self.history[pool.name] = collections.deque(maxlen=self._history_seconds)
        previous = self._previous.get(pool.name)
        self._previous[pool.name] = (now, total or [], failed)
        if previous is None:
            return
        then, before, failed_before = previous
        seconds = max(now - then, 1e-6)
        if total is None:
            delta: list[Any] = []
        elif before:
            delta = [a - b for a, b in zip(total[:-1], before[:-1], strict=True)]
        else:
            delta = total[:-1]
        calls = sum(delta)
        history.append(
            [
                round(now, 3),
                calls / seconds,
                quantile(0.5, delta) if calls else None,
                quantile(0.99, delta) if calls else None,
                (failed - failed_before) / seconds,
            ]
        )

    # --- what the page gets -----------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """Everything the page shows but the history and the logs."""
        pools = []
        for pool in self.pools():
            stats = pool.statistics()
            counts, exits = pool._counts()
            row = plain(dataclasses.asdict(stats))
            row["node"] = self.node
            row["failed_total"] = stats.failed_total
            row["exits"] = {f"{kind}:{cause}": n for (kind, cause), n in exits.counts.items()}
            row["commands"] = _commands(counts)
            history = self.history.get(pool.name)
            row["last"] = history[-1] if history else None
            pools.append(row)
        state: dict[str, Any] = {
            "time": time.time(),
            "node": self.node,
            "pools": pools,
            "runs": list(reversed(self.runs.values())),
            "event_seq": self.event_seq,
        }
        if self.server is not None:
            state["server"] = plain(dataclasses.asdict(self.server.statistics()))
        return state

    def events_after(self, seq: int) -> list[dict[str, Any]]:
        return [event for event in self.events if event["seq"] > seq]

    def history_of(self) -> dict[str, list[list[Any]]]:
        return {name: list(points) for name, points in self.history.items()}


def _commands(counts: Any) -> list[dict[str, Any]]:
    """Calls per command: total, failures by category, mean latency."""
    failed: dict[str, dict[str, int]] = {}
    for (command, category), n in counts.failed.items():
        failed.setdefault(command, {})[category] = n
    rows = []
    for command, cell in sorted(counts.by_command().items()):
        calls = sum(cell[:-1])
        rows.append(
            {
                "command": command,
                "calls": calls,
                "failed": failed.get(command, {}),
                "mean": cell[-1] / calls if calls else None,
                "p50": quantile(0.5, cell[:-1]),
                "p99": quantile(0.99, cell[:-1]),
            }
        )
    return rows
