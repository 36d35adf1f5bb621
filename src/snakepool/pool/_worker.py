"""The host's handle on one worker process.

A handle owns the subprocess and three tasks: the *reader* (stdout -> protocol
-> pending calls), the *writer* (outbox -> stdin, batching whatever frames
queued up meanwhile) and the *stderr pump* (lines -> host logging, and a tail
kept for crash reports). The reader owns the worker's death: when stdout ends
or breaks the protocol it makes sure the process is gone, reaps it, fails the
calls still in flight and tells the pool, exactly once.

Everything that decides (register a call, free a slot) is synchronous; only
the pipe I/O awaits.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import fcntl
import itertools
import logging
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.abc
import psutil

from .. import protocol as p
from ..errors import (
    PoolClosed,
    ProtocolError,
    ResourceExceeded,
    SnakepoolError,
    WorkerCrashed,
    WorkerStartError,
    describe_exit_code,
)
from ._backend import running_on_asyncio
from ._calls import PendingCall, failure_to_exception
from ._isolation import LimitWatch, limit_watch
from ._launch import WorkerLaunch as WorkerLaunch
from ._lines import LineSplitter
from ._pacing import Pacing
from ._template import ForkedProcess, TemplateUnavailable, WorkerTemplate

__all__ = ["READY_STATES", "ExitInfo", "WorkerHandle", "WorkerLaunch", "WorkerState"]

_READ_CHUNK = 256 * 1024
_STDERR_TAIL_LINES = 40
_STDERR_SETTLE = 1.0  # seconds to let stderr finish after the worker died
_STDOUT_CLOSED_GRACE = 2.0  # a worker that closed stdout but lives on is killed after this
_STDOUT_AFTER_EXIT = 1.0  # a worker that exited while a child holds its stdout: then EOF is ours


class WorkerState(enum.StrEnum):
    STARTING = "starting"
    IDLE = "idle"
    BUSY = "busy"
    STOPPING = "stopping"
    EXITED = "exited"


#: States of a worker that takes calls.
READY_STATES = frozenset({WorkerState.IDLE, WorkerState.BUSY})


@dataclass(frozen=True, slots=True)
class ExitInfo:
    """How a worker ended."""

    exit_code: int | None
    planned: bool  # announced with Goodbye, or stopped by the pool
    reason: str
    stderr_tail: str
    lifetime: float


class WorkerHandle:
    """One worker process, seen from the host."""

    def __init__(
        self,
        *,
        pool: str,
        slot: int,
        restarts: int,
        concurrency: int,
        gpu: int | None,
        on_capacity: Callable[[WorkerHandle], None],
        on_exit: Callable[[WorkerHandle], None],
        on_host_call: Callable[[WorkerHandle, p.HostCall], None] | None = None,
        on_unstarted: Callable[[PendingCall], None] | None = None,
        template: WorkerTemplate | None = None,
        ahead: int = 0,
        pacing: Pacing | None = None,
    ) -> None:
        self.pool = pool
        self.slot = slot
        self.restarts = restarts
        self.concurrency = concurrency
        #: How deep this worker's pipeline of calls sent ahead is (see Pacing).
        self.pacing = pacing if pacing is not None else Pacing(concurrency, ahead)
        #: Calls that may wait in the worker beyond the ``concurrency`` it
        #: runs (sent ahead, so it never idles between calls); see Dispatcher.
        #: ``pacing.ahead``, copied by ``_answered`` whenever it changes: a plain
        #: attribute because the dispatcher reads it for every worker it
        #: considers on the fast path (a property reading ``pacing.ahead``
        #: costs a call per read there: 45 ns against 14 ns, CPython 3.11).
        self.ahead = self.pacing.ahead
        self.gpu = gpu
        self.state = WorkerState.STARTING
        self.pid: int | None = None
        self.requests = 0
        self.pending: dict[int, PendingCall] = {}
        self.reserved = 0  # slots promised to queued callers not yet submitted
        self.exit_info: ExitInfo | None = None
        self.exited = anyio.Event()
        self.hello: p.Hello | None = None
        self.log = logging.getLogger(f"snakepool.worker.{pool}.{slot}")
        self._on_capacity = on_capacity
        self._on_exit = on_exit
        self._on_host_call = on_host_call
        self._on_unstarted = on_unstarted
        self._template = template  # fork from it (start_method), if it is alive
        # session id -> (variables version, state version) this worker has seen
        self.sessions: dict[str, tuple[int, int]] = {}
        self._conn = p.Connection(p.Role.HOST)
        self._process: anyio.abc.Process | ForkedProcess | None = None
        self._outbox_in, self._outbox_out = anyio.create_memory_object_stream[bytes | None](
            math.inf
        )
        self._ready = anyio.Event()
        self._startup_failure: p.StartupFailed | None = None
        self._stderr_tail: collections.deque[str] = collections.deque(maxlen=_STDERR_TAIL_LINES)
        self._stderr_done = anyio.Event()
        self._early_lines: list[str] = []  # its output before hello (see _stderr_line)
        self._stdout_ended = anyio.Event()  # the stdout pump is done (EOF, or made to end)
        self._kill_reason: str | None = None
        self._planned_reason: str | None = None
        self._protocol_error: ProtocolError | None = None
        self._started_at = time.monotonic()
        self._cancel_scope = anyio.CancelScope()
        self._psutil: psutil.Process | None = None
        self._reaping = False
        self._direct: asyncio.WriteTransport | None = None  # asyncio: the stdin pipe
        self._stdout_reader: _StdoutReader | None = None  # asyncio: decodes in callbacks
        self._stdout_transport: asyncio.BaseTransport | None = None
        self._stderr_transport: asyncio.BaseTransport | None = None
        self._unsent: list[bytes] = []  # frames of this event-loop turn, written at its end
        self._stop_requested = False
        self._run_started = False
        self._kill_error: type[SnakepoolError] = WorkerCrashed
        self._retiring: str | None = None
        # Recycling limits, set by the pool with jitter (max_requests, worker_ttl).
        self.request_limit: int | None = None
        self.ttl_limit: float | None = None
        self._memory_checked_at = 0.0
        self._limits: LimitWatch | None = None  # the pool's `limits` (isolation), if any
        self.limit_crossed: str | None = None  # the one that ended this worker
        self._pings: dict[int, anyio.Event] = {}
        self._answered_in_read = 0  # calls the read being handled answered (see _take)
        self._ping_ids = itertools.count(1)

    # --- facts -----------------------------------------------------------------

    @property
    def load(self) -> int:
        return len(self.pending) + self.reserved

    @property
    def load_if_ready(self) -> int:
        """``load`` of a worker that takes calls, -1 for one that does not."""
        if self.state in READY_STATES:
            return len(self.pending) + self.reserved
        return -1

    @property
    def has_capacity(self) -> bool:
        return self.state in READY_STATES and len(self.pending) + self.reserved < self.concurrency

    @property
    def is_ready(self) -> bool:
        return self.state in READY_STATES

    def rss_bytes(self) -> int | None:
        """Resident memory of the worker and its children (psutil)."""
        if self._psutil is None or self.state is WorkerState.EXITED:
            return None
        try:
            total = int(self._psutil.memory_info().rss)
            for child in self._psutil.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    total += int(child.memory_info().rss)
            return total
        except psutil.Error:
            return None

    @property
    def age(self) -> float:
        return time.monotonic() - self._started_at

    def memory_check_due(self, interval: float) -> bool:
        """True at most once per ``interval`` seconds (the check walks /proc)."""
        now = time.monotonic()
        if now - self._memory_checked_at < interval:
            return False
        self._memory_checked_at = now
        return True

    def stderr_tail(self) -> str:
        return "\n".join(self._stderr_tail)

    def describe(self) -> str:
        return f"worker {self.pool}/{self.slot} (pid {self.pid})"

    # --- start-up --------------------------------------------------------------

    async def run(self, launch: WorkerLaunch, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        """Start the process and serve it until it exits (a pool task).

        ``task_status.started()`` fires once the process exists; use
        :meth:`wait_ready` for the handshake.
        """
        if self.exit_info is not None:  # stopped before this task even began
            task_status.started()
            return
        self._run_started = True
        try:
            with self._cancel_scope:
                await self._serve(launch, task_status)
        finally:
            # However it ended (even cancelled before the process existed),
            # reap and announce the exit exactly once, so nobody waits forever.
            with anyio.CancelScope(shield=True):
                if self._process is not None:
                    await self._reap()
                else:
                    self._never_started()

    async def _serve(self, launch: WorkerLaunch, task_status: anyio.abc.TaskStatus[None]) -> None:
        try:
            with anyio.CancelScope(shield=True):  # a half-spawned process would be an orphan
                if running_on_asyncio():
                    process = await self._open_with_pipes(launch)
                else:
                    pipe = subprocess.PIPE
                    process = await _spawn(launch, pipe, pipe, pipe)
        except OSError as exc:
            self._startup_failure = p.StartupFailed(
                type=type(exc).__name__, message=f"cannot start {launch.argv[0]!r}: {exc}"
            )
            task_status.started()
            return
        self._process = process
        self.pid = process.pid
        self._limits = limit_watch(launch.env)
        with contextlib.suppress(psutil.Error):
            self._psutil = psutil.Process(self.pid)
        self._conn.set_max_frame_bytes(launch.max_frame_bytes)
        self.post(self._conn.send(launch.init))
        if self._stop_requested:  # stop() came before the process existed
            self.kill("stopped during start-up")
        task_status.started()
        async with anyio.create_task_group() as tg:
            if self._direct is None:  # (on asyncio, callbacks serve stdin and stderr)
                tg.start_soon(self._pump_stderr)
                tg.start_soon(self._pump_stdin)
            tg.start_soon(self._watch_exit, process)
            await self._pump_stdout()
            tg.cancel_scope.cancel()

    async def _watch_exit(self, process: anyio.abc.Process | ForkedProcess) -> None:
        """End the stdout pump once the process has exited, EOF or not.

        A handler's child may hold the worker's stdout open (one forked at C
        level, which Python's at-fork hook that closes the pipes never sees):
        the pipe then never reaches EOF, and the worker's death is seen from
        the process itself. What it wrote before it exited is read first.
        """
        await process.wait()
        with anyio.move_on_after(_STDOUT_AFTER_EXIT):
            await self._stdout_ended.wait()
        if self._stdout_ended.is_set():
            return
        self.log.warning("%s exited but its stdout is still open (held by a child)", self)
        if self._stdout_reader is not None:
            self._stdout_reader.eof_received()
        elif isinstance(process, anyio.abc.Process) and process.stdout is not None:
            await process.stdout.aclose()  # the pump reads EOF

    async def _open_with_pipes(self, launch: WorkerLaunch) -> anyio.abc.Process | ForkedProcess:
        """asyncio fast path: the worker's pipes are ours, served by callbacks.

        Frames go straight into the stdin pipe's transport (buffered, never
        blocking) and replies are decoded in ``data_received``: no pump task
        and no stream object in between, which saves event-loop turns per call.
        The worker is forked from the pool's template when it has one (a
        preloaded pool), else spawned. Other backends use anyio's process
        streams and the pump tasks.
        """
        loop = asyncio.get_running_loop()
        child_stdin, to_worker = os.pipe()  # os.pipe fds are not inherited (PEP 446)
        from_worker, child_stdout = os.pipe()
        from_stderr, child_stderr = os.pipe()
        for fd in (to_worker, from_worker):
            _enlarge_pipe(fd)
        ours = [to_worker, from_worker, from_stderr]
        try:
            try:
                process = await self._start_process(launch, child_stdin, child_stdout, child_stderr)
            finally:
                for fd in (child_stdin, child_stdout, child_stderr):
                    os.close(fd)
            reader = self._stdout_reader = _StdoutReader(self)
            self._stdout_transport, _ = await loop.connect_read_pipe(
                lambda: reader, os.fdopen(from_worker, "rb", buffering=0)
            )
            ours.remove(from_worker)
            self._stderr_transport, _ = await loop.connect_read_pipe(
                lambda: _StderrReader(self), os.fdopen(from_stderr, "rb", buffering=0)
            )
            ours.remove(from_stderr)
            transport, _ = await loop.connect_write_pipe(
                asyncio.Protocol, os.fdopen(to_worker, "wb", buffering=0)
            )
            ours.remove(to_worker)
            # (no isinstance check: uvloop's pipe transports do not subclass asyncio's)
            self._direct = transport
            return process
        finally:
            for fd in ours:
                os.close(fd)

    async def _start_process(
        self, launch: WorkerLaunch, stdin: int, stdout: int, stderr: int
    ) -> anyio.abc.Process | ForkedProcess:
        template = self._template
        if template is not None and template.alive:
            try:
                if template.warm:
                    return await template.spawn(launch.env, stdin, stdout, stderr)
                return await template.spawn(
                    launch.env, stdin, stdout, stderr, argv=launch.argv, cwd=launch.cwd
                )
            except TemplateUnavailable as exc:
                self.log.warning("the pool's template cannot fork (%s): spawning instead", exc)
        return await _spawn(launch, stdin, stdout, stderr)

    def _never_started(self) -> None:
        if self.exit_info is not None:
            return
        failure = self._startup_failure
        self.exit_info = ExitInfo(
            exit_code=None,
            planned=self._stop_requested,
            reason=f"{failure.type}: {failure.message}" if failure else "never started",
            stderr_tail="",
            lifetime=0.0,
        )
        self.state = WorkerState.EXITED
        self._ready.set()
        self.exited.set()

    async def wait_ready(self, timeout: float) -> None:
        """Wait for the handshake; ``WorkerStartError`` (stderr quoted) if it fails."""
        with anyio.move_on_after(timeout) as scope:
            await self._ready.wait()
        if scope.cancelled_caught:
            self.kill(f"no handshake within startup_timeout={timeout:g}s")
            await self.exited.wait()
            raise WorkerStartError(
                f"{self.describe()} did not finish starting within {timeout:g}s",
                stderr_tail=self.stderr_tail(),
            )
        if self.hello is not None:
            return
        await self.exited.wait()  # so that the stderr tail is complete
        failure = self._startup_failure
        if failure is not None:
            message = f"{self.describe()} failed to start: {failure.type}: {failure.message}"
        else:
            info = self.exit_info
            message = f"{self.describe()} exited during start-up"
            if info is not None and info.exit_code is not None:
                message += f" ({describe_exit_code(info.exit_code)})"
            if self._protocol_error is not None:
                message += f": {self._protocol_error}"
        raise WorkerStartError(message, stderr_tail=self.stderr_tail())

    # --- sending -----------------------------------------------------------------

    def post(self, frame: bytes, *, batch: bool = False) -> None:
        """Queue one frame for the worker (never blocks).

        On asyncio, ``batch=True`` frames (calls for a worker that is busy
        anyway) are collected and go out in one write at the end of this
        event-loop turn: a pipe write that wakes the worker costs more than
        the call itself, so 64 callers must not make 64 of them. Other frames
        are written at once, after any collected ones (order is kept).
        """
        direct = self._direct
        if direct is not None:
            unsent = self._unsent
            if batch or unsent:
                unsent.append(frame)
                if len(unsent) == 1:
                    asyncio.get_running_loop().call_soon(self._flush)
            elif not direct.is_closing():
                try:  # noqa: SIM105 (not contextlib.suppress: this runs once per call)
                    direct.write(frame)
                except (RuntimeError, ConnectionError):  # the worker is gone: its reaper reports
                    pass
            return
        with contextlib.suppress(anyio.ClosedResourceError, anyio.BrokenResourceError):
            self._outbox_in.send_nowait(frame)

    def _flush(self) -> None:
        """Write the frames of this turn (asyncio: into the pipe transport's buffer)."""
        direct, unsent = self._direct, self._unsent
        if not unsent or direct is None:
            return
        self._unsent = []
        if direct.is_closing():
            return
        with contextlib.suppress(RuntimeError, ConnectionError):
            direct.write(unsent[0] if len(unsent) == 1 else b"".join(unsent))

    def post_message(self, message: p.Message) -> None:
        """Encode and queue one host message."""
        self.post(self._conn.send(message))

    def submit(self, call: PendingCall, frame: bytes) -> None:
        """Register ``call`` and queue its frame, using the slot reserved for it."""
        self.reserved -= 1
        call.worker = self
        busy = bool(self.pending)  # then the frame would wait in the pipe anyway
        self.post(frame, batch=busy)  # (first: the rest is done while the worker reads)
        self.pending[call.id] = call
        self.requests += 1
        self.state = WorkerState.BUSY
        if self.request_limit is not None and self.requests >= self.request_limit:
            self.retire(f"served max_requests ({self.requests} calls)")

    @property
    def retiring(self) -> str | None:
        """Why the worker is being recycled, if it is."""
        return self._retiring

    def retire(self, reason: str) -> bool:
        """Take no new calls, finish the in-flight ones, then exit (a planned exit).

        Returns false if the worker was already retiring or stopping.
        """
        if self._retiring is not None or not self.is_ready:
            return False
        self._retiring = reason
        self._planned_reason = f"recycled: {reason}"
        self.state = WorkerState.STOPPING
        if not self.pending:
            self.close_stdin()
        return True

    async def ping(self, timeout: float) -> bool:
        """Health check; true if the worker's event loop answered within ``timeout``."""
        ping_id = next(self._ping_ids)
        answered = self._pings[ping_id] = anyio.Event()
        try:
            self.post(self._conn.send(p.Ping(id=ping_id)))
            with anyio.move_on_after(timeout):
                await answered.wait()
            return answered.is_set()
        finally:
            self._pings.pop(ping_id, None)

    def grant(self, call: PendingCall, n: int) -> None:
        """Let stream ``call`` send ``n`` more items (the caller consumed them)."""
        if call.id in self.pending:
            self.post(self._conn.send(p.Credit(id=call.id, n=n)))

    def withdraw(self, call: PendingCall) -> None:
        """Ask for ``call`` back if it has not started (answered ``withdrawn``, then sent
        elsewhere); one that has started just finishes here."""
        if call.id in self.pending and not call.withdrawing:
            call.withdrawing = True
            self.post(self._conn.send(p.Withdraw(id=call.id)))

    def holds_briefly(self) -> bool:
        """The calls it holds beyond those it runs should all start within
        ``AHEAD_HORIZON``, judging by how quickly it answers and how long ago
        it last did: taking one back would not make it start sooner (Pacing)."""
        return self.pacing.holds_briefly(len(self.pending))

    def waits_here(self, call: PendingCall) -> bool:
        """``call`` has surely not started: the worker starts calls in the order
        they arrive, ``concurrency`` at a time, and more are ahead of it."""
        for position, call_id in enumerate(self.pending):
            if call_id == call.id:
                return position >= self.concurrency
        return False

    def cancel(self, call: PendingCall) -> None:
        """The caller left: tell the worker; its answer will be dropped."""
        call.abandoned = True
        if call.id in self.pending:
            self.post(self._conn.send(p.Cancel(id=call.id)))

    def close_stdin(self) -> None:
        """Ask for a graceful exit: the worker sees EOF, tears down and leaves."""
        self._planned_reason = self._planned_reason or "stopped by the pool"
        self.state = WorkerState.STOPPING
        if self._direct is not None:
            self._flush()
            with contextlib.suppress(RuntimeError, ConnectionError):
                self._direct.close()  # flushes what is buffered, then EOF
            return
        with contextlib.suppress(anyio.ClosedResourceError, anyio.BrokenResourceError):
            self._outbox_in.send_nowait(None)

    def kill(self, reason: str, *, error: type[SnakepoolError] = WorkerCrashed) -> None:
        """SIGKILL the worker's whole process group (its children too).

        Its in-flight calls fail with ``error`` (``ResourceExceeded`` for a
        worker over its memory limit, ``WorkerCrashed`` otherwise).
        """
        if self._kill_reason is None:
            self._kill_reason = reason
            self._kill_error = error
        self.signal_group(signal.SIGKILL)

    def signal_group(self, sig: signal.Signals) -> None:
        if self.pid is None or self.exit_info is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)  # pid == pgid: the worker leads its own group

    async def stop(self, grace: float) -> None:
        """Close stdin, then SIGTERM, then SIGKILL, each after ``grace`` seconds.

        A worker still starting is killed at once: it has nothing to drain.
        """
        if self.exit_info is not None:
            return
        self._stop_requested = True
        if not self._run_started:  # never handed to a task: nothing to wait for
            self._never_started()
            return
        if self._process is None:
            self._cancel_scope.cancel()
        elif self.hello is None:
            self.kill("stopped during start-up")
        else:
            self.close_stdin()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with anyio.move_on_after(grace):
                await self.exited.wait()
                return
            self.signal_group(sig)
        await self.exited.wait()

    # --- the three pumps ---------------------------------------------------------

    async def _pump_stdin(self) -> None:
        assert isinstance(self._process, anyio.abc.Process) and self._process.stdin is not None
        stdin = self._process.stdin
        try:
            async for frame in self._outbox_out:
                if frame is None:
                    break
                batch = [frame]
                while True:  # coalesce what queued up meanwhile into one write
                    try:
                        more = self._outbox_out.receive_nowait()
                    except anyio.WouldBlock:
                        break
                    if more is None:
                        await stdin.send(b"".join(batch))
                        await stdin.aclose()
                        return
                    batch.append(more)
                await stdin.send(batch[0] if len(batch) == 1 else b"".join(batch))
            await stdin.aclose()
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass  # the worker is gone; the reader reports it

    async def _pump_stderr(self) -> None:
        assert isinstance(self._process, anyio.abc.Process) and self._process.stderr is not None
        lines = LineSplitter(self._stderr_line)
        try:
            async for chunk in self._process.stderr:
                lines.feed(chunk)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass
        finally:
            lines.close()
            self._stderr_done.set()

    def _stderr_line(self, raw: bytes) -> None:
        line = raw.decode("utf-8", "replace").rstrip("\r")
        self._stderr_tail.append(line)
        if self.hello is None and self.exit_info is None:
            # Held until the worker is up: a worker that fails to start reports
            # its output once, in WorkerStartError's stderr tail, not once per
            # line per attempt. (Flushed by _on_hello.)
            self._early_lines.append(line)
        else:
            self._show_output(line)

    def _show_output(self, line: str) -> None:
        if echoes_output(self.log):  # logging would drop it: as print() in the host would
            echo_to_stderr(f"[{self.pool}/{self.slot}] {line}")
        else:
            self.log.info("%s", line)

    async def _pump_stdout(self) -> None:
        ended = False  # stdout reached its end (or broke the protocol), not cancelled
        try:
            if self._stdout_reader is not None:
                await self._stdout_reader.ended  # data_received does the work
                ended = True
                return
            assert isinstance(self._process, anyio.abc.Process)
            assert self._process.stdout is not None
            stdout = self._process.stdout
            while not ended:
                try:
                    data = await stdout.receive(_READ_CHUNK)
                except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                    data = b""
                ended = self.feed_stdout(data)
        finally:
            self._stdout_ended.set()
            if not ended:  # torn down from outside: nothing left to wait for
                self.kill("the pool stopped serving it")
            if self._stdout_transport is not None:
                self._stdout_transport.close()
            with anyio.CancelScope(shield=True):
                await self._reap()

    @property
    def missing_bytes(self) -> int:
        """Bytes of the worker's current frame not received yet."""
        return self._conn.missing_bytes

    def feed_stdout(self, data: bytes) -> bool:
        """Handle bytes from the worker's stdout; true once it ended or broke the protocol."""
        try:
            messages = self._conn.receive_data(data)
        except p.ReceiveError as exc:
            self._on_messages(exc.received)  # (what came before the bad frame)
            self._protocol_error = ProtocolError(f"{self.describe()} broke the protocol: {exc}")
            self.kill(f"protocol error: {exc}")
            return True
        if messages:
            self._on_messages(messages)
        return not data

    def _on_messages(self, messages: list[p.Message]) -> None:
        """One read's messages, in order; the calls they answered are accounted
        once for the read (one clock reading and one hand-off: see _answered)."""
        self._answered_in_read = 0
        for message in messages:
            self._on_message(message)
        if self._answered_in_read:
            self._answered(self._answered_in_read)

    # --- messages from the worker ------------------------------------------------

    def _on_message(self, message: p.Message) -> None:
        kind = type(message)
        if kind is p.Result:
            assert isinstance(message, p.Result)
            call = self._take(message.id)
            if call is not None:
                call.resolve(message.value)
        elif kind is p.Item:
            assert isinstance(message, p.Item)
            stream = self.pending.get(message.id)
            if stream is not None:
                stream.push(message.value)
        elif kind is p.End:
            assert isinstance(message, p.End)
            call = self._take(message.id)
            if call is not None:
                call.end()
        elif kind is p.Failure:
            assert isinstance(message, p.Failure)
            call = self._take(message.id)
            if call is not None:
                if message.kind == p.FailureKind.WITHDRAWN and self._on_unstarted is not None:
                    self._on_unstarted(call)  # it never started: the pool sends it elsewhere
                    return
                if message.kind == p.FailureKind.CANCELLED and not call.abandoned:
                    # Not cancelled by its caller: the worker is shutting down.
                    call.fail(
                        PoolClosed(
                            f"{self.describe()} stopped before call {call.command!r} finished"
                        )
                    )
                    return
                if call.mode == p.CallMode.CAST:
                    self.log.warning(
                        "cast %r failed: %s: %s", call.command, message.type, message.message
                    )
                call.fail(failure_to_exception(message))
        elif kind is p.Log:
            assert isinstance(message, p.Log)
            self.log.log(message.level, "%s", message.message)
        elif kind is p.Hello:
            assert isinstance(message, p.Hello)
            self._on_hello(message)
        elif kind is p.StartupFailed:
            assert isinstance(message, p.StartupFailed)
            self._startup_failure = message
            self._ready.set()
        elif kind is p.HostCall:
            assert isinstance(message, p.HostCall)
            if self._on_host_call is not None:
                self._on_host_call(self, message)
        elif kind is p.Pong:
            assert isinstance(message, p.Pong)
            answered = self._pings.get(message.id)
            if answered is not None:
                answered.set()
        elif kind is p.Goodbye:
            assert isinstance(message, p.Goodbye)
            self._planned_reason = self._planned_reason or message.reason

    def _on_hello(self, hello: p.Hello) -> None:
        if hello.version != p.PROTOCOL_VERSION:
            self._startup_failure = p.StartupFailed(
                type="ProtocolError",
                message=f"worker speaks protocol version {hello.version}, "
                f"the host {p.PROTOCOL_VERSION}: install the same snakepool in both interpreters",
            )
            self.kill("protocol version mismatch")
        else:
            self.hello = hello
            if self.state is WorkerState.STARTING:
                self.state = WorkerState.IDLE
            early, self._early_lines = self._early_lines, []
            for line in early:
                self._show_output(line)
        self._ready.set()

    def _take(self, call_id: int) -> PendingCall | None:
        """Take call ``call_id`` off ``pending`` (answered: accounted at the end of the read)."""
        call = self.pending.pop(call_id, None)
        if call is not None:
            self._answered_in_read += 1
        return call

    def _answered(self, count: int) -> None:
        """``count`` calls were just answered (taken off ``pending``): pace, free their slots.

        Once per read (``_on_messages``): one clock reading and one hand-off
        for every call the read answered (the hand-off fills every slot it can).
        """
        pacing = self.pacing
        if pacing.limit:  # pace sending ahead (see Pacing.answered)
            self.ahead = pacing.answered(count, len(self.pending))
        if not self.pending:
            if self.state is WorkerState.BUSY:
                self.state = WorkerState.IDLE
            elif self._retiring is not None:
                self.close_stdin()
        self._on_capacity(self)

    # --- death -----------------------------------------------------------------

    async def _reap(self) -> None:
        """Make sure the process is gone, then fail what was in flight (once)."""
        if self._reaping or self._process is None:
            return
        self._reaping = True
        self.state = WorkerState.STOPPING  # from now on no call is routed here
        process = self._process
        with anyio.move_on_after(_STDOUT_CLOSED_GRACE) as waited:
            await process.wait()
        if waited.cancelled_caught:
            self.kill("closed its stdout but did not exit")
        self.signal_group(signal.SIGKILL)  # children of a dead worker go too
        exit_code = await process.wait()
        if self._limits is not None:  # (and its cgroups and scratch directory go: a thread)
            self.limit_crossed = await anyio.to_thread.run_sync(
                self._limits.crossed, self.pid, exit_code
            )
        with anyio.move_on_after(_STDERR_SETTLE):
            await self._stderr_done.wait()
        with contextlib.suppress(Exception):
            await process.aclose()
        if self._stderr_transport is not None:
            self._stderr_transport.close()
        self.exit_info = self._exit_info(exit_code)
        self.state = WorkerState.EXITED
        self._outbox_in.close()
        self._fail_pending(self.exit_info)
        self._ready.set()
        self.exited.set()
        self._on_exit(self)

    def _exit_info(self, exit_code: int | None) -> ExitInfo:
        planned = self._kill_reason is None and self._planned_reason is not None and exit_code == 0
        if self._kill_reason is not None:
            reason = f"killed by the pool: {self._kill_reason}"
        elif planned:
            reason = f"planned exit: {self._planned_reason}"
        elif self.limit_crossed is not None:
            reason = f"crossed limits[{self.limit_crossed!r}]"
        else:
            reason = "crashed"
        return ExitInfo(
            exit_code=exit_code,
            planned=planned,
            reason=reason,
            stderr_tail=self.stderr_tail(),
            lifetime=time.monotonic() - self._started_at,
        )

    def _fail_pending(self, info: ExitInfo) -> None:
        calls, self.pending = list(self.pending.values()), {}
        # Calls behind the first ``concurrency`` ones never started (the worker
        # starts them in order): sent elsewhere instead of failing. Not after a
        # protocol error, where answers may have been lost.
        if self._protocol_error is None and self._on_unstarted is not None:
            for call in calls[self.concurrency :]:
                if call.frame and not call.finished:
                    self._on_unstarted(call)
            calls = [call for call in calls if call.worker is self]
        for call in calls:
            error: SnakepoolError
            if self._protocol_error is not None:
                error = self._protocol_error
            elif info.planned:
                error = PoolClosed(
                    f"{self.describe()} stopped before call {call.command!r} finished"
                )
            elif self._kill_reason is not None and self._kill_error is not WorkerCrashed:
                error = self._kill_error(
                    f"{self.describe()} was killed during call {call.command!r}: {self._kill_reason}"
                )
            elif self.limit_crossed is not None:
                error = ResourceExceeded(
                    f"{self.describe()} crossed limits[{self.limit_crossed!r}] during call "
                    f"{call.command!r}; the pool replaces it",
                    limit=self.limit_crossed,
                )
            else:
                error = WorkerCrashed(
                    f"{self.describe()} died during call {call.command!r}: {info.reason}",
                    exit_code=info.exit_code,
                    stderr_tail=info.stderr_tail,
                )
            call.fail(error)

    def __repr__(self) -> str:
        return (
            f"<WorkerHandle {self.pool}/{self.slot} pid={self.pid} {self.state} load={self.load}>"
        )


def echoes_output(logger: logging.Logger) -> bool:
    """Should worker output meant for ``logger`` go to the host's stderr instead?

    True for a host that never configured logging: no handler anywhere up the
    chain and ``logging.lastResort`` drops INFO, so ``print()`` in a handler
    would vanish. False once the host configured logging (a handler, which
    then gets the line), and False when it silenced it on purpose: a level
    above INFO set on a ``snakepool`` logger, or ``logging.disable``.
    """
    if logger.hasHandlers():
        return False
    last_resort = logging.lastResort
    if last_resort is not None and last_resort.level <= logging.INFO:
        return False
    if logger.manager.disable >= logging.INFO:
        return False
    current: logging.Logger | None = logger
    while current is not None and current is not logging.root:
        if current.level != logging.NOTSET:  # the first level set below the root decides
            return current.level <= logging.INFO
        current = current.parent
    return True


def echo_to_stderr(text: str) -> None:
    """One line of a worker's output on the host's stderr (best effort)."""
    stream = sys.stderr
    if stream is None:  # (pythonw, or closed by the program)
        return
    with contextlib.suppress(Exception):
        stream.write(text + "\n")
        stream.flush()


def format_exit(info: ExitInfo | None) -> dict[str, Any]:
    if info is None:
        return {}
    return {
        "exit_code": info.exit_code,
        "exit": describe_exit_code(info.exit_code) if info.exit_code is not None else None,
        "planned": info.planned,
        "reason": info.reason,
        "lifetime": info.lifetime,
    }


#: Protocol pipes get this much kernel buffer (Linux; the default is 64 KiB):
#: a 1 MiB frame then crosses in one write instead of sixteen hand-offs.
_PIPE_BYTES = 1 << 20
#: Reads of small answers take up to this much. Not asyncio's 256 KiB: a
#: buffer over glibc's 128 KiB mmap threshold can be mapped and unmapped on
#: every read (until glibc raises its threshold), about 15 us each on this
#: kind of machine, more than a call costs.
_SMALL_READ = 64 * 1024


def _enlarge_pipe(fd: int) -> None:
    """Best effort: the limit is /proc/sys/fs/pipe-max-size (1 MiB by default)."""
    set_size = getattr(fcntl, "F_SETPIPE_SZ", None)
    if set_size is not None:
        with contextlib.suppress(OSError):
            fcntl.fcntl(fd, set_size, _PIPE_BYTES)


async def _spawn(launch: WorkerLaunch, stdin: int, stdout: int, stderr: int) -> anyio.abc.Process:
    """A fresh interpreter for the worker (not forked from a template)."""
    return await anyio.open_process(
        list(launch.argv),
        stdin=stdin,
        stdout=stdout,
        stderr=stderr,
        env=launch.env,
        cwd=launch.cwd,
        start_new_session=True,  # its own process group, killed as one
    )


class _StdoutReader(asyncio.Protocol):
    """asyncio: decodes the worker's stdout as it arrives (no task in between)."""

    def __init__(self, handle: WorkerHandle) -> None:
        self.handle = handle
        self.ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.BaseTransport | None = None
        self._large_reads = False  # max_size was raised for a large frame

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        if hasattr(transport, "max_size"):  # (asyncio's pipe transport; uvloop has none)
            transport.max_size = _SMALL_READ

    def data_received(self, data: bytes) -> None:
        if self.ended.done():
            return
        if self.handle.feed_stdout(data):
            self._end()
            return
        if self._large_reads or len(data) >= _SMALL_READ:  # (a full read: maybe a large frame)
            self._adapt_read_size()

    def _adapt_read_size(self) -> None:
        """asyncio reads up to max_size bytes (a fresh bytes object each time):
        large while a large frame is arriving, small otherwise, since a 1 MiB
        allocation per read costs more than a small call. (Checked only after
        a large read, or while reads are large: small replies skip it.)
        """
        size = min(max(self.handle.missing_bytes, _SMALL_READ), _PIPE_BYTES)
        self._large_reads = size > _SMALL_READ
        if getattr(self.transport, "max_size", size) != size:
            self.transport.max_size = size  # type: ignore[union-attr]

    def eof_received(self) -> bool:
        if not self.ended.done():
            self.handle.feed_stdout(b"")
            self._end()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._end()

    def _end(self) -> None:
        if not self.ended.done():
            self.ended.set_result(None)


class _StderrReader(asyncio.Protocol):
    """asyncio: the worker's stderr, line by line, to logging and the crash tail."""

    def __init__(self, handle: WorkerHandle) -> None:
        self.handle = handle
        self.lines = LineSplitter(handle._stderr_line)

    def data_received(self, data: bytes) -> None:
        self.lines.feed(data)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lines.close()
        self.handle._stderr_done.set()
