"""Running one call in the worker, and answering for it.

A call is a :class:`Running` while it is queued or runs: what runs it (its
*body*: sync call, sync stream, or starting an async task), what to cancel,
and its stream credit. :class:`Calls` holds the bodies and turns every
outcome into exactly one answer to the host: ``Result``, ``Item``s then
``End``, or ``Failure`` (a handler's exception, a cancellation, a value that
cannot be encoded). An answer is sent once: whoever takes the call out of
``running`` answers it.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import threading
import traceback
from collections.abc import AsyncIterator, Callable, Generator
from typing import Any

from .. import protocol as p
from ..adapters import CallContext, CommandSpec
from ..errors import ProtocolError
from ._isolation import exit_if_crossed

__all__ = ["Calls", "LaneCall", "Running", "keyword_arguments", "mode_problem", "type_name"]

#: A call the reader runs itself (the scheduler's lane): its id, command, handler
#: and keyword arguments; and, for a call with a ``ctx`` or a session, its
#: ``Running`` (registered, so a cancel reaches its ``ctx``), else None.
LaneCall = tuple[int, str, Callable[..., Any], dict[str, Any], "Running | None"]
_SHORT_MESSAGE = 500  # characters of a failure message that did not fit in a frame


class Running:
    """A call in progress: what runs it, what to cancel, and its stream credit.

    A sync call is queued on the threads as its ``Running`` (calling it runs
    ``body``). ``ctx`` is made only when the handler takes one or the call
    belongs to a session: a plain call has nobody to hand it to.
    """

    __slots__ = (
        "_cancelled",
        "args",
        "async_credit",
        "body",
        "call",
        "ctx",
        "handler",
        "is_async",
        "restore",
        "task",
        "thread_credit",
    )

    def __init__(
        self,
        call: p.Call,
        handler: Callable[..., Any],
        args: dict[str, Any],
        ctx: CallContext | None,
        body: Callable[[Running], None],
        *,
        is_async: bool = False,
    ) -> None:
        self.call = call
        self.handler = handler
        self.args = args  # the handler's keyword arguments
        self.ctx = ctx
        self.body = body  # runs the call (sync), or starts its task (async)
        self.is_async = is_async
        #: Its ``ctx`` when its session had a restore pending as it was read:
        #: ``restore_session`` runs first (once per session: see SessionCache).
        self.restore: CallContext | None = None
        self.task: asyncio.Task[Any] | None = None
        self._cancelled = False
        self.thread_credit: threading.Semaphore | None = None
        self.async_credit: asyncio.Semaphore | None = None

    def __call__(self) -> None:
        self.body(self)

    @property
    def cancelled(self) -> bool:
        ctx = self.ctx
        return ctx.cancelled if ctx is not None else self._cancelled

    def cancel(self) -> None:
        self._cancelled = True
        if self.ctx is not None:
            self.ctx.cancel()

    def grant(self, n: int) -> None:
        if self.thread_credit is not None:
            self.thread_credit.release(n)
        elif self.async_credit is not None:
            for _ in range(n):
                self.async_credit.release()


class Calls:
    """The calls of one worker in progress, their bodies and their answers."""

    def __init__(
        self, send: Callable[[p.Message], None], restore: Callable[[CallContext], None]
    ) -> None:
        self.running: dict[int, Running] = {}
        self._send = send
        #: restore_session, before a moved session's first call (the lane calls it too)
        self.restore = restore

    # sync handlers run on the scheduler's threads and write their own outcome.

    def sync_call_body(self, running: Running) -> None:
        call = running.call
        try:
            if running.restore is not None:
                self.restore(running.restore)
            value = running.handler(**running.args)
        except BaseException as exc:
            self.finish_error(call, exc, traceback.format_exc())
        else:
            self.finish_value(call, value)  # written from this thread

    def sync_stream_body(self, running: Running) -> None:
        call, credit = running.call, running.thread_credit
        assert credit is not None
        try:
            if running.restore is not None:
                self.restore(running.restore)
            generator: Generator[Any, None, None] = running.handler(**running.args)
            try:
                for item in generator:
                    while not credit.acquire(timeout=0.05) and not running.cancelled:
                        pass  # the host has not consumed enough yet
                    if running.cancelled:
                        break
                    # Written before the next item is made: items a crash would
                    # lose never pile up unsent, and a slow host slows the
                    # generator down instead of growing our memory.
                    self.send_item(call, item)
                    if call.id not in self.running:
                        break  # the item could not be encoded: the call already failed
            finally:
                generator.close()
        except BaseException as exc:
            self.finish_error(call, exc, traceback.format_exc())
        else:
            self.finish_stream(call)

    # async handlers run as tasks on the worker's loop.

    async def run_async(self, running: Running) -> None:
        call = running.call
        try:
            if running.restore is not None:
                self.restore(running.restore)
            value = await running.handler(**running.args)
        except BaseException as exc:
            self.finish_error(call, exc, traceback.format_exc())
        else:
            self.finish_value(call, value)

    async def run_async_stream(self, running: Running) -> None:
        call, credit = running.call, running.async_credit
        assert credit is not None
        try:
            if running.restore is not None:
                self.restore(running.restore)
        except BaseException as exc:
            self.finish_error(call, exc, traceback.format_exc())
            return
        generator: AsyncIterator[Any] = running.handler(**running.args)
        try:
            async for item in generator:
                await credit.acquire()
                self.send_item(call, item)
                if self.running.get(call.id) is None:
                    break  # an item failed to encode; the call already failed
        except BaseException as exc:
            self.finish_error(call, exc, traceback.format_exc())
        else:
            self.finish_stream(call)
        finally:
            with contextlib.suppress(BaseException):
                await generator.aclose()  # type: ignore[attr-defined]

    # outcomes --------------------------------------------------------------------

    def finish_value(self, call: p.Call, value: Any) -> None:
        if self.running.pop(call.id, None) is not None:  # (else answered: cancelled at shutdown)
            self.answer_value(call.id, call.command, value)

    def answer_value(self, call_id: int, command: str, value: Any) -> None:
        try:
            self._send(p.Result(call_id, value))
        except (TypeError, ProtocolError) as exc:
            self._send_unencodable(call_id, command, "result", value, exc)

    def send_item(self, call: p.Call, item: Any) -> None:
        if call.id not in self.running:
            return
        try:
            self._send(p.Item(id=call.id, value=item))
        except (TypeError, ProtocolError) as exc:
            running = self.take(call.id)
            if running is not None:
                running.cancel()
            self._send_unencodable(call.id, call.command, "stream item", item, exc)

    def finish_stream(self, call: p.Call) -> None:
        if self.take(call.id) is not None:
            self._send(p.End(id=call.id))

    def finish_error(self, call: p.Call, exc: BaseException, tb: str) -> None:
        running = self.take(call.id)
        if running is not None:
            self.report_error(call.id, call.command, exc, tb, cancelled=running.cancelled)

    def report_error(
        self, call_id: int, command: str, exc: BaseException, tb: str, *, cancelled: bool = False
    ) -> None:
        """Answer a call that raised ``exc`` (``cancelled``: the host had cancelled it)."""
        exit_if_crossed(exc)  # a limit of the pool's `limits`: the worker ends, unanswered
        if isinstance(exc, asyncio.CancelledError) or (
            cancelled and isinstance(exc, GeneratorExit)
        ):
            self.fail(
                call_id,
                p.FailureKind.CANCELLED,
                "Cancelled",
                f"call {command!r} was cancelled by the host",
                take=False,
            )
            return
        self.fail(call_id, p.FailureKind.APPLICATION, type_name(exc), describe(exc), tb, take=False)

    def _send_unencodable(
        self, call_id: int, command: str, what: str, value: Any, exc: Exception
    ) -> None:
        if isinstance(exc, ProtocolError):
            message = f"{what} of command {command!r} is too large to send: {exc}"
            type_name = "ValueError"
        else:
            message = (
                f"{what} of command {command!r} is not MessagePack-serializable: "
                f"{type(value).__name__} value ({exc})"
            )
            type_name = "TypeError"
        self.fail(call_id, p.FailureKind.SERIALIZATION, type_name, message, take=False)

    def fail(
        self,
        call_id: int,
        kind: str,
        type_name: str,
        message: str,
        tb: str = "",
        *,
        take: bool = True,
    ) -> None:
        if take:
            self.take(call_id)
        try:
            self._send(
                p.Failure(id=call_id, kind=kind, type=type_name, message=message, traceback=tb)
            )
        except (TypeError, ProtocolError):  # over max_frame_bytes: say less, but say it
            short = message[:_SHORT_MESSAGE] + (
                " [...truncated]" if len(message) > _SHORT_MESSAGE else ""
            )
            self._send(p.Failure(id=call_id, kind=kind, type=type_name, message=short))

    def take(self, call_id: int) -> Running | None:
        return self.running.pop(call_id, None)


def describe(exc: BaseException) -> str:
    """``str(exc)``, even for an exception whose ``__str__`` raises."""
    try:
        return str(exc)
    except Exception as inner:
        return f"<str() of this {type(exc).__name__} raised {type(inner).__name__}>"


def keyword_arguments(spec: CommandSpec, bound: inspect.BoundArguments) -> dict[str, Any]:
    """The bound arguments as keywords, a ``**kwargs`` parameter flattened into them."""
    kwargs: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        if spec.signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            kwargs.update(value)
        else:
            kwargs[name] = value
    return kwargs


def mode_problem(spec: CommandSpec, mode: str) -> str | None:
    if mode not in p.CallMode.ALL:
        return f"unknown call mode {mode!r}"
    if spec.is_stream and mode != p.CallMode.STREAM:
        return (
            f"command {spec.name!r} is a stream (a generator): use pool.stream(), not pool.call()"
        )
    if not spec.is_stream and mode == p.CallMode.STREAM:
        return f"command {spec.name!r} is not a stream: use pool.call(), not pool.stream()"
    return None


def type_name(exc: BaseException) -> str:
    cls = type(exc)
    if cls.__module__ == "builtins":
        return cls.__qualname__
    # (a class of __main__ came from the host's script, pickled by value for
    # snakepool.Executor: "__main__.Name" is what the host resolves it as)
    return f"{cls.__module__}.{cls.__qualname__}"
