"""Every exception snakepool raises, grouped by :class:`ErrorCategory`.

The category decides the default recovery (see the table in the design
contract): infrastructure categories (initialization, timeout, communication,
protocol) count toward the pool's circuit breaker, application errors never do.

Each class also has a ``kind``: a short, stable, machine-readable name, unique
per class, that code matches instead of the (English) message, and that
travels with a failure over the socket wire (``k``). :data:`KINDS` maps each
kind to its class.

======================== ============================== ==============
class                    kind                           category
======================== ============================== ==============
SnakepoolError           ``error``                      application
WorkerStartError         ``worker_start_failed``        initialization
CallTimeout              ``call_timeout``               timeout
WorkerCrashed            ``worker_crashed``             communication
ProtocolError            ``protocol_error``             protocol
ResourceExceeded         ``resource_exceeded``          resource
RemoteError              ``remote_error``               application
UnknownCommand           ``unknown_command``            application
BadArguments             ``bad_arguments``              application
WrongMode                ``wrong_mode``                 application
UnknownTool              ``unknown_tool``               application
PoolOverloaded           ``pool_overloaded``            overload
CircuitOpen              ``circuit_open``               overload
SessionNotFound          ``session_not_found``          session
SessionExpired           ``session_expired``            session
InvalidSessionId         ``invalid_session_id``         session
SessionWorkerUnavailable ``session_worker_unavailable`` session
SessionStoreUnavailable  ``session_store_unavailable``  session
PoolClosed               ``pool_closed``                closed
PoolDisabled             ``pool_disabled``              closed
ConfigError              ``config``                     initialization
TemplateUnavailable      ``template_unavailable``       initialization
TemplateStartError       ``template_start_failed``      initialization
IsolationUnavailable     ``isolation_unavailable``      initialization
PipelineStepFailed       ``pipeline_step_failed``       application
ExecutorBroken           ``executor_broken``            initialization
======================== ============================== ==============

The DSPy adapter's errors (in :mod:`snakepool.dspy`) derive from
``SnakepoolError`` too: ``UnknownProgram`` (``dspy_unknown_program``),
``NoLMConfigured`` (``dspy_no_lm``), ``LMCallError``
(``dspy_lm_call_failed``) and ``LMFuseOpen`` (``dspy_lm_fuse_open``), all
``application``.

Like trio, we keep *closed* (you closed the pool: :class:`PoolClosed`) apart
from a worker that *broke* (something else killed it: :class:`WorkerCrashed`).
A broken worker never breaks the pool.
"""

from __future__ import annotations

import builtins
import concurrent.futures
import enum
import signal
import sys
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, ClassVar, Self, cast

__all__ = [
    "INFRASTRUCTURE_CATEGORIES",
    "KINDS",
    "BadArguments",
    "CallTimeout",
    "CircuitOpen",
    "ConfigError",
    "ErrorCategory",
    "ExecutorBroken",
    "InvalidSessionId",
    "IsolationUnavailable",
    "PipelineStepFailed",
    "PoolClosed",
    "PoolDisabled",
    "PoolOverloaded",
    "ProtocolError",
    "RemoteError",
    "ResourceExceeded",
    "SessionExpired",
    "SessionNotFound",
    "SessionStoreUnavailable",
    "SessionWorkerUnavailable",
    "SnakepoolError",
    "TemplateStartError",
    "TemplateUnavailable",
    "UnknownCommand",
    "UnknownTool",
    "WorkerCrashed",
    "WorkerStartError",
    "WrongMode",
    "describe_exit_code",
    "error_class",
    "wire_type_name",
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
    """Base class of every snakepool error.

    ``.category`` (an :class:`ErrorCategory`) selects the recovery;
    ``.kind`` names the class in a stable, machine-readable way (match it,
    never the message).
    """

    category: ClassVar[ErrorCategory] = ErrorCategory.APPLICATION
    kind: ClassVar[str] = "error"


class WorkerStartError(SnakepoolError):
    """A worker could not start (import, ``setup`` or handshake failed)."""

    category = ErrorCategory.INITIALIZATION
    kind = "worker_start_failed"

    def __init__(self, message: str, *, stderr_tail: str = "") -> None:
        if stderr_tail:
            message = f"{message}\n--- worker stderr (last lines) ---\n{stderr_tail}"
        super().__init__(message)
        self.stderr_tail = stderr_tail


class CallTimeout(SnakepoolError, TimeoutError):
    """The call did not finish within its timeout."""

    category = ErrorCategory.TIMEOUT
    kind = "call_timeout"


class WorkerCrashed(SnakepoolError):
    """The worker running the call died; only its own calls fail."""

    category = ErrorCategory.COMMUNICATION
    kind = "worker_crashed"

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
    kind = "protocol_error"


class ResourceExceeded(SnakepoolError):
    """The worker went over a resource limit; ``limit`` names it when known: a key of
    the pool's ``limits`` (``"memory_mb"``, ``"cpu_seconds"``, ``"open_files"``,
    ``"processes"``, ``"file_size_mb"``), or ``"max_memory_mb"`` (a recycled worker)."""

    category = ErrorCategory.RESOURCE
    kind = "resource_exceeded"

    def __init__(self, message: str, *, limit: str | None = None) -> None:
        super().__init__(message)
        self.limit = limit


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
    kind = "remote_error"

    def __new__(cls, remote_type: str, *args: Any, **kwargs: Any) -> Self:
        if cls in _COMBINABLE and type(remote_type) is str:
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

    @property
    def remote_kind(self) -> str | None:
        """The ``kind`` of the remote exception when it was a :class:`SnakepoolError`
        whose class is known here (``snakepool.errors``, or a module already
        imported: never imported for this), else ``None``."""
        found = _known_type(self.remote_type)
        if isinstance(found, type) and issubclass(found, SnakepoolError):
            return found.kind
        return None

    def __reduce__(self) -> str | tuple[Any, ...]:
        cls = type(self).__dict__.get("_remote_base", type(self))
        if cls in _COMBINABLE:
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

    kind = "unknown_command"


class BadArguments(RemoteError):
    """The arguments do not fit the command's signature (``remote_type`` ``TypeError``,
    so ``except TypeError`` catches it too)."""

    kind = "bad_arguments"


class WrongMode(RemoteError):
    """``call`` of a stream (generator) command, or ``stream`` of a plain one
    (``remote_type`` ``TypeError``)."""

    kind = "wrong_mode"


#: The classes made ``<Class>_<Type>`` for a handler's exception type (see RemoteError).
_COMBINABLE: frozenset[type[RemoteError]] = frozenset(
    {RemoteError, UnknownCommand, BadArguments, WrongMode}
)


class UnknownTool(SnakepoolError, LookupError):
    """No host tool of that name is registered (``ctx.call_host``).

    Raised on the host and sent to the worker, where ``ctx.call_host`` raises
    a :class:`RemoteError` whose :attr:`~RemoteError.remote_kind` is
    ``"unknown_tool"``.
    """

    category = ErrorCategory.APPLICATION
    kind = "unknown_tool"


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
    obj = _known_type(remote_type)
    if (
        isinstance(obj, type)
        and issubclass(obj, Exception)
        and not issubclass(obj, _NEVER_COMBINED)
    ):
        return obj
    return None


def _known_type(remote_type: str) -> object:
    """What ``remote_type`` names, if a built-in or in an already imported module."""
    obj: object
    if type(remote_type) is not str:
        return None
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
    return obj


def wire_type_name(cls: type) -> str:
    """How an exception type is named on the wire: ``"ValueError"`` for a
    built-in, else ``"module.qualname"`` (what :class:`RemoteError` resolves)."""
    if cls.__module__ in ("builtins", "__main__"):
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"


#: Never combined with: snakepool's own errors (a handler's ``WorkerCrashed``
#: must not look like this call's crash), and the iteration-end signals,
#: which Python turns into ``RuntimeError`` when they leave a coroutine.
_NEVER_COMBINED = (SnakepoolError, StopIteration, StopAsyncIteration)


class PoolOverloaded(SnakepoolError):
    """The pool's queue is full: the call was refused, nothing was queued."""

    category = ErrorCategory.OVERLOAD
    kind = "pool_overloaded"


class CircuitOpen(SnakepoolError):
    """The pool's circuit breaker is open: failing fast."""

    category = ErrorCategory.OVERLOAD
    kind = "circuit_open"


class SessionNotFound(SnakepoolError, KeyError):
    """No session has that id."""

    category = ErrorCategory.SESSION
    kind = "session_not_found"

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class SessionExpired(SnakepoolError):
    """The session outlived its TTL (or was closed)."""

    category = ErrorCategory.SESSION
    kind = "session_expired"


class InvalidSessionId(SnakepoolError, ValueError):
    """A session id breaks the rule: 1 to 128 of ``A-Z a-z 0-9 . _ : -``, not starting with ``.``."""

    category = ErrorCategory.SESSION
    kind = "invalid_session_id"


class SessionWorkerUnavailable(SnakepoolError):
    """Strict affinity: the session's worker is busy or gone."""

    category = ErrorCategory.SESSION
    kind = "session_worker_unavailable"


class SessionStoreUnavailable(SnakepoolError, ConnectionError):
    """The session store (Redis) cannot be reached, or did not answer in time;
    its message names the store (a URL without its password)."""

    category = ErrorCategory.SESSION
    kind = "session_store_unavailable"


class PoolClosed(SnakepoolError):
    """The pool was closed (by you); no call is accepted any more."""

    category = ErrorCategory.CLOSED
    kind = "pool_closed"


class PoolDisabled(PoolClosed):
    """The pool has no workers to run (a ``gpu`` pool on a machine without GPUs)."""

    kind = "pool_disabled"


class ConfigError(SnakepoolError, ValueError):
    """A bad supervisor config; the message names the file, line, pool and key.

    ``path``, ``line``, ``pool``, ``key`` and ``variable`` (an environment
    override) say where, each ``None`` when it does not apply or is unknown.
    """

    category = ErrorCategory.INITIALIZATION
    kind = "config"

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        line: int | None = None,
        pool: str | None = None,
        key: str | None = None,
        variable: str | None = None,
    ) -> None:
        super().__init__(message)
        self.path = path
        self.line = line
        self.pool = pool
        self.key = key
        self.variable = variable


class TemplateUnavailable(SnakepoolError):
    """Forking workers from a template is not possible or not safe here; ``str()``
    says why. The pool then spawns workers the plain way."""

    category = ErrorCategory.INITIALIZATION
    kind = "template_unavailable"


class TemplateStartError(SnakepoolError):
    """A preload module failed to import in the worker template; the message
    names it and quotes the error."""

    category = ErrorCategory.INITIALIZATION
    kind = "template_start_failed"

    def __init__(self, message: str, *, module: str | None = None, traceback: str = "") -> None:
        super().__init__(message)
        self.module = module
        self.traceback = traceback


class IsolationUnavailable(WorkerStartError):
    """The pool asked for isolation this machine cannot give (``pool.start()`` refuses
    rather than run workers less isolated than asked). ``feature`` names the option:
    ``"limits.processes"``, ``"user"``, ``"network"``, ``"writable_paths"``, or
    ``"platform"``; the message says why and what would make it possible."""

    kind = "isolation_unavailable"

    def __init__(self, message: str, *, feature: str | None = None) -> None:
        super().__init__(message)
        self.feature = feature


class PipelineStepFailed(SnakepoolError):
    """A step of a ``snakepool.pipeline.Pipeline`` failed (and was not allowed to).

    ``.step`` names it, ``.error`` is what it raised (also ``__cause__``),
    ``.error_kind`` that error's kind (its remote kind for a ``RemoteError``),
    and ``.result`` the ``PipelineResult`` of the steps run so far.
    """

    category = ErrorCategory.APPLICATION
    kind = "pipeline_step_failed"

    def __init__(
        self,
        message: str,
        *,
        step: str | None = None,
        error: BaseException | None = None,
        result: Any = None,
    ) -> None:
        super().__init__(message)
        self.step = step
        self.error = error
        self.result = result
        kind = getattr(error, "remote_kind", None) or getattr(error, "kind", None)
        self.error_kind: str | None = kind if isinstance(kind, str) else None

    @classmethod
    def of(cls, step: str, error: BaseException, result: Any = None) -> Self:
        """The failure of ``step`` with ``error``, worded once."""
        message = f"pipeline step {step!r} failed: {type(error).__name__}: {error}"
        return cls(message, step=step, error=error, result=result)

    def __reduce__(self) -> tuple[Any, ...]:
        # (the partial result stays behind: it holds whatever the steps returned)
        state = {"step": self.step, "error": self.error, "error_kind": self.error_kind}
        return (type(self), (str(self),), state)


class ExecutorBroken(SnakepoolError, concurrent.futures.BrokenExecutor):
    """A :class:`snakepool.Executor` could not start its workers (its initializer
    failed, say): its calls fail, as ``ProcessPoolExecutor``'s do once broken.
    The cause is chained (``__cause__``). A crashed worker never breaks it."""

    category = ErrorCategory.INITIALIZATION
    kind = "executor_broken"


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


def _kinds() -> Mapping[str, type[SnakepoolError]]:
    table: dict[str, type[SnakepoolError]] = {}
    for value in list(globals().values()):
        if isinstance(value, type) and issubclass(value, SnakepoolError):
            if value.kind in table:  # (a class that forgot its own kind)
                raise AssertionError(f"{value.__name__}: kind {value.kind!r} is taken")
            table[value.kind] = value
    return MappingProxyType(table)


#: Every kind of this module's errors -> its class.
KINDS: Mapping[str, type[SnakepoolError]] = _kinds()


def error_class(kind: object) -> type[SnakepoolError] | None:
    """The class of ``kind`` (``"worker_crashed"`` -> :class:`WorkerCrashed`), or None."""
    return KINDS.get(kind) if isinstance(kind, str) else None
