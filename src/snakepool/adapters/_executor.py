"""The worker side of :class:`snakepool.Executor`: run a pickled ``fn(*args, **kwargs)``.

Calls travel pickled between a host and its own workers only (never over the
socket server: unpickling runs code, so only a process's own workers, which
run its code anyway, may send it pickles). :func:`dumps` pickles with the
standard library where that is enough (fast) and with cloudpickle where it is
not: functions and classes defined in ``__main__`` (a worker has no copy of
the host's script), lambdas, closures and modules registered with
``cloudpickle.register_pickle_by_value``.

A call travels as two pickles, its function and its arguments, so that a
plain function (no closure) is pickled once in the host and loaded once in
each worker (:func:`function_bytes`, ``ExecutorAdapter._functions``): one
from ``__main__`` travels by value, so without that every call would pay to
rebuild it. Like a ``ProcessPoolExecutor`` worker, which sees the globals
its module had when it started, a worker sees such a function's globals as
they were when it was first sent.
"""

from __future__ import annotations

import importlib
import pickle
import sys
import types
import weakref
from collections.abc import Callable, Iterable
from typing import Any

from ._base import Adapter
from ._command import command

__all__ = ["ExecutorAdapter", "dumps", "function_bytes", "loads", "run_chunk"]

_PROTOCOL = pickle.HIGHEST_PROTOCOL
#: A pickle that names this module refers to the host's script: a worker has another.
_MAIN = b"__main__"


def _cloudpickle() -> Any:
    try:
        return importlib.import_module("cloudpickle")
    except ImportError:
        return None


def dumps(value: Any, what: str | None = None) -> bytes:
    """``value`` pickled so that a worker (or the host) can load it.

    Raises ``TypeError`` naming ``what`` (by default, the value's type or
    name) and the fix when it cannot be pickled.
    """
    try:
        data = pickle.dumps(value, _PROTOCOL)
    except Exception as exc:
        return _dumps_by_value(value, exc, what)
    if _MAIN in data or _by_value_names(data):  # (refers to a module the other side lacks)
        return _dumps_by_value(value, None, what)
    return data


def _by_value_names(data: bytes) -> bool:
    cloudpickle = sys.modules.get("cloudpickle")
    if cloudpickle is None:
        return False
    return any(name.encode() in data for name in cloudpickle.list_registry_pickle_by_value())


def _dumps_by_value(value: Any, error: Exception | None, what: str | None) -> bytes:
    what = what or repr(getattr(value, "__qualname__", None) or type(value).__qualname__)
    cloudpickle = _cloudpickle()
    if cloudpickle is None:
        if error is None:  # (plain pickle named __main__: the other side cannot load it)
            error = pickle.PicklingError("it refers to objects defined in __main__")
        raise TypeError(
            f"cannot pickle {what}: {error}. Functions and classes defined in "
            "__main__, lambdas and closures need cloudpickle (pip install cloudpickle); "
            "or define them in a module the workers can import"
        ) from error
    try:
        data: bytes = cloudpickle.dumps(value, _PROTOCOL)
    except Exception as exc:
        raise TypeError(f"cannot pickle {what}: {type(exc).__name__}: {exc}") from exc
    return data


def loads(data: bytes) -> Any:
    return pickle.loads(data)


#: Plain functions pickled already (a weak key: a lambda made per call does not pile up).
_sent: weakref.WeakKeyDictionary[Any, bytes] = weakref.WeakKeyDictionary()


def function_bytes(fn: Any) -> bytes:
    """``fn`` pickled; a plain function (no closure, whose cells could change)
    is pickled once."""
    if type(fn) is not types.FunctionType or fn.__closure__ is not None:
        return dumps(fn)
    data = _sent.get(fn)
    if data is None:
        data = _sent[fn] = dumps(fn)
    return data


def run_chunk(fn: Callable[..., Any], chunk: Iterable[tuple[Any, ...]]) -> list[Any]:
    """``Executor.map`` with a ``chunksize``: one call runs a chunk of items."""
    return [fn(*args) for args in chunk]


#: Functions loaded by a worker, by their pickle (the host sends a plain one's
#: same bytes every time); at most this many are kept.
_KEEP_FUNCTIONS = 256


class ExecutorAdapter(Adapter):
    """Runs ``Executor.submit``'s calls; ``setup`` runs the initializer."""

    def __init__(self) -> None:
        super().__init__()
        self._functions: dict[bytes, Any] = {}

    def setup(self, config: dict[str, Any]) -> None:
        initializer = config.get("initializer")
        if initializer is not None:
            fn, args = _load("the initializer", initializer)
            fn(*args)

    @command
    def run(self, fn: bytes, args: bytes) -> bytes:
        """``fn(*args, **kwargs)``, pickled both ways (``args``: ``(args, kwargs)``)."""
        function = self._functions.get(fn)
        if function is None:
            function = _load("the call's function", fn)
            if len(self._functions) >= _KEEP_FUNCTIONS:
                self._functions.clear()
            self._functions[fn] = function
        positional, keywords = _load("the call's arguments", args)
        result = function(*positional, **keywords)
        try:
            return dumps(result)
        except TypeError as exc:
            raise pickle.PicklingError(
                f"the result of {getattr(function, '__qualname__', function)!r} "
                f"cannot be sent back: {exc}"
            ) from None


def _load(what: str, data: bytes) -> Any:
    try:
        return pickle.loads(data)
    except Exception as exc:
        hint = ""
        if isinstance(exc, ImportError | AttributeError):
            hint = (
                " (the worker imports functions by module name: give it the module's "
                "directory with pythonpath=[...] or cwd=..., or install it in the "
                "worker's environment)"
            )
        raise pickle.UnpicklingError(
            f"the worker cannot load {what}: {type(exc).__name__}: {exc}{hint}"
        ) from None
