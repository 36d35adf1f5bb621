"""``Pool.stream()``'s iterator: a call whose answer is a flow of items."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import anyio
import anyio.abc

from .. import protocol as p
from ..errors import CallTimeout, SnakepoolError
from ._calls import PendingCall
from ._route import CallRoute

__all__ = ["CallStream"]


class CallStream(anyio.abc.AsyncResource):
    """The async iterator ``Pool.stream()`` returns; also an async context manager
    (``anyio.abc.AsyncResource``: leaving it closes the stream).

    Its call takes the pool's one route (``CallRoute``: ``new_call``, ``send``, ``place``)
    when iteration starts; the items arrive on ``call.items``.
    """

    def __init__(
        self,
        route: CallRoute,
        command: str,
        args: Mapping[str, Any] | None,
        timeout: float | None,
        session: str | None,
    ) -> None:
        self._route = route
        self.command = command
        self._call: PendingCall | None = None  # (first: __del__ reads it if _new_call raises)
        # Encoded now, so bad arguments fail at pool.stream(), before iteration.
        self._started = time.perf_counter()
        self._ready, self._frame = route.new_call(
            command, args, timeout, session, p.CallMode.STREAM, self._started
        )
        self._timeout = route.config.call_timeout if timeout is None else timeout
        self._before_open: Callable[[], Awaitable[Any]] | None = None  # a Session creates itself
        self._finished = False
        self._consumed = 0  # items taken since the last Credit sent to the worker

    def __aiter__(self) -> AsyncIterator[Any]:
        return self

    async def __anext__(self) -> Any:
        if self._finished:
            raise StopAsyncIteration
        if self._call is None:
            await self._open()
        call = self._call
        assert call is not None and call.items is not None
        with anyio.move_on_after(self._timeout):
            try:
                item = await call.items.receive()
            except anyio.EndOfStream:
                self._finish(call.error)
                if call.error is not None:
                    raise call.error from None
                raise StopAsyncIteration from None
            self._consumed += 1
            if self._consumed >= p.STREAM_WINDOW // 2 and call.worker is not None:
                call.worker.grant(call, self._consumed)  # the worker may run ahead again
                self._consumed = 0
            return item
        error = CallTimeout(
            f"stream {self.command!r} produced no item within {self._timeout:g}s; cancelled"
        )
        self._route.trace_end(call, error)
        self._abandon()
        self._route.record(self.command, call.worker, self._started, error)
        raise error

    async def _open(self) -> None:
        route, call = self._route, self._ready
        route.check_open()
        if self._before_open is not None:  # (the session is created in its store first)
            call.in_store = True
            with anyio.move_on_after(self._timeout) as scope:
                await self._before_open()
            if scope.cancelled_caught:
                self._finished = True
                call.limit = self._timeout
                error = route.timeout_error(call, None)
                route.record(self.command, None, self._started, error)
                raise error
            call.in_store = False
        route.send(call, self._frame)  # (no deadline: the timeout bounds each item)
        self._call = call
        if not call.sent:
            call.limit = self._timeout  # (for _route: as long as an item may take)
            try:
                await route.place(call, self._frame)
            except BaseException:
                self._finished = True
                raise

    def _finish(self, error: SnakepoolError | None) -> None:
        self._finished = True
        call = self._call
        assert call is not None
        self._route.record(self.command, call.worker, self._started, error, probe=call.probe)
        call.probe = False
        self._route.trace_end(call, error)

    async def aclose(self) -> None:
        """Stop the stream; cancels the generator in the worker if it still runs."""
        self._abandon()
        await anyio.lowlevel.checkpoint()

    def _abandon(self) -> None:
        self._finished = True
        if self._call is not None:
            self._route.left(self._call)  # (cancels the generator if it still runs)

    def __del__(self) -> None:
        # Dropped without closing: cancel in the worker, but only from the
        # event loop's own thread (the pool's state is not thread-safe).
        if self._call is not None and not self._finished:
            try:
                anyio.get_current_task()
            except Exception:
                return
            self._abandon()
