"""The worker process: ``python -m snakepool.workers``. One pipeline::

    host --pipe--> Scheduler (leader thread: os.read)            _scheduler.py
                   -> Worker.decode: Connection.receive_data -> messages
                   -> Worker.dispatch: a call is checked and queued (FIFO),
                      or runs in the lane; control messages act at once
                   -> Calls: the call's body runs (a scheduler thread for
                      a sync handler, a loop task for an async one)  _calls.py
                   -> its outcome, one answer: Result | Items, End | Failure
                   -> Worker.send: Connection.send_parts -> FrameWriter
                                                        --pipe--> host   _stdio.py

Beside it: sessions cached for calls (``SessionCache``, _sessions.py), calls
back to the host (``HostBridge``, _bridge.py), log records forwarded
(_logging.py). Pings are answered by the event loop (main thread), so a loop
blocked by an async handler is noticed. The worker exits when its protocol
stdin closes and (on Linux) when its parent dies, via ``PR_SET_PDEATHSIG``.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import functools
import logging
import os
import sys
import threading
import traceback
from collections.abc import Callable, Coroutine
from typing import Any

from .. import protocol as p
from ..adapters import Adapter, CallContext, CommandSpec, load_adapter_class
from ._bridge import HostBridge
from ._calls import Calls, LaneCall, Running, keyword_arguments, mode_problem, type_name
from ._descendants import become_subreaper
from ._isolation import apply_from_env as apply_isolation
from ._logging import install_log_forwarding
from ._scheduler import Scheduler
from ._sessions import SessionCache
from ._stdio import (
    EXIT_INTERNAL_ERROR as EXIT_INTERNAL_ERROR,
)
from ._stdio import (
    EXIT_OK,
    EXIT_PROTOCOL_ERROR,
    EXIT_STARTUP_FAILED,
    FrameWriter,
    claim_stdio,
    die_with_parent,
    flush_and_exit,
)
from ._stdio import (
    flush_std_streams as flush_std_streams,
)
from ._tracing import in_trace

__all__ = ["current_worker", "main"]

_log = logging.getLogger("snakepool.worker")


def main() -> None:
    """Entry point of ``python -m snakepool.workers``."""
    proto_in, proto_out = claim_stdio()
    apply_isolation()  # the pool's limits, user, network...: still one thread, no adapter
    die_with_parent()  # (after it: a change of user clears PR_SET_PDEATHSIG)
    become_subreaper()  # a handler's setsid()/double-forked children stay ours
    faulthandler.enable(file=sys.stderr, all_threads=True)
    try:
        code = asyncio.run(_serve(proto_in, proto_out))
    except KeyboardInterrupt:
        code = EXIT_OK
    flush_and_exit(code)


_current: Worker | None = None


def current_worker() -> Worker | None:
    """The running worker of this process (for diagnostics and tests)."""
    return _current


async def _serve(proto_in: int, proto_out: int) -> int:
    global _current
    loop = asyncio.get_running_loop()
    worker = _current = Worker(loop)
    worker.writer = FrameWriter(proto_out)
    worker.threads = Scheduler(worker, proto_in)
    worker.threads.start()
    return await worker.finished


class Worker:
    """Dispatches protocol messages to the adapter's commands."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.conn = p.Connection(p.Role.WORKER)
        self.writer: FrameWriter | None = None
        self.finished: asyncio.Future[int] = loop.create_future()
        self.adapter: Adapter | None = None
        self.commands: dict[str, CommandSpec] = {}
        # The lane's commands (sync, not streams): bound handler, spec.
        self._lane_commands: dict[str, tuple[Callable[..., Any], CommandSpec]] = {}
        self.sessions = SessionCache()
        self.calls = Calls(self.send, self._restore)
        self.running = self.calls.running  # (every call in progress, by id)
        self.bridge = HostBridge(self.send, loop, self._call_soon)
        self.threads: Scheduler | None = None
        self.init: p.Init | None = None
        self.log = _log
        self._closing = False

    # --- receiving ---------------------------------------------------------

    def receive(self, data: bytes | bytearray | memoryview) -> None:
        """Handle bytes read from the host (``b""``: stdin closed)."""
        self.dispatch(self.decode(data))

    def decode(self, data: bytes | bytearray | memoryview) -> list[p.Message]:
        """The messages in ``data``; at the end of stdin or on a protocol error,
        what came before it, and the worker begins to shut down."""
        if self._closing:
            return []
        try:
            messages = self.conn.receive_data(data)
        except p.ReceiveError as exc:
            self.dispatch(exc.received)  # (what came before the bad frame, as before it)
            print(f"snakepool worker: protocol error from host: {exc}", file=sys.stderr)
            self._begin_shutdown(EXIT_PROTOCOL_ERROR, f"protocol error: {exc}")
            return []
        if not data:
            self.dispatch(messages)
            self._begin_shutdown(EXIT_OK, "stdin closed")
            return []
        return messages

    def dispatch(self, messages: list[p.Message]) -> None:
        for message in messages:
            self.on_message(message)

    def lane_calls(self, messages: list[p.Message]) -> list[LaneCall] | None:
        """The calls of ``messages``, if they are all calls the lane runs.

        The lane runs a sync command that is not a stream, with arguments
        that fit: most calls, with a session or a ``ctx`` or without. The
        reader runs them itself, in order (``Scheduler._run_lane``), with no
        queue entry; a call without a ``ctx`` or a session needs no
        ``running`` record either. None sends ``messages`` the general way,
        through ``dispatch``.
        """
        commands = self._lane_commands
        if not commands or self._closing or not messages:
            return None
        calls: list[LaneCall] = []
        with_ctx: list[tuple[int, p.Call]] = []  # (made once the read is known to be lane calls)
        for call in messages:
            if type(call) is not _CALL_MESSAGE:
                return None
            entry = commands.get(call.command)
            if entry is None or call.mode != _CALL or call.trace:
                return None
            handler, spec = entry
            kwargs = spec.keyword_arguments(call.args)
            if kwargs is None:
                return None  # (the general path explains the mismatch)
            if spec.wants_context or call.session_id is not None:
                with_ctx.append((len(calls), call))
            calls.append((call.id, call.command, handler, kwargs, None))
        body = self.calls.sync_call_body
        for index, message in with_ctx:  # (registered, as a queued call is)
            call_id, command, handler, kwargs, _ = calls[index]
            running = self._register(message, self.commands[command], handler, kwargs, body)
            calls[index] = (call_id, command, handler, running.args, running)
        return calls

    def queued_from_lane(self, entry: LaneCall) -> Running:
        """A call the lane had not started, as a queued call (``start_call``'s)."""
        call_id, command, handler, kwargs, running = entry
        if running is None:
            call = p.Call(id=call_id, command=command, args=kwargs)
            running = self.running[call_id] = Running(
                call, handler, kwargs, None, self.calls.sync_call_body
            )
        return running

    def on_message(self, message: p.Message) -> None:
        if isinstance(message, p.Call):
            self.start_call(message)
        elif isinstance(message, p.Cancel):
            self.cancel_call(message.id)
        elif isinstance(message, p.Withdraw):
            self.withdraw_call(message.id)
        elif isinstance(message, p.Ping):
            # Answered by the event loop: a loop blocked by an async handler shows.
            self._call_soon(self.send, p.Pong(id=message.id))
        elif isinstance(message, p.SessionSync):
            self.sessions.sync(message)
        elif isinstance(message, p.SessionDrop):
            self.sessions.drop(message.session_id)
        elif isinstance(message, p.HostReply | p.HostFailure):
            self.bridge.answered(message)
        elif isinstance(message, p.Credit):
            running = self.running.get(message.id)
            if running is not None and message.n > 0:
                if running.async_credit is not None:
                    self._call_soon(running.grant, message.n)
                else:
                    running.grant(message.n)
        elif isinstance(message, p.Init):
            # Set-up runs on the main thread (some libraries insist); nothing
            # else is read until it is done.
            asyncio.run_coroutine_threadsafe(self.start(message), self.loop).result()

    # --- sending -------------------------------------------------------------

    def send(self, message: p.Message) -> None:
        """Encode and write one message, from any thread.

        ``TypeError``/``ProtocolError`` (unencodable, too large): nothing is written.
        """
        writer = self.writer
        if writer is None or writer.is_closing():
            return
        writer.write(*self.conn.send_parts(message))

    # --- start-up --------------------------------------------------------------

    async def start(self, init: p.Init) -> None:
        self.init = init
        if init.version != p.PROTOCOL_VERSION:
            self._startup_failed(
                "ProtocolError",
                f"host speaks protocol version {init.version}, "
                f"this worker speaks {p.PROTOCOL_VERSION} (snakepool versions differ)",
            )
            return
        try:
            self._apply_sys_path(init.sys_path)
            self.conn.set_max_frame_bytes(init.max_frame_bytes)
            self.log = logging.getLogger(f"snakepool.worker.{init.pool}.{init.worker_id}")
            install_log_forwarding(self.send, self.log)
            cls = load_adapter_class(init.adapter)
            self.adapter = cls()
            self.adapter.setup(dict(init.config))
        except BaseException as exc:  # anything at all: report it, then exit
            traceback.print_exc(file=sys.stderr)
            self._startup_failed(type_name(exc), str(exc), traceback.format_exc())
            return
        self.commands = dict(cls.commands)
        self._lane_commands = {
            name: (getattr(self.adapter, spec.attribute), spec)
            for name, spec in self.commands.items()
            if not (spec.is_async or spec.is_stream)
        }
        if self.threads is not None:
            self.threads.limit = max(1, init.concurrency)
        self.send(
            p.Hello(
                version=p.PROTOCOL_VERSION,
                pid=os.getpid(),
                worker_id=init.worker_id,
                adapter=init.adapter,
                commands=sorted(self.commands),
            )
        )

    def _startup_failed(self, type_name: str, message: str, tb: str = "") -> None:
        self.send(p.StartupFailed(type=type_name, message=message, traceback=tb))
        self._begin_shutdown(EXIT_STARTUP_FAILED, "startup failed", teardown=False)

    @staticmethod
    def _apply_sys_path(entries: list[str]) -> None:
        for entry in reversed(entries):
            if entry in sys.path:
                sys.path.remove(entry)
            sys.path.insert(0, entry)

    # --- calls -----------------------------------------------------------------

    def start_call(self, call: p.Call) -> None:
        spec = self.commands.get(call.command)
        if spec is None or self.adapter is None:
            known = ", ".join(sorted(self.commands))
            self.calls.fail(
                call.id,
                p.FailureKind.UNKNOWN_COMMAND,
                "UnknownCommand",
                f"unknown command {call.command!r}; this adapter has: {known}",
            )
            return
        if call.mode != _CALL or spec.is_stream:  # (a plain call of a plain command fits)
            problem = mode_problem(spec, call.mode)
            if problem:
                self.calls.fail(call.id, p.FailureKind.WRONG_MODE, "TypeError", problem)
                return
        kwargs = spec.keyword_arguments(call.args)
        if kwargs is None:  # not the plain case: let inspect bind (and explain)
            try:
                bound = spec.signature.bind(**call.args)
            except TypeError as exc:
                self.calls.fail(
                    call.id,
                    p.FailureKind.BAD_ARGUMENTS,
                    "TypeError",
                    f"command {call.command!r}: {exc} (signature: {spec.name}{spec.signature})",
                )
                return
            kwargs = keyword_arguments(spec, bound)
        handler = getattr(self.adapter, spec.attribute)
        if call.trace is not None:  # (OpenTelemetry: the host's span is the parent)
            handler = in_trace(
                handler, call.trace, is_async=spec.is_async, is_stream=spec.is_stream
            )
        # A stream may run STREAM_WINDOW items ahead of what the host consumed.
        if spec.is_async:
            # Async calls queue like sync ones (same order, same limit); taking
            # one off the queue starts its task on the loop.
            running = self._register(call, spec, handler, kwargs, self._launch, is_async=True)
            if spec.is_stream:
                running.async_credit = asyncio.Semaphore(p.STREAM_WINDOW)
        elif spec.is_stream:
            running = self._register(call, spec, handler, kwargs, self.calls.sync_stream_body)
            running.thread_credit = threading.Semaphore(p.STREAM_WINDOW)
        else:  # the common case: a plain sync call
            running = self._register(call, spec, handler, kwargs, self.calls.sync_call_body)
        assert self.threads is not None
        self.threads.submit(running)

    def _register(
        self,
        call: p.Call,
        spec: CommandSpec,
        handler: Callable[..., Any],
        kwargs: dict[str, Any],
        body: Callable[[Running], None],
        *,
        is_async: bool = False,
    ) -> Running:
        """The call's record in ``running``, with its ``ctx`` when it has one (or a
        session), set to restore its session first if a restore is pending."""
        ctx = None
        restore = False
        if spec.wants_context or call.session_id is not None:
            ctx, restore = self._context(call)
            if spec.wants_context:
                kwargs = {**kwargs, "ctx": ctx}  # (a copy: call.args stays as sent)
        running = Running(call, handler, kwargs, ctx, body, is_async=is_async)
        if restore:
            running.restore = ctx
        self.running[call.id] = running
        return running

    def _launch(self, running: Running) -> None:
        """Start an async call's task on the loop (its queue slot is held until it ends)."""
        stream = running.async_credit is not None
        calls = self.calls
        body = calls.run_async_stream(running) if stream else calls.run_async(running)
        if not self._call_soon(self._start_task, body, running):
            body.close()  # the loop is gone: we are exiting

    def _context(self, call: p.Call) -> tuple[CallContext, bool]:
        """The call's ``ctx``, and whether its session has a restore pending."""
        assert self.init is not None
        session = self.sessions.get(call.session_id) if call.session_id is not None else None
        ctx = CallContext(
            call_id=call.id,
            command=call.command,
            worker_id=self.init.worker_id,
            session_id=call.session_id,
            session_state=session.state if session is not None else {},
            deadline=(self.loop.time() + call.timeout) if call.timeout else None,
            log=self.log,
            variables=session.view if session is not None else None,
            bridge=self.bridge,
        )
        return ctx, session is not None and session.pending_restore is not None

    def _start_task(self, body: Coroutine[Any, Any, None], running: Running) -> None:
        running.task = self.loop.create_task(body)
        # A task cancelled before its first step never runs its body: answer for it.
        running.task.add_done_callback(functools.partial(self._task_done, running.call))
        if running.cancelled:  # the cancel arrived before the task existed
            running.task.cancel()

    def cancel_call(self, call_id: int) -> None:
        running = self.running.get(call_id)
        if running is None:
            return  # already answered
        if self.threads is not None and self.threads.take_back(call_id) is not None:
            # still waiting: it never starts
            self.calls.finish_error(running.call, asyncio.CancelledError(), "")
            return
        running.cancel()
        self._call_soon(self._cancel_task, running)

    def withdraw_call(self, call_id: int) -> None:
        """The host wants the call back to send elsewhere: only if it has not started."""
        if self.threads is None or self.threads.take_back(call_id) is None:
            return  # started (or answered): it finishes here
        self.calls.fail(
            call_id,
            p.FailureKind.WITHDRAWN,
            "Withdrawn",
            "the host withdrew the call before it started",
        )

    @staticmethod
    def _cancel_task(running: Running) -> None:
        if running.task is not None:
            running.task.cancel()

    # sync handlers run on the leader/follower threads and write their own outcome.

    # --- sessions and the host bridge -------------------------------------------

    def _restore(self, ctx: CallContext) -> None:
        self.sessions.restore_if_needed(ctx, self.adapter)

    def _call_soon(self, fn: Callable[..., None], *args: Any) -> bool:
        """Run ``fn(*args)`` on the loop; false if the loop is gone (we are exiting)."""
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:
            return False
        return True

    # async handlers run as tasks on this loop.

    def _task_done(self, call: p.Call, task: asyncio.Task[Any]) -> None:
        if call.id in self.running:
            self.calls.finish_error(call, asyncio.CancelledError(), "")
        if self.threads is not None:
            self.threads.release()

    # --- shutdown --------------------------------------------------------------

    def _begin_shutdown(self, code: int, reason: str, *, teardown: bool = True) -> None:
        if self._closing:
            return
        self._closing = True
        if self.threads is not None:
            for job in self.threads.drain():  # queued, never started
                self.calls.finish_error(job.call, asyncio.CancelledError(), "")
        self._call_soon(self._start_shutdown, code, reason, teardown)

    def _start_shutdown(self, code: int, reason: str, teardown: bool) -> None:
        self.loop.create_task(self._shutdown(code, reason, teardown))

    async def _shutdown(self, code: int, reason: str, teardown: bool) -> None:
        for running in list(self.running.values()):
            running.cancel()
            if running.task is not None:
                running.task.cancel()
        if teardown and self.adapter is not None:
            try:
                self.adapter.teardown()
            except Exception:
                traceback.print_exc(file=sys.stderr)
        if code == EXIT_OK:
            with contextlib.suppress(Exception):
                self.send(p.Goodbye(reason=reason))
        if not self.finished.done():
            self.finished.set_result(code)


#: (the lane's test, read per message)
_CALL = p.CallMode.CALL
_CALL_MESSAGE = p.Call
