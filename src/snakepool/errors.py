"""Every exception snakepool raises, grouped by :class:`ErrorCategory`.

The category decides the default recovery (see the table in the design
contract): infrastructure categories (initialization, timeout, communication,
protocol) count toward the pool's circuit breaker, application errors never do.

Like trio, we keep *closed* (you closed the pool: :class:`PoolClosed`) apart
from a worker that *broke* (something else killed it: :class:`WorkerCrashed`).
A broken worker never breaks the pool.
"""

from __future__ import annotations

import enum
import signal

__all__ = [
    "INFRASTRUCTURE_CATEGORIES",
    "CallTimeout",
    "CircuitOpen",
    "ErrorCategory",
    "InvalidSessionId",
    "PoolClosed",
    "PoolDisabled",
    "PoolOverloaded",
    "ProtocolError",
    "RemoteError",
    "ResourceExceeded",
    "SessionExpired",
    "SessionNotFound",
    "SessionWorkerUnavailable",
    "SnakepoolError",
    "UnknownCommand",
    "WorkerCrashed",
    "WorkerStartError",
    "describe_exit_code",
]


class ErrorCategory(enum.StrEnum):
    """What kind of failure an error is; it selects the recovery policy."""

    INITIALIZATION = "initialization"
    TIMEOUT = "timeout"
    COMMUNICATION = "communication"
    PROTOCOL = "protocol"
    RESOURCE = "resource"
    APPLICATION = "application"
    OVERLOAD = "overload"
    SESSION = "session"
    CLOSED = "closed"


#: Categories that count toward a pool's circuit breaker.
INFRASTRUCTURE_CATEGORIES = frozenset(
    {
        ErrorCategory.INITIALIZATION,
        ErrorCategory.TIMEOUT,
        ErrorCategory.COMMUNICATION,
        ErrorCategory.PROTOCOL,
    }
)


class SnakepoolError(Exception):
    """Base class of every snakepool error; ``.category`` says which kind."""

    category: ErrorCategory = ErrorCategory.APPLICATION


class WorkerStartError(SnakepoolError):
    """A worker could not start (import, ``setup`` or handshake failed)."""

    category = ErrorCategory.INITIALIZATION

    def __init__(self, message: str, *, stderr_tail: str = "") -> None:
        if stderr_tail:
            message = f"{message}\n--- worker stderr (last lines) ---\n{stderr_tail}"
        super().__init__(message)
        self.stderr_tail = stderr_tail


class CallTimeout(SnakepoolError, TimeoutError):
    """The call did not finish within its timeout."""

    category = ErrorCategory.TIMEOUT


class WorkerCrashed(SnakepoolError):
    """The worker running the call died; only its own calls fail."""

    category = ErrorCategory.COMMUNICATION

    def __init__(
        self,
        message: str,
        *,
        exit_code: int | None = None,
        stderr_tail: str = "",
    ) -> None:
        self.exit_code = exit_code
        self.signal_name = _signal_name(exit_code)
        self.stderr_tail = stderr_tail
        if exit_code is not None:
            message = f"{message} (exit {describe_exit_code(exit_code)})"
        if stderr_tail:
            message = f"{message}\n--- worker stderr (last lines) ---\n{stderr_tail}"
        super().__init__(message)


class ProtocolError(SnakepoolError):
    """A frame broke the wire protocol (garbage, truncated, oversized)."""

    category = ErrorCategory.PROTOCOL


class ResourceExceeded(SnakepoolError):
    """The worker went over a resource limit (``max_memory_mb``)."""

    category = ErrorCategory.RESOURCE


class RemoteError(SnakepoolError):
    """The handler raised in the worker; the worker itself is fine."""

    category = ErrorCategory.APPLICATION

    def __init__(self, remote_type: str, remote_message: str, remote_traceback: str = "") -> None:
        super().__init__(f"{remote_type}: {remote_message}")
        self.remote_type = remote_type
        self.remote_message = remote_message
        self.remote_traceback = remote_traceback

    def __str__(self) -> str:
        text = f"{self.remote_type}: {self.remote_message}"
        if self.remote_traceback:
            text = f"{text}\n--- remote traceback ---\n{self.remote_traceback.rstrip()}"
        return text


class UnknownCommand(RemoteError):
    """The worker's adapter has no command of that name."""


class PoolOverloaded(SnakepoolError):
    """The pool's queue is full: the call was refused, nothing was queued."""

    category = ErrorCategory.OVERLOAD


class CircuitOpen(SnakepoolError):
    """The pool's circuit breaker is open: failing fast."""

    category = ErrorCategory.OVERLOAD


class SessionNotFound(SnakepoolError, KeyError):
    """No session has that id."""

    category = ErrorCategory.SESSION

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class SessionExpired(SnakepoolError):
    """The session outlived its TTL (or was closed)."""

    category = ErrorCategory.SESSION


class InvalidSessionId(SnakepoolError, ValueError):
    """A session id breaks the rule: 1 to 128 of ``A-Z a-z 0-9 . _ : -``, not starting with ``.``."""

    category = ErrorCategory.SESSION


class SessionWorkerUnavailable(SnakepoolError):
    """Strict affinity: the session's worker is busy or gone."""

    category = ErrorCategory.SESSION


class PoolClosed(SnakepoolError):
    """The pool was closed (by you); no call is accepted any more."""

    category = ErrorCategory.CLOSED


class PoolDisabled(PoolClosed):
    """The pool has no workers to run (a ``gpu`` pool on a machine without GPUs)."""


def _signal_name(exit_code: int | None) -> str | None:
    if exit_code is None or exit_code >= 0:
        return None
    try:
        return signal.Signals(-exit_code).name
    except ValueError:
        return None


def describe_exit_code(exit_code: int) -> str:
    """``-11`` -> ``"SIGSEGV(-11)"``; ``3`` -> ``"code 3"`` (as loky reports them)."""
    name = _signal_name(exit_code)
    return f"{name}({exit_code})" if name else f"code {exit_code}"
