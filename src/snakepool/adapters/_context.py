"""``CallContext``: what a handler knows about the call it is serving."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

__all__ = ["CallContext"]


class CallContext:
    """Passed to a handler that declares a ``ctx`` parameter.

    ``cancelled`` turns true when the host gives up on the call (timeout, the
    caller went away, a stream closed early): long sync handlers should check
    it and return. ``deadline`` is a ``time.monotonic()`` value, or ``None``.
    """

    __slots__ = (
        "_cancel_event",
        "call_id",
        "command",
        "deadline",
        "log",
        "session_id",
        "session_state",
        "worker_id",
    )

    def __init__(
        self,
        *,
        call_id: int,
        command: str,
        worker_id: int,
        session_id: str | None,
        session_state: dict[str, Any],
        deadline: float | None,
        log: logging.Logger,
    ) -> None:
        self.call_id = call_id
        self.command = command
        self.worker_id = worker_id
        self.session_id = session_id
        self.session_state = session_state
        self.deadline = deadline
        self.log = log
        self._cancel_event = threading.Event()

    @property
    def cancelled(self) -> bool:
        return self._cancel_event.is_set()

    def wait_cancelled(self, timeout: float | None = None) -> bool:
        """Block up to ``timeout`` seconds; true if the call was cancelled."""
        return self._cancel_event.wait(timeout)

    @property
    def time_left(self) -> float | None:
        """Seconds until the deadline (never negative), or ``None``."""
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - time.monotonic())

    def cancel(self) -> None:
        """Mark the call cancelled (the worker runtime does this)."""
        self._cancel_event.set()

    def __repr__(self) -> str:
        return (
            f"CallContext(call_id={self.call_id}, command={self.command!r}, "
            f"worker_id={self.worker_id}, session_id={self.session_id!r})"
        )
