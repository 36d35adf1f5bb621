"""Functions tests/test_executor.py runs in snakepool.Executor workers (an importable module)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

INITIALIZED: list[Any] = []


class CustomError(Exception):
    """An exception type of its own, with an ``__init__`` of its own shape."""

    def __init__(self, code: int) -> None:
        super().__init__(f"code {code}")
        self.code = code


def noop(x: Any = None) -> Any:
    return x


def pid() -> int:
    return os.getpid()


def pid_after(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def wait_for_file(path: str, timeout: float = 30.0) -> int:
    """Hold the worker until ``path`` exists (tests create it); then its pid."""
    deadline = time.monotonic() + timeout
    while not Path(path).exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.01)
    return os.getpid()


def hang() -> None:
    """Never returns, and ignores cancellation (a sync handler cannot be interrupted)."""
    while True:
        time.sleep(1)


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def raise_custom(code: int) -> None:
    raise CustomError(code)


def raise_value_error() -> None:
    raise ValueError("bad value")


def initialize(*args: Any) -> None:
    INITIALIZED.append(args)


def initialized(hold_until: str | None = None) -> tuple[int, list[Any]]:
    if hold_until is not None:
        wait_for_file(hold_until)
    return os.getpid(), INITIALIZED


def fail_to_initialize() -> None:
    raise RuntimeError("no database")
