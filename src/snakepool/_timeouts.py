"""The rule for a call's time limit (light: the socket client checks it without
loading the pool, so that its error names ``timeout``, not a wire field)."""

from __future__ import annotations

import math

__all__ = ["check_timeout"]


def check_timeout(timeout: object) -> float | None:
    """``timeout`` in seconds, checked: a number > 0, or None. None, and an
    infinite one, mean no limit (returned as None: an infinite deadline could
    not be placed on the deadlines' clock)."""
    if timeout is None:
        return None
    if not isinstance(timeout, int | float) or isinstance(timeout, bool) or not timeout > 0:
        raise ValueError(f"timeout must be a number > 0 or None, got {timeout!r}")
    return None if timeout == math.inf else float(timeout)
