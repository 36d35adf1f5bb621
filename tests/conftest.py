"""Shared fixtures: the anyio backend, and a check that no test leaves a process behind."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:  # workers import the test adapters from here
    sys.path.insert(0, str(TESTS_DIR))

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def wait_for(
    condition: Callable[[], object], timeout: float = 10.0, interval: float = 0.02
) -> None:
    """Poll ``condition`` until it is true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {condition}")
        time.sleep(interval)


def _children() -> dict[int, str]:
    found = {}
    for child in psutil.Process().children(recursive=True):
        try:
            found[child.pid] = " ".join(child.cmdline())
        except psutil.Error:
            continue
    return found


@pytest.fixture(autouse=True)
def no_leftover_processes() -> Iterator[None]:
    """Every process a test starts must be gone shortly after it ends."""
    before = set(_children())
    yield
    deadline = time.monotonic() + 10.0
    leftover = {pid: cmd for pid, cmd in _children().items() if pid not in before}
    while leftover and time.monotonic() < deadline:
        time.sleep(0.05)
        leftover = {pid: cmd for pid, cmd in _children().items() if pid not in before}
    for pid in leftover:
        with contextlib.suppress(psutil.Error):
            psutil.Process(pid).kill()
    assert not leftover, f"test left processes behind: {leftover}"
