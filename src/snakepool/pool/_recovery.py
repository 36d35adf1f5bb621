"""What the pool does about a failure, keyed by ``ErrorCategory``.

The defaults follow the contract's error table; ``Pool(recovery={...})``
overrides any row, e.g. ``{ErrorCategory.APPLICATION: Recovery.RECYCLE}``
for a library that leaves a worker in a bad state after raising.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from types import MappingProxyType

from ..errors import ErrorCategory

__all__ = ["DEFAULT_RECOVERY", "Recovery", "recovery_table"]


class Recovery(enum.StrEnum):
    """One recovery action for the worker a failed call ran on."""

    NONE = "none"  # leave the worker alone
    RECYCLE = "recycle"  # retire it gracefully once its in-flight calls end, start a fresh one
    REPLACE = "replace"  # kill it now (timeouts: after the cancel grace) and start a fresh one
    RETRY = "retry"  # as REPLACE, and retry ``idempotent=True`` calls once on another worker


DEFAULT_RECOVERY: Mapping[ErrorCategory, Recovery] = MappingProxyType(
    {
        ErrorCategory.INITIALIZATION: Recovery.REPLACE,  # restart with backoff
        ErrorCategory.TIMEOUT: Recovery.REPLACE,  # cancel; kill if it does not stop in the grace
        ErrorCategory.COMMUNICATION: Recovery.RETRY,  # replace; idempotent calls retried once
        ErrorCategory.PROTOCOL: Recovery.REPLACE,
        ErrorCategory.RESOURCE: Recovery.RECYCLE,
        ErrorCategory.APPLICATION: Recovery.NONE,
        ErrorCategory.OVERLOAD: Recovery.NONE,
        ErrorCategory.SESSION: Recovery.NONE,
        ErrorCategory.CLOSED: Recovery.NONE,
    }
)


def recovery_table(
    overrides: Mapping[ErrorCategory | str, Recovery | str] | None,
) -> Mapping[ErrorCategory, Recovery]:
    """The defaults with ``overrides`` applied; unknown names are a clear error."""
    table = dict(DEFAULT_RECOVERY)
    for key, value in (overrides or {}).items():
        try:
            category = ErrorCategory(key)
        except ValueError:
            raise ValueError(
                f"recovery: unknown error category {key!r}; one of {', '.join(c.value for c in ErrorCategory)}"
            ) from None
        try:
            action = Recovery(value)
        except ValueError:
            raise ValueError(
                f"recovery[{category.value!r}]: unknown action {value!r}; one of {', '.join(r.value for r in Recovery)}"
            ) from None
        table[category] = action
    return MappingProxyType(table)
