"""The worker side of :class:`snakepool.Executor`: run a pickled ``fn(*args, **kwargs)``.

Calls travel pickled between a host and its own workers only (never over the
socket server: unpickling runs code, so only a process's own workers, which
run its code anyway, may send it pickles). :func:`dumps` pickles with the
standard library where that is enough (fast) and with cloudpickle where it is
not: functions and classes defined in ``__main__`` (a worker has no copy of
the host's script), lambdas, closures and modules registered with
``cloudpickle.register_pickle_by_value``.
"""

from __future__ import annotations

import importlib
import pickle
import sys
from collections.abc import Callable, Iterable
from typing import Any

from ._base import Adapter
from ._command import command

__all__ = ["ExecutorAdapter", "dumps", "loads", "run_chunk"]

_PROTOCOL = pickle.HIGHEST_PROTOCOL
#: A pickle that names this module refers to the host's script: a worker has another.
_MAIN = b"__main__"


def _cloudpickle() -> Any:
    try:
        return importlib.import_module("cloudpickle")
    except ImportError:
        return None


def dumps(value: Any) -> bytes:
    """``value`` pickled so that a worker (or the host) can load it.

    Raises ``TypeError`` naming the fix when it cannot be pickled.
    """
    try:
        data = pickle.dumps(value, _PROTOCOL)
    except Exception as exc:
        return _dumps_by_value(value, exc)
    if _MAIN in data or _by_value_names(data):  # (refers to a module the other side lacks)
        return _dumps_by_value(value, None)
    return data


def _by_value_names(data: bytes) -> bool:
    cloudpickle = sys.modules.get("cloudpickle")
    if cloudpickle is None:
        return False
    return any(name.encode() in data for name in cloudpickle.list_registry_pickle_by_value())


def _dumps_by_value(value: Any, error: Exception | None) -> bytes:
    cloudpickle = _cloudpickle()
    if cloudpickle is None:
        if error is None:  # (plain pickle named __main__: the other side cannot load it)
            error = pickle.PicklingError("it refers to objects defined in __main__")
        raise TypeError(
            f"cannot pickle {_shown(value)}: {error}. Functions and classes defined in "
            "__main__, lambdas and closures need cloudpickle (pip install cloudpickle); "
            "or define them in a module the workers can import"
        ) from error
    try:
        data: bytes = cloudpickle.dumps(value, _PROTOCOL)
    except Exception as exc:
        raise TypeError(f"cannot pickle {_shown(value)}: {type(exc).__name__}: {exc}") from exc
    return data


def _shown(value: Any) -> str:
    if isinstance(value, tuple) and len(value) == 3 and callable(value[0]):
        value = value[0]  # (a call: name its function)
    name = getattr(value, "__qualname__", None) or type(value).__qualname__
    return f"{name!r} or its arguments" if callable(value) else repr(name)


def loads(data: bytes) -> Any:
    return pickle.loads(data)


def run_chunk(fn: Callable[..., Any], chunk: Iterable[tuple[Any, ...]]) -> list[Any]:
    """``Executor.map`` with a ``chunksize``: one call runs a chunk of items."""
    return [fn(*args) for args in chunk]


class ExecutorAdapter(Adapter):
    """Runs ``Executor.submit``'s calls; ``setup`` runs the initializer."""

    def setup(self, config: dict[str, Any]) -> None:
        initializer = config.get("initializer")
        if initializer is not None:
            fn, args = _load("the initializer", initializer)
            fn(*args)

    @command
    def run(self, call: bytes) -> bytes:
        """``fn(*args, **kwargs)``, pickled both ways."""
        fn, args, kwargs = _load("the call", call)
        result = fn(*args, **kwargs)
        try:
            return dumps(result)
        except TypeError as exc:
            raise pickle.PicklingError(
                f"the result of {getattr(fn, '__qualname__', fn)!r} cannot be sent back: {exc}"
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
