"""An adapter for tests/test_promises.py: what a handler raises, what restore_session gets."""

from __future__ import annotations

import importlib
import os
from typing import Any

from snakepool.adapters import CallContext, command
from sp_adapters import Holding


class CustomError(Exception):
    """A handler's own exception type, from a module the host imports too."""

    def __init__(self, code: int, detail: str) -> None:  # (an __init__ of its own shape)
        super().__init__(f"code {code}: {detail}")
        self.code = code


class NoPickleRepr(ValueError):
    """An exception whose ``__repr__`` needs a field only its ``__init__`` sets."""

    def __init__(self, field: str) -> None:
        super().__init__(field)
        self.field = field

    def __repr__(self) -> str:
        return f"NoPickleRepr({self.field!r})"


_RAISERS: dict[str, Any] = {
    "ValueError": lambda: ValueError("bad value"),
    "KeyError": lambda: KeyError("missing"),
    "ZeroDivisionError": lambda: 1 / 0,
    "FileNotFoundError": lambda: FileNotFoundError(2, "No such file", "/nonexistent"),
    "UnicodeDecodeError": lambda: b"\xff".decode("utf-8"),
    "CustomError": lambda: CustomError(7, "custom"),
    "NoPickleRepr": lambda: NoPickleRepr("odd"),
    "StopIteration": lambda: StopIteration("done"),
    "SystemExit": lambda: SystemExit(3),
    # a class from a module the host never imports (imported here, not at the top)
    "WorkerOnlyError": lambda: importlib.import_module("sp_worker_only").WorkerOnlyError("w"),
}


class Promises(Holding):
    """Raises on request; records every restore_session it runs."""

    @command
    def raise_(self, kind: str) -> None:
        made = _RAISERS[kind]()
        raise made

    @command
    def whoami(self, ctx: CallContext) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "restores": list(ctx.session_state.get("restores", [])),
        }

    @command
    def remember(self, key: str, value: Any, ctx: CallContext) -> int:
        ctx.save_state(key, value)
        return os.getpid()

    @command
    def deadline(self, ctx: CallContext) -> float | None:
        """The time the worker was given for this call (``None``: no limit)."""
        return ctx.time_left

    @command
    def die(self) -> None:
        os._exit(1)

    def restore_session(self, ctx: CallContext, state: dict[str, Any]) -> None:
        ctx.session_state.setdefault("restores", []).append(
            {"pid": os.getpid(), "state": dict(state)}
        )
