"""Host tools: functions of the host that worker code calls back
(``ctx.call_host(name, args)``), and the protocol's own tool behind
``ctx.save_state``. Each ``HostCall`` runs as a task of the pool's background
group; its answer (``HostReply`` or ``HostFailure``) goes back to the worker
that asked. A tool that fails (or is not registered) fails only that call
in the worker; nothing a tool does ends the pool.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import anyio

from .. import protocol as p
from ..errors import ProtocolError, UnknownTool, wire_type_name
from ._runner import BackgroundTasks
from ._session import SessionManager
from ._worker import WorkerHandle

__all__ = ["HostTools"]


class HostTools:
    """The tools registered with one pool, and the tasks that run them."""

    def __init__(self, background: BackgroundTasks, sessions: SessionManager) -> None:
        self._background = background
        self._sessions = sessions
        self._tools: dict[str, Callable[..., Any]] = {}

    def register(self, name: str, fn: Callable[..., Any]) -> None:
        """Let worker code call ``fn(**args)`` with ``ctx.call_host(name, args)``.

        ``fn`` may be sync (it runs in a thread) or async. Registering a name
        again replaces the tool.
        """
        if not isinstance(name, str) or not name or name.startswith(p.RESERVED_TOOL_PREFIX):
            raise ValueError(
                "tool name must be a non-empty str not starting with "
                f"{p.RESERVED_TOOL_PREFIX!r}, got {name!r}"
            )
        if not callable(fn):
            raise TypeError(f"tool {name!r} must be callable, got {type(fn).__name__}")
        self._tools[name] = fn

    def on_host_call(self, worker: WorkerHandle, message: p.HostCall) -> None:
        if self._background.running:
            self._background.group.start_soon(self._run_tool, worker, message)

    async def _run_tool(self, worker: WorkerHandle, message: p.HostCall) -> None:
        failure: BaseException
        try:
            value = await self._call_tool(worker, message)
        except anyio.get_cancelled_exc_class():
            raise
        except BaseException as exc:  # SystemExit from a tool too: the pool goes on
            failure = exc
        else:
            try:
                worker.post_message(p.HostReply(id=message.id, value=value))
                return
            except TypeError as exc:  # (the encoder's: the result cannot be packed)
                failure = TypeError(f"result of host tool {message.tool!r} is {exc}")
            except ProtocolError as exc:  # (too large)
                failure = exc
        worker.post_message(
            p.HostFailure(id=message.id, type=wire_type_name(type(failure)), message=str(failure))
        )

    async def _call_tool(self, worker: WorkerHandle, message: p.HostCall) -> Any:
        if message.tool == p.SAVE_STATE_TOOL:
            call = worker.pending.get(message.call_id)
            if call is None or call.session_id is None:
                raise LookupError("save_state() outside a session call")
            state_version = await self._sessions.store.save_state(
                call.session_id, message.args["key"], message.args["value"]
            )
            self._sessions.saved_state(worker, call.session_id, state_version)
            return None
        fn = self._tools.get(message.tool)
        if fn is None:
            known = ", ".join(sorted(self._tools)) or "none"
            raise UnknownTool(
                f"no host tool named {message.tool!r} is registered (registered: {known})"
            )
        if inspect.iscoroutinefunction(fn):
            return await fn(**message.args)
        result = await anyio.to_thread.run_sync(functools.partial(fn, **message.args))
        if inspect.isawaitable(result):
            return await result
        return result
