"""Adapters for the ``snakepool up`` tests: calls and streams that hold until released."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

from snakepool.adapters import command
from sp_adapters import Basic


async def _until(release: str, limit: float) -> None:
    start = time.monotonic()
    while not Path(release).exists():
        if time.monotonic() - start > limit:
            raise TimeoutError(f"not released within {limit:g}s ({release})")
        await asyncio.sleep(0.005)


class Draining(Basic):
    """``Basic``, plus a call and a stream that say they started (a marker file)
    and then hold until the file ``release`` exists."""

    @command
    async def hold_marked(self, release: str, started: str, limit: float = 60.0) -> str:
        Path(started).touch()
        await _until(release, limit)
        return "released"

    @command
    async def hold_stream(
        self, release: str, started: str, n: int, limit: float = 60.0
    ) -> AsyncIterator[int]:
        Path(started).touch()
        yield 0
        await _until(release, limit)
        for i in range(1, n):
            yield i
