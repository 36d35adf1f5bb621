"""DSPy events on the host: LM fuses (reported by the workers), evaluation and optimization.

``monitor(pool)`` registers the host tool the workers report to
(:data:`~snakepool.dspy.EVENT_TOOL`) and keeps the last state of every fuse
it heard of. Listeners get ``snakepool.Event`` objects, like the pool's own:

- ``dspy.fuse.opened``, ``dspy.fuse.half_open``, ``dspy.fuse.closed``
  (``worker``: the worker's id; ``data``: model, api_base, state,
  consecutive_failures, threshold, reset_timeout, retry_in, last_error, pid),
- ``dspy.evaluate.progress`` (``data``: program_id, done, failed, score, elapsed, total),
- ``dspy.optimize.candidate`` (``data``: program_id, candidate, score,
  best_score, instructions).

The helpers (``configure_lm``, ``Program.create``...) attach a monitor to the
pool they are given, so fuse changes are known from the first call on.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from typing import Any

from . import EVENT_TOOL

__all__ = ["Monitor", "attach", "emit", "monitor"]

_log = logging.getLogger("snakepool.dspy")
_MONITORS: weakref.WeakKeyDictionary[Any, Monitor] = weakref.WeakKeyDictionary()


class Monitor:
    """The DSPy events of one pool, and the fuses its workers reported."""

    def __init__(self, pool: Any) -> None:
        self.pool = str(getattr(pool, "name", "default"))
        self._listeners: list[Callable[[Any], Any]] = []
        self._fuses: dict[tuple[Any, str, str | None], dict[str, Any]] = {}
        pool.register_tool(EVENT_TOOL, self._from_worker)

    def add_listener(self, fn: Callable[[Any], Any]) -> None:
        """Call ``fn(event)`` (a ``snakepool.Event``) for every DSPy event of this pool."""
        self._listeners.append(fn)

    def remove_listener(self, fn: Callable[[Any], Any]) -> None:
        self._listeners.remove(fn)

    def fuses(self) -> list[dict[str, Any]]:
        """The last reported state of each fuse, per worker and endpoint (``worker`` added).

        A fuse that never changed state was never reported: it is closed.
        """
        return [dict(state) for state in self._fuses.values()]

    def emit(self, name: str, worker: int | None, data: dict[str, Any]) -> None:
        from ..pool import Event

        if name.startswith("dspy.fuse."):
            key = (worker, str(data.get("model")), data.get("api_base"))
            self._fuses[key] = {**data, "worker": worker}
        event = Event(name=name, pool=self.pool, worker=worker, data=data)
        for fn in tuple(self._listeners):
            try:
                fn(event)
            except Exception:
                _log.exception("snakepool.dspy listener %r failed on %s", fn, name)

    async def _from_worker(self, name: str, worker: int | None, data: dict[str, Any]) -> None:
        self.emit(name, worker, data)


def monitor(pool: Any) -> Monitor:
    """The DSPy monitor of ``pool`` (made, and its tool registered, on first use)."""
    found = _MONITORS.get(pool)
    if found is None:
        found = _MONITORS[pool] = Monitor(pool)
    return found


def _pool_of(owner: Any) -> Any:
    """The pool behind a session (or the pool itself); None for anything else."""
    pool = getattr(owner, "_pool", owner)  # (a Session keeps its pool there)
    return pool if callable(getattr(pool, "register_tool", None)) else None


def attach(owner: Any) -> None:
    """Make sure the pool of ``owner`` (a session or a pool) has its monitor."""
    pool = _pool_of(owner)
    if pool is not None:
        monitor(pool)


def emit(owner: Any, name: str, data: dict[str, Any]) -> None:
    """Tell the monitor of ``owner``'s pool, if it has one."""
    pool = _pool_of(owner)
    found = _MONITORS.get(pool) if pool is not None else None
    if found is not None:
        found.emit(name, None, data)
