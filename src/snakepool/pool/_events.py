"""Telemetry events and frozen statistics snapshots."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Event", "Listeners", "PoolStatistics", "WorkerStatistics"]

_log = logging.getLogger("snakepool.pool")


@dataclass(frozen=True, slots=True)
class Event:
    """One telemetry event (``worker.started``, ``call.completed``, ...)."""

    name: str
    pool: str
    worker: int | None = None
    data: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class WorkerStatistics:
    """A snapshot of one worker slot."""

    id: int
    pid: int | None
    state: str  # starting | idle | busy | stopping | exited
    inflight: int
    requests: int
    restarts: int
    rss_bytes: int | None
    gpu: int | None = None
    #: Calls this slot finished per second, and their latency percentiles, over
    #: about the last minute (the pool's life until a minute was seen).
    calls_per_s: float = 0.0
    p50_seconds: float | None = None
    p99_seconds: float | None = None
    #: Seconds since this slot's current process was started (None: none runs).
    uptime_seconds: float | None = None
    #: ``backend="ray"``: the Ray node it runs on (its id and address) and the
    #: GPU ids Ray gave it (``CUDA_VISIBLE_DEVICES`` there); None/empty locally.
    node_id: str | None = None
    node_address: str | None = None
    gpu_ids: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class PoolStatistics:
    """A snapshot of one pool; it does not change after it was taken."""

    name: str
    size: int
    queued: int
    sessions: int
    breaker_state: str  # closed | open | half_open
    workers: tuple[WorkerStatistics, ...]
    completed: int
    failed: Mapping[str, int]  # by ErrorCategory value
    closed: bool = False
    enabled: bool = True  # false: no workers to run (e.g. a gpu pool without GPUs)
    disabled_reason: str | None = None
    #: How workers start: "forkserver (template pid ...)" or "spawn (why)".
    start_method: str = "spawn"

    @property
    def failed_total(self) -> int:
        return sum(self.failed.values())

    @property
    def ready_workers(self) -> int:
        return sum(1 for w in self.workers if w.state in ("idle", "busy"))


class Listeners:
    """Calls every registered listener; a listener that raises is logged, not fatal."""

    def __init__(self, pool: str) -> None:
        self.pool = pool
        self._listeners: list[tuple[Callable[[Event], Any], bool]] = []  # (fn, wants calls)
        #: A listener of the per-call events is registered (checked per call, so a
        #: plain attribute): calls report ``call.*`` events only while it is true.
        self.active = False

    def __bool__(self) -> bool:
        return self.active

    def add(self, fn: Callable[[Event], Any], *, calls: bool = True) -> None:
        """``calls=False``: every event but ``call.*`` (calls keep their fast path)."""
        self._listeners.append((fn, calls))
        self.active = self.active or calls

    def remove(self, fn: Callable[[Event], Any]) -> None:
        index = next((i for i, (f, _) in enumerate(self._listeners) if f == fn), None)
        if index is None:
            raise ValueError(f"{fn!r} is not a listener of pool {self.pool!r}")
        del self._listeners[index]
        self.active = any(calls for _, calls in self._listeners)

    def emit(self, name: str, worker: int | None = None, **data: Any) -> None:
        if not self._listeners:
            return
        event = Event(name=name, pool=self.pool, worker=worker, data=data)
        per_call = name.startswith("call.")
        for fn, calls in tuple(self._listeners):
            if per_call and not calls:
                continue
            try:
                fn(event)
            except Exception:
                _log.exception("snakepool listener %r failed on %s", fn, name)
