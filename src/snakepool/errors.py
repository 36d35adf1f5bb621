"""Every exception snakepool raises, grouped by :class:`ErrorCategory`.

The category decides the default recovery (see the table in the design
contract): infrastructure categories (initialization, timeout, communication,
protocol) count toward the pool's circuit breaker, application errors never do.

Like trio, we keep *closed* (you closed the pool: :class:`PoolClosed`) apart
from a worker that *broke* (something else killed it: :class:`WorkerCrashed`).
A broken worker never breaks the pool.
"""

from __future__ import annotations

import builtins
import enum
import signal
import sys
from collections.abc import Callable
from typing import Any, Self, cast

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
    """The handler raised in the worker; the worker itself is fine.

    For a handler's built-in exception (``ValueError``, ``KeyError``,
    ``FileNotFoundError``, ...) or one whose class the host has imported
    (its ``module.qualname`` travels on the wire), the error is *also* an
    instance of that class, like Ray's task errors: ``except ValueError``
    catches a handler's ``ValueError``. Its class is then
    ``RemoteError_<Type>`` (``UnknownCommand_<Type>``), made once and cached,
    deriving from this class first (so ``category`` stays ``application``)
    and from the original type; that type's ``__init__`` never runs, and a
    type that cannot be combined so (an incompatible layout, not
    subclassable) gives a plain ``RemoteError``. Only ``Exception`` types
    count, never snakepool's own nor ``StopIteration``/``StopAsyncIteration``,
    and the host imports nothing for it: a class from a module it has not
    imported gives a plain ``RemoteError`` too.
    """

    category = ErrorCategory.APPLICATION

    def __new__(cls, remote_type: str, *args: Any, **kwargs: Any) -> Self:
        if (cls is RemoteError or cls is UnknownCommand) and type(remote_type) is str:
            made = _remote_subclass(cls, remote_type)
            if made is not None:
                sub, maker = made
                try:
                    instance: Self = maker(sub)
                    return instance
                except Exception:  # an odd __new__: a plain one will do
                    pass
        plain: Self = super().__new__(cls)
        return plain

    def __init__(self, remote_type: str, remote_message: str, remote_traceback: str = "") -> None:
        # (BaseException's own __init__: the original type's must not run, its
        # signature may be anything, e.g. UnicodeDecodeError's five arguments)
        BaseException.__init__(self, f"{remote_type}: {remote_message}")
        self.remote_type = remote_type
        self.remote_message = remote_message
        self.remote_traceback = remote_traceback

    def __str__(self) -> str:
        text = f"{self.remote_type}: {self.remote_message}"
        if self.remote_traceback:
            text = f"{text}\n--- remote traceback ---\n{self.remote_traceback.rstrip()}"
        return text

    def __repr__(self) -> str:
        return BaseException.__repr__(self)  # (not the original type's: its fields are unset)

    def __reduce__(self) -> str | tuple[Any, ...]:
        cls = type(self).__dict__.get("_remote_base", type(self))
        if cls is RemoteError or cls is UnknownCommand:
            # Rebuilt by calling RemoteError(...) again, which makes (or finds)
            # the combined class on the other side: it is not a module attribute.
            state = {
                key: value
                for key, value in self.__dict__.items()
                if key not in ("remote_type", "remote_message", "remote_traceback")
            }
            args = (self.remote_type, self.remote_message, self.remote_traceback)
            return (cls, args, state or None)
        return super().__reduce__()


class UnknownCommand(RemoteError):
    """The worker's adapter has no command of that name."""


#: (base, original type) -> (combined class, how to make an instance), or None.
_COMBINED: dict[tuple[type, type], tuple[type, Callable[[type], Any]] | None] = {}


def _remote_subclass(
    base: type[RemoteError], remote_type: str
) -> tuple[type, Callable[[type], Any]] | None:
    """The cached ``<base>_<Type>`` class for ``remote_type``, or None (plain ``base``)."""
    original = _resolve_type(remote_type)
    if original is None:
        return None
    key = (base, original)
    try:
        return _COMBINED[key]
    except KeyError:
        pass
    made: tuple[type, Callable[[type], Any]] | None
    try:
        name = f"{base.__name__}_{original.__name__}"
        sub = type(name, (base, original), {"_remote_base": base, "__module__": __name__})
        sub.__qualname__ = name
        # Made by the nearest built-in base's __new__ (OSError's for the OSError
        # family: BaseException.__new__ refuses those), never the original's own.
        solid = next(k for k in original.__mro__ if k.__module__ == "builtins")
        maker = cast(Callable[[type], Any], solid.__new__)
        maker(sub)  # (try once: a layout it refuses shows here)
        made = (sub, maker)
    except Exception:  # not subclassable, incompatible layout, metaclass conflict, ...
        made = None
    return _COMBINED.setdefault(key, made)


def _resolve_type(remote_type: str) -> type[Exception] | None:
    """The exception class ``remote_type`` names (``"ValueError"``, ``"pkg.mod.Error"``),
    if it is a built-in or its module is already imported here; never imports."""
    obj: object
    if "." not in remote_type:
        obj = getattr(builtins, remote_type, None)
    else:
        parts = remote_type.split(".")
        obj = None
        for cut in range(len(parts) - 1, 0, -1):  # the longest module prefix first
            module = sys.modules.get(".".join(parts[:cut]))
            if module is None:
                continue
            obj = module
            for part in parts[cut:]:
                obj = getattr(obj, part, None)
            break
    if (
        isinstance(obj, type)
        and issubclass(obj, Exception)
        and not issubclass(obj, _NEVER_COMBINED)
    ):
        return obj
    return None


#: Never combined with: snakepool's own errors (a handler's ``WorkerCrashed``
#: must not look like this call's crash), and the iteration-end signals,
#: which Python turns into ``RuntimeError`` when they leave a coroutine.
_NEVER_COMBINED = (SnakepoolError, StopIteration, StopAsyncIteration)


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
