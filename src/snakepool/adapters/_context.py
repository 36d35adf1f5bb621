"""``CallContext``: what a handler knows about the call it is serving."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any, Protocol

from ..protocol import SAVE_STATE_TOOL

__all__ = ["CallContext", "HostBridge", "SessionVariables"]

_EVENT_LOCK = threading.Lock()  # makes a context's cancel event at most once


class HostBridge(Protocol):
    """How a context reaches the host (the worker runtime implements it)."""

    def call_host(
        self, call_id: int, tool: str, args: Mapping[str, Any], timeout: float | None
    ) -> Any: ...

    async def acall_host(
        self, call_id: int, tool: str, args: Mapping[str, Any], timeout: float | None
    ) -> Any: ...


class SessionVariables(Mapping[str, Any]):
    """Read-only view of a session's variables in this worker.

    The host pushes every change before the next call of the session, so a
    call made after ``set()`` returned on the host sees the new value.
    """

    __slots__ = ("_source",)

    def __init__(self, source: Mapping[str, Any] | None = None) -> None:
        self._source: Mapping[str, Any] = source if source is not None else {}

    def _rebind(self, source: Mapping[str, Any]) -> None:
        self._source = source

    def __getitem__(self, name: str) -> Any:
        try:
            return self._source[name]
        except KeyError:
            known = ", ".join(sorted(self._source)) or "none"
            raise KeyError(f"no session variable {name!r} (defined: {known})") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._source)

    def __len__(self) -> int:
        return len(self._source)

    def __repr__(self) -> str:
        return f"SessionVariables({dict(self._source)!r})"


class CallContext:
    """Passed to a handler that declares a ``ctx`` parameter.

    ``cancelled`` turns true when the host gives up on the call (timeout, the
    caller went away, a stream closed early): long sync handlers should check
    it and return. ``deadline`` is a ``time.monotonic()`` value, or ``None``.
    ``session_state`` is a dict kept in this worker for the session;
    ``save_state(key, value)`` keeps data on the host, where it survives the
    worker and reaches ``Adapter.restore_session`` on the next one.
    """

    __slots__ = (
        "_bridge",
        "_cancel_event",
        "_cancelled",
        "call_id",
        "command",
        "deadline",
        "log",
        "session_id",
        "session_state",
        "variables",
        "worker_id",
    )

    def __init__(
        self,
        *,
        call_id: int,
        command: str,
        worker_id: int,
        session_id: str | None,
        session_state: dict[str, Any],
        deadline: float | None,
        log: logging.Logger,
        variables: SessionVariables | None = None,
        bridge: HostBridge | None = None,
    ) -> None:
        self.call_id = call_id
        self.command = command
        self.worker_id = worker_id
        self.session_id = session_id
        self.session_state = session_state
        self.deadline = deadline
        self.log = log
        self.variables = variables if variables is not None else SessionVariables()
        self._bridge = bridge
        self._cancelled = False
        # Made only for wait_cancelled(): most calls never need one.
        self._cancel_event: threading.Event | None = None

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def wait_cancelled(self, timeout: float | None = None) -> bool:
        """Block up to ``timeout`` seconds; true if the call was cancelled."""
        with _EVENT_LOCK:
            if self._cancel_event is None:
                self._cancel_event = threading.Event()
                if self._cancelled:
                    self._cancel_event.set()
            event = self._cancel_event
        return event.wait(timeout)

    @property
    def time_left(self) -> float | None:
        """Seconds until the deadline (never negative), or ``None``."""
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - time.monotonic())

    def cancel(self) -> None:
        """Mark the call cancelled (the worker runtime does this)."""
        with _EVENT_LOCK:
            self._cancelled = True
            if self._cancel_event is not None:
                self._cancel_event.set()

    def call_host(self, name: str, args: Mapping[str, Any] | None = None) -> Any:
        """Call the host tool ``name(**args)`` and return its result (sync handlers).

        A tool that raises, or a name nobody registered, raises
        ``snakepool.RemoteError`` here with the host-side type and message.
        """
        return self._need_bridge().call_host(self.call_id, name, dict(args or {}), self.time_left)

    async def acall_host(self, name: str, args: Mapping[str, Any] | None = None) -> Any:
        """``call_host`` for async handlers."""
        return await self._need_bridge().acall_host(
            self.call_id, name, dict(args or {}), self.time_left
        )

    def save_state(self, key: str, value: Any) -> None:
        """Keep ``value`` (MessagePack-able) in the host's session state; returns once stored."""
        if self.session_id is None:
            raise RuntimeError("save_state() needs a session: call through pool.session(...)")
        self.call_host(SAVE_STATE_TOOL, {"key": key, "value": value})

    async def asave_state(self, key: str, value: Any) -> None:
        """``save_state`` for async handlers."""
        if self.session_id is None:
            raise RuntimeError("save_state() needs a session: call through pool.session(...)")
        await self.acall_host(SAVE_STATE_TOOL, {"key": key, "value": value})

    def _need_bridge(self) -> HostBridge:
        if self._bridge is None:
            raise RuntimeError("this context is not connected to a host")
        return self._bridge

    def __repr__(self) -> str:
        return (
            f"CallContext(call_id={self.call_id}, command={self.command!r}, "
            f"worker_id={self.worker_id}, session_id={self.session_id!r})"
        )
