"""A task group that does not belong to the caller's stack of cancel scopes.

``Pool.start()`` and ``Pool.aclose()`` may be awaited from different tasks,
or with the caller's own task groups opened in between: a task group entered
in ``start()`` would then have to exit out of order. So the pool's background
tasks live in a group owned by a detached runner task (an asyncio task, or a
trio system task), and the caller only ever waits on events.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.abc

__all__ = ["BackgroundTasks"]

_log = logging.getLogger("snakepool.pool")
_detached: set[asyncio.Task[Any]] = set()  # strong references: asyncio keeps weak ones


class BackgroundTasks:
    """Owns a task group in a detached task; ``aclose()`` cancels and joins it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._tg: anyio.abc.TaskGroup | None = None
        self._ready = anyio.Event()
        self._stop = anyio.Event()
        self._done = anyio.Event()

    async def start(self) -> None:
        _spawn_detached(self._run, f"snakepool-pool-{self.name}")
        await self._ready.wait()

    @property
    def group(self) -> anyio.abc.TaskGroup:
        if self._tg is None:
            raise RuntimeError("background tasks are not running")
        return self._tg

    @property
    def running(self) -> bool:
        return self._tg is not None

    async def aclose(self) -> None:
        """Cancel every background task and wait until they are all gone (shielded)."""
        self._stop.set()
        with anyio.CancelScope(shield=True):
            await self._done.wait()

    async def _run(self) -> None:
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                self._ready.set()
                await self._stop.wait()
                tg.cancel_scope.cancel()
        except BaseException:
            _log.exception("snakepool: background tasks of pool %r failed", self.name)
            raise
        finally:
            self._tg = None
            self._ready.set()
            self._done.set()


def _spawn_detached(fn: Callable[[], Awaitable[None]], name: str) -> None:
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        import trio  # the only other backend anyio runs on

        trio.lowlevel.spawn_system_task(fn, name=name)
        return
    task: asyncio.Task[None] = loop.create_task(_as_coroutine(fn), name=name)
    _detached.add(task)
    task.add_done_callback(_detached.discard)


async def _as_coroutine(fn: Callable[[], Awaitable[None]]) -> None:
    await fn()
