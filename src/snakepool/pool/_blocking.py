"""``BlockingPool``: the ``Pool`` API for synchronous code.

The pool lives on an event loop in a background thread (an anyio blocking
portal). That thread spawns the workers and lives as long as the pool, which
matters for ``PR_SET_PDEATHSIG``: it fires when the *thread* that spawned a
worker exits.

A started pool that is never closed is closed when the interpreter exits (an
``atexit`` hook: after the main thread and every non-daemon thread ended, and
while the daemon loop thread still runs), so a script that forgets
``close()`` exits, with its workers (and the template that started them)
stopped as by ``close()``. Without it the exit hangs: interpreter teardown
finalizes the portal, which waits for a loop thread that no longer runs. A
``KeyboardInterrupt`` (or any exception) that reaches a caller while it waits
for a call cancels that call in the pool, as cancelling a task would: it is
not left running, holding its worker, for ``close()`` to drain.
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from types import TracebackType
from typing import Any, Self

from anyio.from_thread import BlockingPortal, start_blocking_portal

from ..errors import PoolClosed
from ._events import Event, PoolStatistics
from ._pool import CallStream, Pool
from ._session import Session

__all__ = ["BlockingPool"]

_log = logging.getLogger("snakepool.pool")


class BlockingPool:
    """Same arguments and methods as :class:`Pool`, without ``await``.

    ``with BlockingPool("generic", size=2) as pool: pool.call("echo", {"value": 1})``
    """

    def __init__(self, adapter: Any, **kwargs: Any) -> None:
        self._pool = Pool(adapter, **kwargs)
        self._portal_cm: AbstractContextManager[BlockingPortal] | None = None
        self._portal: BlockingPortal | None = None
        self._pool_cm: AbstractContextManager[Pool] | None = None
        self._owner_pid: int | None = None  # the process that started it (not a fork of it)

    @property
    def name(self) -> str:
        return self._pool.name

    @property
    def closed(self) -> bool:
        return self._pool.closed

    def start(self) -> None:
        if self._portal is not None:
            raise RuntimeError(f"pool {self.name!r} was already started")
        portal_cm = start_blocking_portal()
        portal = portal_cm.__enter__()
        pool_cm = portal.wrap_async_context_manager(self._pool)
        try:
            pool_cm.__enter__()
        except BaseException as exc:
            portal_cm.__exit__(type(exc), exc, exc.__traceback__)
            raise
        self._portal_cm, self._portal, self._pool_cm = portal_cm, portal, pool_cm
        self._owner_pid = os.getpid()
        atexit.register(self._close_at_exit)

    def close(self) -> None:
        """Drain and stop the workers, then the background loop.

        A started pool that is still open when the interpreter exits is closed
        then (see the module's docstring); closing it yourself is still best.
        """
        atexit.unregister(self._close_at_exit)
        self._close()

    def _close(self) -> None:
        pool_cm, portal_cm = self._pool_cm, self._portal_cm
        self._pool_cm = self._portal_cm = None
        self._portal = None
        try:
            if pool_cm is not None:
                pool_cm.__exit__(None, None, None)
        finally:
            if portal_cm is not None:
                portal_cm.__exit__(None, None, None)

    aclose = close  # the same name as Pool's, for code that is written for both

    def _close_at_exit(self) -> None:
        """``atexit``: close a pool the program left open, so that the interpreter can exit."""
        if self._owner_pid != os.getpid():  # a forked child: the loop thread is not here
            return
        try:
            self._close()  # (not close(): no atexit.unregister from inside an atexit call)
        except BaseException:  # (a second Ctrl-C, or a failed close: exit anyway)
            _log.exception("closing pool %r at interpreter exit failed", self.name)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        portal = self._portal
        if portal is None:
            if self._pool.closed:
                raise PoolClosed(f"pool {self.name!r} is closed")
            raise RuntimeError(
                f"pool {self.name!r} is not started: use 'with pool' or pool.start()"
            )
        future = portal.start_task_soon(functools.partial(fn, *args, **kwargs))
        try:
            return future.result()
        except BaseException:
            # Interrupted while waiting (Ctrl-C): cancel the call, as cancelling
            # its task would. (A no-op once it finished: then this re-raises
            # its own exception.)
            future.cancel()
            raise

    def call(self, command: str, args: Mapping[str, Any] | None = None, **kwargs: Any) -> Any:
        return self._run(self._pool.call, command, args, **kwargs)

    def cast(self, command: str, args: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        self._run(self._pool.cast, command, args, **kwargs)

    def stream(
        self, command: str, args: Mapping[str, Any] | None = None, **kwargs: Any
    ) -> Iterator[Any]:
        """A generator of items; closing it early cancels the stream in the worker."""
        stream: CallStream = self._run(self._pool.stream, command, args, **kwargs)
        return self._iterate(stream)

    def _iterate(self, stream: CallStream) -> Iterator[Any]:
        try:
            while True:
                try:
                    item = self._run(stream.__anext__)
                except StopAsyncIteration:
                    return
                yield item
        finally:
            if self._portal is not None:
                self._run(stream.aclose)

    def session(
        self, session_id: str | None = None, *, ttl: float | None = None
    ) -> BlockingSession:
        """A session, as ``Pool.session`` (a context manager that closes it at exit)."""
        return BlockingSession(self, self._run(self._pool.session, session_id, ttl=ttl))

    def register_tool(self, name: str, fn: Callable[..., Any]) -> None:
        """As ``Pool.register_tool``; sync tools run in a thread, async ones on the pool's loop."""
        self._pool.register_tool(name, fn)

    def statistics(self) -> PoolStatistics:
        if self._portal is None:
            return self._pool.statistics()
        stats: PoolStatistics = self._run(self._pool.statistics)
        return stats

    def add_listener(self, fn: Callable[[Event], Any], *, calls: bool = True) -> None:
        """``fn`` runs on the pool's background thread (``calls``: as ``Pool.add_listener``)."""
        self._pool.add_listener(fn, calls=calls)

    def remove_listener(self, fn: Callable[[Event], Any]) -> None:
        self._pool.remove_listener(fn)

    def __repr__(self) -> str:
        return f"<BlockingPool {self._pool!r}>"


class _BlockingProxy:
    """Runs the coroutine methods of an async object on the pool's loop."""

    def __init__(self, pool: BlockingPool, target: Any) -> None:
        self._pool = pool
        self._target = target

    def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return self._pool._run(getattr(self._target, name), *args, **kwargs)


class BlockingVariables(_BlockingProxy):
    """``Session.variables`` without ``await`` (``watch`` is not offered here)."""

    def define(
        self, name: str, type: str, initial: Any, constraints: Mapping[str, Any] | None = None
    ) -> None:
        self._call("define", name, type, initial, constraints)

    def get(self, name: str, default: Any = None) -> Any:
        return self._call("get", name, default)

    def set(self, name: str, value: Any, metadata: Mapping[str, Any] | None = None) -> None:
        self._call("set", name, value, metadata)

    def get_many(self, names: list[str]) -> dict[str, Any]:
        result: dict[str, Any] = self._call("get_many", names)
        return result

    def set_many(self, values: Mapping[str, Any]) -> None:
        self._call("set_many", values)


class BlockingSession(_BlockingProxy):
    """``Session`` without ``await``."""

    def __init__(self, pool: BlockingPool, session: Session) -> None:
        super().__init__(pool, session)
        self.id: str = session.id
        self.variables = BlockingVariables(pool, session.variables)

    def call(self, command: str, args: Mapping[str, Any] | None = None, **kwargs: Any) -> Any:
        return self._call("call", command, args, **kwargs)

    def stream(
        self, command: str, args: Mapping[str, Any] | None = None, **kwargs: Any
    ) -> Iterator[Any]:
        stream: CallStream = self._call("stream", command, args, **kwargs)
        return self._pool._iterate(stream)

    def close(self) -> None:
        self._call("close")

    def __enter__(self) -> Self:
        self._call("_store")
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
