"""Calls from worker code back to the host: ``ctx.call_host`` and ``acall_host``.

A ``HostCall`` goes out with an id of its own; the host answers with
``HostReply`` or ``HostFailure``, which resolves the caller's future (a
thread's, or the event loop's for an async handler).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import threading
from collections.abc import Callable
from typing import Any

from .. import protocol as p
from ..errors import ProtocolError, RemoteError

__all__ = ["HostBridge"]

_Future = concurrent.futures.Future[Any] | asyncio.Future[Any]


class HostBridge:
    """The worker's side of host tools (``CallContext.bridge``)."""

    def __init__(
        self,
        send: Callable[[p.Message], None],
        loop: asyncio.AbstractEventLoop,
        call_soon: Callable[..., bool],
    ) -> None:
        self._send = send
        self._loop = loop
        self._call_soon = call_soon
        self._loop_thread = threading.get_ident()
        self._calls: dict[int, _Future] = {}
        self._ids = itertools.count(1)

    def call_host(self, call_id: int, tool: str, args: Any, timeout: float | None) -> Any:
        """Blocking host tool call, from a handler thread."""
        if threading.get_ident() == self._loop_thread:
            raise RuntimeError(
                "ctx.call_host() would block the worker's event loop: use await ctx.acall_host()"
            )
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        host_call_id = next(self._ids)
        self._send_call(host_call_id, call_id, tool, args, future)
        try:
            return future.result(timeout=timeout)
        except concurrent.futures.TimeoutError:
            raise TimeoutError(
                f"host tool {tool!r} did not answer within the call's deadline"
            ) from None
        finally:
            self._calls.pop(host_call_id, None)

    async def acall_host(self, call_id: int, tool: str, args: Any, timeout: float | None) -> Any:
        """Host tool call from an async handler."""
        future: asyncio.Future[Any] = self._loop.create_future()
        host_call_id = next(self._ids)
        self._send_call(host_call_id, call_id, tool, args, future)
        try:
            return await asyncio.wait_for(future, timeout)
        finally:
            self._calls.pop(host_call_id, None)

    def answered(self, message: p.HostReply | p.HostFailure) -> None:
        """The host answered a tool call (read by the worker's reader)."""
        future = self._calls.pop(message.id, None)
        if future is None:
            return  # the caller gave up (deadline) meanwhile
        if isinstance(future, asyncio.Future):  # belongs to the loop: resolve it there
            self._call_soon(_resolve, future, message)
        else:
            _resolve(future, message)

    def _send_call(
        self, host_call_id: int, call_id: int, tool: str, args: Any, future: _Future
    ) -> None:
        try:
            message = p.HostCall(id=host_call_id, call_id=call_id, tool=tool, args=args)
            self._calls[host_call_id] = future
            self._send(message)
        except (TypeError, ProtocolError) as exc:
            self._calls.pop(host_call_id, None)
            future.set_exception(
                TypeError(f"arguments of host tool {tool!r} cannot be sent: {exc}")
            )


def _resolve(future: _Future, message: p.HostReply | p.HostFailure) -> None:
    if future.done():
        return
    if isinstance(message, p.HostReply):
        future.set_result(message.value)
    else:
        future.set_exception(RemoteError(message.type, message.message))
