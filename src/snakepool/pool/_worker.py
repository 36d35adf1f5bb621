"""The host's handle on one worker: the protocol side of the transport seam.

Where one worker's frames travel, and which module owns each step::

    WorkerHandle.submit(call, frame)    register the PendingCall              _worker
      |  Transport.write(frame, batch)  a loop turn's frames in one write     _transport (the seam)
      v
    CallbackPipes | StreamPipes         stdin pipe -> the worker process      _pipes: spawned, or
      |                                 -> its stdout pipe                    forked by _template
      v
    WorkerHandle.feed_stdout(data)      the Connection decodes; one match     _worker
      |                                 on each message's type
      v
    PendingCall resolved or failed; Pacing fed the answers (_pacing); freed slots handed on

A worker elsewhere (a Ray actor) is one more module beside ``_pipes``.

The transport owns the bytes and sees the death: it starts the process,
delivers stdout and stderr, and ends the delivery at EOF, at a protocol
break, or shortly after the process exited (even while a child it left holds
its stdout). The handle owns every decision: whether a call is answered,
whether an exit was planned (Goodbye, recycling, stop) or a crash, why a
worker was killed, which calls fail and which go elsewhere, exactly once.

Everything that decides (register a call, free a slot) is synchronous; only
the transport's I/O awaits.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import itertools
import logging
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.abc

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
from ._calls import PendingCall, failure_to_exception
from ._isolation import LimitWatch, limit_watch
from ._launch import WorkerLaunch as WorkerLaunch
from ._pacing import Pacing
from ._pipes import local_pipes
from ._template import WorkerTemplate
from ._transport import Transport, TransportFactory

__all__ = ["READY_STATES", "ExitInfo", "WorkerHandle", "WorkerLaunch", "WorkerState"]

_STDERR_TAIL_LINES = 40
_STDOUT_CLOSED_GRACE = 2.0  # a worker that closed stdout but lives on is killed after this


class WorkerState(enum.StrEnum):
    STARTING = "starting"
    IDLE = "idle"
    BUSY = "busy"
    STOPPING = "stopping"
    EXITED = "exited"


#: States of a worker that takes calls.
READY_STATES = frozenset({WorkerState.IDLE, WorkerState.BUSY})
# (module globals for the per-call code: an Enum member lookup costs ~70 ns)
_BUSY, _IDLE = WorkerState.BUSY, WorkerState.IDLE
_Result = p.Result


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
        transport: TransportFactory | None = None,
    ) -> None:
        """``transport`` makes how frames reach the worker (default: local pipes,
        the worker forked from ``template`` when it is alive, else spawned)."""
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
        # session id -> (variables version, state version) this worker has seen
        self.sessions: dict[str, tuple[int, int]] = {}
        self._conn = p.Connection(p.Role.HOST)
        self._transport: Transport = (
            transport(self) if transport is not None else local_pipes(self, template)
        )
        self._ready = anyio.Event()
        self._startup_failure: p.StartupFailed | None = None
        self._stderr_tail: collections.deque[str] = collections.deque(maxlen=_STDERR_TAIL_LINES)
        self._early_lines: list[str] = []  # its output before hello (see stderr_line)
        self._kill_reason: str | None = None
        self._planned_reason: str | None = None
        self._protocol_error: ProtocolError | None = None
        self._started_at = time.monotonic()
        self._cancel_scope = anyio.CancelScope()
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
        if self.state is WorkerState.EXITED:
            return None
        return self._transport.rss_bytes()

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
        where = self._transport.where
        return f"worker {self.pool}/{self.slot} (pid {self.pid}{', ' + where if where else ''})"

    @property
    def transport(self) -> Transport:
        """How its frames travel, and where it runs (``node_id``, ``gpu_ids``)."""
        return self._transport

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
        exit_code: int | None = None
        opened = False
        try:
            with self._cancel_scope:
                async with self._transport.open(launch):
                    opened = True
                    ended = False
                    try:
                        await self._serve(launch, task_status)
                        ended = True
                    finally:
                        if not ended:  # torn down from outside: nothing left to wait for
                            self.kill("the pool stopped serving it")
                        with anyio.CancelScope(shield=True):
                            exit_code = await self._until_gone()
        except OSError as exc:
            if opened:
                raise
            self._startup_failure = p.StartupFailed(
                type=type(exc).__name__, message=f"cannot start {launch.argv[0]!r}: {exc}"
            )
            task_status.started()
        finally:
            # However it ended (even cancelled before the process existed),
            # announce the exit exactly once, so nobody waits forever.
            if opened:
                self._exited(exit_code)
            else:
                self._never_started()

    async def _serve(self, launch: WorkerLaunch, task_status: anyio.abc.TaskStatus[None]) -> None:
        """The process exists: greet it, then take its output until that ends."""
        self.pid = self._transport.pid
        self._limits = limit_watch(launch.env)
        self._conn.set_max_frame_bytes(launch.max_frame_bytes)
        self.post(self._conn.send(launch.init))
        if self._stop_requested:  # stop() came before the process existed
            self.kill("stopped during start-up")
        task_status.started()
        await self._transport.receive()

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

        ``batch=True`` frames (calls for a worker that is busy anyway) may be
        collected and go out in one write at the end of this event-loop turn
        (see ``Transport.write``); order is kept.
        """
        self._transport.write(frame, batch)

    def post_message(self, message: p.Message) -> None:
        """Encode and queue one host message."""
        self.post(self._conn.send(message))

    def submit(self, call: PendingCall, frame: bytes) -> None:
        """Register ``call`` and queue its frame, using the slot reserved for it."""
        self.reserved -= 1
        call.worker = self
        busy = bool(self.pending)  # then the frame would wait in the pipe anyway
        self._transport.write(frame, busy)  # (first: the rest is done while the worker reads)
        self.pending[call.id] = call
        self.requests += 1
        self.state = _BUSY
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
        self._transport.close_stdin()

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
        """Signal the worker and what it started (not once it exited: its id may be reused)."""
        if self.pid is None or self.exit_info is not None:
            return
        self._transport.signal(sig)

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
        if self.pid is None:  # the process does not exist yet
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

    # --- what the transport delivers (the Receiver) ------------------------------

    def stderr_line(self, raw: bytes) -> None:
        """One line of the worker's stderr: its output (print, logging, tracebacks)."""
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
        answered = 0
        for message in messages:
            match message:  # (the usual ones first: each case is an isinstance check)
                case _Result():  # (module globals: a lookup in p costs per message)
                    call = self.pending.pop(message.id, None)
                    if call is not None:
                        answered += 1
                        call.resolve(message.value)
                case p.Item():
                    stream = self.pending.get(message.id)
                    if stream is not None:
                        stream.push(message.value)
                case p.End():
                    call = self.pending.pop(message.id, None)
                    if call is not None:
                        answered += 1
                        call.end()
                case p.Failure():
                    call = self.pending.pop(message.id, None)
                    if call is not None:
                        answered += 1
                        self._on_failure(call, message)
                case _:
                    self._on_control(message)
        if answered:
            self._answered(answered)

    def _on_control(self, message: p.Message) -> None:
        """A message that answers no call: logs, host tools, pongs, the handshake."""
        match message:
            case p.Log():
                self.log.log(message.level, "%s", message.message)
            case p.HostCall():
                if self._on_host_call is not None:
                    self._on_host_call(self, message)
            case p.Pong():
                answered = self._pings.get(message.id)
                if answered is not None:
                    answered.set()
            case p.Hello():
                self._on_hello(message)
            case p.StartupFailed():
                self._startup_failure = message
                self._ready.set()
            case p.Goodbye():
                self._planned_reason = self._planned_reason or message.reason

    def _on_failure(self, call: PendingCall, failure: p.Failure) -> None:
        if failure.kind == p.FailureKind.WITHDRAWN and self._on_unstarted is not None:
            self._on_unstarted(call)  # it never started: the pool sends it elsewhere
        elif failure.kind == p.FailureKind.CANCELLED and not call.abandoned:
            # Not cancelled by its caller: the worker is shutting down.
            call.fail(
                PoolClosed(f"{self.describe()} stopped before call {call.command!r} finished")
            )
        else:
            if call.mode == p.CallMode.CAST:
                self.log.warning(
                    "cast %r failed: %s: %s", call.command, failure.type, failure.message
                )
            call.fail(failure_to_exception(failure))

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

    def _answered(self, count: int) -> None:
        """``count`` calls were just answered (taken off ``pending``): pace, free their slots.

        Once per read (``_on_messages``): one clock reading and one hand-off
        for every call the read answered (the hand-off fills every slot it can).
        """
        pacing = self.pacing
        if pacing.limit:  # pace sending ahead (see Pacing.answered)
            self.ahead = pacing.answered(count, len(self.pending))
        if not self.pending:
            if self.state is _BUSY:
                self.state = _IDLE
            elif self._retiring is not None:
                self.close_stdin()
        self._on_capacity(self)

    # --- death -----------------------------------------------------------------

    async def _until_gone(self) -> int:
        """Its output ended: make sure the process is gone (what it started too); its exit code."""
        self.state = WorkerState.STOPPING  # from now on no call is routed here
        transport = self._transport
        with anyio.move_on_after(_STDOUT_CLOSED_GRACE) as waited:
            await transport.wait()
        if waited.cancelled_caught:
            self.kill("closed its stdout but did not exit")
        self.signal_group(signal.SIGKILL)  # children of a dead worker go too
        exit_code = await transport.wait()
        if self._limits is not None:  # (and its cgroups and scratch directory go: a thread)
            self.limit_crossed = await anyio.to_thread.run_sync(
                self._limits.crossed, self.pid, exit_code
            )
        return exit_code

    def _exited(self, exit_code: int | None) -> None:
        """The process is gone and its stderr read: fail what was in flight, tell the pool."""
        self.exit_info = self._exit_info(exit_code)
        self.state = WorkerState.EXITED
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
