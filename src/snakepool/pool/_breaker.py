"""The pool's circuit breaker: a synchronous state machine with an injectable clock.

Closed: calls flow; consecutive infrastructure failures are counted and any
success resets the count. ``threshold`` failures in a row open it. Open: calls
fail fast with ``CircuitOpen`` until ``reset_timeout`` has passed; then one
probe call is let through (half-open). The probe's success closes the breaker,
its failure opens it again for another ``reset_timeout``.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable

from ..errors import INFRASTRUCTURE_CATEGORIES, CircuitOpen, ErrorCategory

__all__ = ["BreakerState", "CircuitBreaker"]


class BreakerState(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Counts infrastructure failures; decides whether a call may proceed."""

    def __init__(
        self,
        *,
        threshold: int,
        reset_timeout: float,
        pool: str = "default",
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[BreakerState, BreakerState, int], None] | None = None,
    ) -> None:
        self.threshold = threshold
        self.reset_timeout = reset_timeout
        self.pool = pool
        self._clock = clock
        self._on_change = on_change
        self._state = BreakerState.CLOSED
        #: The breaker is closed (a plain attribute: the pool checks it per call).
        self.closed = True
        #: Closed with no failure counted: a success changes nothing (per call, too).
        self.steady = True
        self._failures = 0
        self._opened_at = 0.0
        self._probe_out = False

    @property
    def state(self) -> BreakerState:
        """The state now (an open breaker whose timeout passed reads half-open)."""
        if (
            self._state is BreakerState.OPEN
            and self._clock() - self._opened_at >= self.reset_timeout
        ):
            return BreakerState.HALF_OPEN
        return self._state

    @property
    def consecutive_failures(self) -> int:
        return self._failures

    def admit(self) -> bool:
        """Take a call in; ``CircuitOpen`` if it must fail fast.

        Returns true when the call is the half-open probe: report its outcome
        with ``success``/``failure`` (or ``release_probe`` if it never ran).
        """
        state = self.state
        if state is BreakerState.CLOSED:
            return False
        if state is BreakerState.HALF_OPEN and not self._probe_out:
            self._set(BreakerState.HALF_OPEN)
            self._probe_out = True
            return True
        wait = max(0.0, self.reset_timeout - (self._clock() - self._opened_at))
        detail = "a probe call is in flight" if self._probe_out else f"retry in {wait:.1f}s"
        raise CircuitOpen(
            f"pool {self.pool!r}: circuit breaker is open after {self._failures} consecutive "
            f"infrastructure failures; failing fast ({detail})"
        )

    def success(self, *, probe: bool = False) -> None:
        self._failures = 0
        if self.closed and not probe:  # the usual case
            self.steady = True
            return
        if probe:
            self._probe_out = False
        if self._state is not BreakerState.CLOSED and (probe or not self._probe_out):
            self._set(BreakerState.CLOSED)

    def failure(self, category: ErrorCategory, *, probe: bool = False) -> None:
        """Count a failure of ``category``; application errors never count."""
        if category not in INFRASTRUCTURE_CATEGORIES:
            if probe:  # the probe reached a working worker: the pool is fine
                self.success(probe=True)
            return
        self._failures += 1
        self.steady = False
        if probe:
            self._probe_out = False
            self._open()
        elif self._state is BreakerState.CLOSED and self._failures >= self.threshold:
            self._open()

    def release_probe(self) -> None:
        """The probe ended without an outcome (cancelled): let another one through."""
        self._probe_out = False

    def _open(self) -> None:
        self._opened_at = self._clock()
        self._set(BreakerState.OPEN)

    def _set(self, new: BreakerState) -> None:
        old, self._state = self._state, new
        self.closed = new is BreakerState.CLOSED
        self.steady = self.closed and not self._failures
        if old is not new and self._on_change is not None:
            self._on_change(old, new, self._failures)
