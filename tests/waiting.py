"""Waiting in tests: poll a condition with a deadline (never sleep to green)."""

from __future__ import annotations

import anyio


async def wait_until(condition: object, timeout: float = 15.0) -> None:
    """Return once ``condition()`` is true; fail after ``timeout`` seconds."""
    assert callable(condition)
    with anyio.fail_after(timeout):
        while not condition():
            await anyio.sleep(0.02)
