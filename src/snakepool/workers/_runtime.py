"""The worker process: ``python -m snakepool.workers``.

Data flow inside one worker::

                 +-- leader thread: os.read(stdin)
                 |   +- a read of nothing but plain calls, nothing queued or running:
                 |   |    the *plain lane* (Worker.plain_calls -> _Threads._run_plain):
                 |   |    run right there, in order, each answered as it ends
    host --pipe--+   +- anything else: Connection -> Worker.on_message
                 |      control (cancel, withdraw, credit, host replies): at once
                 |      call: queued (FIFO); taken in order, at most ``concurrency``
                 |            running: a sync one is run by the thread that takes
                 |            it (the leader itself, usually), an async one is
                 |            started as a task on the event loop (main thread)
                 |      ping: answered by the event loop
                 |
    handler threads and loop tasks --Worker.send--> _FrameWriter --pipe--> host

Calls start in the order they arrive, sync and async alike, and at most
``concurrency`` run at once: the host may send more (they wait in the queue),
and it relies on that order to know which calls cannot have started. A call
cancelled or withdrawn while it waits is answered at once and never runs.

Reading uses *leader/follower* threads (``_Threads``): whichever thread holds
the "leader" role reads the protocol pipe, dispatches what it read, and runs
the sync calls it read itself, so a quick call costs two wake-ups (host ->
worker, worker -> host), as in a bare read/answer loop. A *plain* call (sync,
no session, no ``ctx``, arguments that fit: most calls) read while the worker
is idle skips even the ``Call`` message and the queue: at a few microseconds
per call, every Python call on the way counts. An idle *watchdog*
thread takes the reading over when the leader has been inside one call for
2 ms (pings and cancellations keep flowing) and wakes helper threads for
calls that waited that long. There are at most ``concurrency + 1`` threads,
started on demand. Pings are answered by the event loop, so a loop blocked
by an async handler is noticed.

The protocol owns the process's real stdout: at start-up the pipe is moved to
a private fd and fd 1 is pointed at stderr, so a ``print()`` in user code can
never corrupt a frame. stdin is replaced by /dev/null for the same reason.
The worker exits when its protocol stdin closes and (on Linux) when its parent
dies, via ``PR_SET_PDEATHSIG``.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import faulthandler
import functools
import inspect
import itertools
import logging
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import AsyncIterator, Callable, Coroutine, Generator
from typing import Any

from .. import protocol as p
from ..adapters import Adapter, CallContext, CommandSpec, SessionVariables, load_adapter_class
from ..errors import ProtocolError, RemoteError
from ._descendants import become_subreaper

__all__ = ["current_worker", "main"]

_log = logging.getLogger("snakepool.worker")

#: Exit codes a worker uses on purpose (anything else is a crash).
EXIT_OK = 0
EXIT_STARTUP_FAILED = 3
EXIT_PROTOCOL_ERROR = 4
EXIT_INTERNAL_ERROR = 5  # a bug in the runtime itself: exit loudly rather than go deaf


def main() -> None:
    """Entry point of ``python -m snakepool.workers``."""
    proto_in, proto_out = _claim_stdio()
    die_with_parent()
    become_subreaper()  # a handler's setsid()/double-forked children stay ours
    faulthandler.enable(file=sys.stderr, all_threads=True)
    try:
        code = asyncio.run(_serve(proto_in, proto_out))
    except KeyboardInterrupt:
        code = EXIT_OK
    flush_and_exit(code)


def _claim_stdio() -> tuple[int, int]:
    """Move the protocol pipes off fds 0/1 so user code cannot touch them."""
    proto_in = os.dup(0)  # os.dup makes non-inheritable fds: children never get them
    proto_out = os.dup(1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)  # fd 1 (and so sys.stdout and C-level printf) now writes to stderr
    with contextlib.suppress(AttributeError, ValueError):
        sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]

    def close_in_child() -> None:
        # A handler's os.fork() (multiprocessing, daemons) copies every fd,
        # close-on-exec or not: a child that kept the protocol pipes open
        # would hide the worker's death from the host (it waits for EOF).
        for fd in (proto_in, proto_out):
            with contextlib.suppress(OSError):
                os.close(fd)

    os.register_at_fork(after_in_child=close_in_child)
    return proto_in, proto_out


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Ask Linux to send us ``sig`` when our parent dies, even by SIGKILL.

    The parent is the host, or the template a worker was forked from
    (``SNAKEPOOL_HOST_PID`` names it; shared with the template process).
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(pr_set_pdeathsig, sig, 0, 0, 0)
    expected = os.environ.get("SNAKEPOOL_HOST_PID")
    if expected and expected.isdigit() and os.getppid() != int(expected):
        os._exit(EXIT_OK)  # the host died before prctl took effect


def flush_std_streams() -> None:
    """Flush Python's stdout/stderr buffers (before os._exit, or a fork)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


def flush_and_exit(code: int) -> None:
    flush_std_streams()
    # os._exit: a sync handler stuck in a thread must not keep the process alive.
    os._exit(code)


_current: Worker | None = None


def current_worker() -> Worker | None:
    """The running worker of this process (for diagnostics and tests)."""
    return _current


async def _serve(proto_in: int, proto_out: int) -> int:
    global _current
    loop = asyncio.get_running_loop()
    worker = _current = Worker(loop)
    worker.writer = _FrameWriter(proto_out)
    worker.threads = _Threads(worker, proto_in)
    worker.threads.start()
    return await worker.finished


class _FrameWriter:
    """Writes whole frames to the protocol pipe: blocking, from any thread.

    Handler threads write their results themselves instead of handing them to
    the event loop (one thread hop less per call). A write blocks only while
    the pipe is full, which is the backpressure we want: the host reads all
    the time, and a generator must not run ahead of it.
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._lock = threading.Lock()
        self._closed = False

    def write(self, *parts: bytes) -> None:
        """One frame, whole or from its parts (header, body).

        A small frame is joined and written with one ``os.write`` (cheaper than
        building a ``writev`` vector); a large one goes out with ``writev``, so
        its body is never copied.
        """
        if len(parts) == 1:
            data = parts[0]
        elif len(parts[-1]) <= _JOIN_BELOW:
            data = b"".join(parts)
        else:
            self._write_vector(parts)
            return
        with self._lock:
            if self._closed:
                return
            try:
                written = os.write(self._fd, data)
                if written < len(data):  # (a signal interrupted a large write)
                    self._write_rest([memoryview(data)[written:]])
            except OSError:  # EPIPE: the host is gone; we exit on stdin EOF
                self._closed = True

    def _write_vector(self, parts: tuple[bytes, ...]) -> None:
        with self._lock:
            if self._closed:
                return
            try:
                written = os.writev(self._fd, parts)
                if written < sum(map(len, parts)):
                    views = [memoryview(part) for part in parts]
                    while written >= len(views[0]):
                        written -= len(views.pop(0))
                    views[0] = views[0][written:]
                    self._write_rest(views)
            except OSError:
                self._closed = True

    def _write_rest(self, views: list[memoryview]) -> None:
        """Finish a partial write (the lock is held)."""
        while views:
            written = os.writev(self._fd, views)
            while views and written >= len(views[0]):
                written -= len(views.pop(0))
            if views and written:
                views[0] = views[0][written:]

    def is_closing(self) -> bool:
        return self._closed


#: A frame whose body is at most this long is joined and written with one
#: ``os.write``: copying a few KiB costs less than a ``writev`` vector.
_JOIN_BELOW = 4096

#: A plain read takes up to this much, as a fresh bytes object (cheaper than
#: a copy out of a buffer, and the decoder splits bytes faster).
_SMALL_READ = 64 * 1024
#: After a read that filled _SMALL_READ (a large frame, or a backlog), reads
#: take up to this much (what the host makes the pipe hold) into a buffer
#: allocated once: a fresh 1 MiB bytes object per read (an mmap each) would
#: cost more than a small call itself. They are handed on as views.
_READ_BYTES = 1024 * 1024
#: A call queued, or the reader busy inside a call, for this long gets help.
_HELP_AFTER = 0.002
#: The watchdog keeps watching this long after the last call started.
_WATCH_FOR = 1.0

_READ, _RUN, _EXIT = "read", "run", "exit"


class _Threads:
    """Leader/follower threads that read the pipe and run sync handlers.

    Roles, all decided under one lock:

    - the *leader* reads the pipe and dispatches what it read, in order. When
      that queued sync calls it runs them itself, one after another, keeping
      the role: a quick call costs no hand-off between threads at all.
    - the *watchdog*, one idle thread, wakes every ``_HELP_AFTER`` seconds
      while calls come in. If the leader has been inside one call that long,
      it takes over reading (pings and cancellations keep flowing); if calls
      have waited that long, it wakes threads to run them in parallel.
    - other idle threads sleep until woken; a thread that finishes a call
      takes the next queued one.

    At most ``limit`` calls run at once and there are at most ``limit + 1``
    threads (started on demand), so one is always free to read or watch.
    """

    def __init__(self, worker: Worker, fd: int) -> None:
        self.worker = worker
        self.fd = fd
        self.limit = 1  # sync handlers running at once (Init sets concurrency)
        self._lock = threading.Lock()
        self._sleepers = threading.Condition(self._lock)
        self._jobs: collections.deque[tuple[_Running, float]] = collections.deque()
        # The plain lane's calls not started yet (see _run_plain).
        self._lane: collections.deque[_PlainCall] = collections.deque()
        self._running = 0
        self._leader_taken = False
        self._leader_busy_since: float | None = None  # the leader is inside a call
        self._role = 0  # bumped when the watchdog takes the reader role over
        self._watchdog = "none"  # none | called (a thread was woken for it) | on
        self._asleep = 0
        self._threads = 0
        self._last_call = 0.0
        self._reading = True  # false after EOF or a protocol error: nobody reads again
        self._names = itertools.count(1)
        self._read_buffer = bytearray(_READ_BYTES)  # only the leader reads: one is enough

    def start(self) -> None:
        with self._lock:
            self._spawn_locked()

    def submit(self, job: _Running) -> None:
        """Queue a call (the leader does, while it dispatches).

        Calls start in the order they arrive, at most ``limit`` at once, sync
        and async alike: the host may send more than ``limit`` (they wait
        here), and it counts on that order to know which ones cannot have
        started (see ``take_back``).
        """
        with self._lock:
            self._jobs.append((job, time.monotonic()))

    def take_back(self, call_id: int) -> _Running | None:
        """Remove call ``call_id`` if it has not started; None if it has (or is unknown)."""
        with self._lock:
            for index, (job, _) in enumerate(self._jobs):
                if job.call.id == call_id:
                    del self._jobs[index]
                    return job
        return None

    def release(self) -> None:
        """An async call's task ended: its slot is free (loop thread)."""
        with self._lock:
            self._running -= 1
            if self._jobs and self._running < self.limit:
                self._wake_locked(1)  # someone starts the next waiting call

    def drain(self) -> list[_Running]:
        """Stop reading and take the calls that never started (shutdown)."""
        with self._lock:
            self._stop_locked()
            jobs = [job for job, _ in self._jobs]
            self._jobs.clear()
            return jobs

    def _stop_locked(self) -> None:
        self._reading = False
        self._sleepers.notify_all()  # (the watchdog notices within _HELP_AFTER)

    # --- the threads ---------------------------------------------------------

    def _run(self) -> None:
        try:
            self._serve()
        except BaseException:
            # Not a handler's exception (those become Failures): the runtime
            # itself broke. A thread that silently died might have been the
            # reader, leaving the worker deaf; exit so the host sees a crash.
            traceback.print_exc(file=sys.stderr)
            print("snakepool worker: internal error in a worker thread", file=sys.stderr)
            flush_and_exit(EXIT_INTERNAL_ERROR)

    def _serve(self) -> None:
        while True:
            with self._lock:
                action, job, role = self._next_locked()
            if action is _EXIT:
                return
            if action is _READ:
                assert role is not None
                if not self._lead(role):
                    return
                continue  # the watchdog took reading over: follow
            assert job is not None
            try:
                job()
            finally:
                if not job.is_async:  # (an async call holds its slot until its task ends)
                    with self._lock:
                        self._running -= 1

    def _lead(self, role: int) -> bool:
        """Read, dispatch, run what was read; false once reading ended.

        Returns true when the watchdog took the reader role (number ``role``)
        over while this thread was inside a call. The hot path of the worker:
        a read of plain calls goes to ``_run_plain`` (one lock round trip per
        call); anything else costs one lock round trip after the read and one
        after each call.
        """
        buffer, fd, jobs, lock = self._read_buffer, self.fd, self._jobs, self._lock
        receive, plain_calls = self.worker.receive, self.worker.plain_calls
        large = False  # the last read was full: read into the large buffer
        while True:
            chunk = b""
            try:
                if large:
                    count = os.readv(fd, [buffer])
                else:
                    chunk = os.read(fd, _SMALL_READ)
                    count = len(chunk)
            except OSError:
                count = 0
                large = False
            if large:
                with memoryview(buffer) as view, view[:count] as data:
                    receive(data)  # (the decoder copies what it keeps)
                large = count == _READ_BYTES
            else:
                large = count == _SMALL_READ
                # Nothing queued or running (only the reader queues calls, and
                # we are it): plain calls may run right here, without a queue.
                calls = plain_calls(chunk) if count and not jobs and not self._running else None
                if calls is not None:
                    if not self._run_plain(calls, role):
                        return True  # the watchdog took reading over: follow
                    continue
                receive(chunk)
            lock.acquire()
            try:
                if not count:
                    self._stop_locked()
                # Run the calls read, one after another, keeping the role.
                while self._reading and jobs and self._running < self.limit:
                    self._leader_busy_since = now = time.monotonic()
                    job = self._take_locked(now)
                    lock.release()
                    try:
                        job()
                    finally:
                        lock.acquire()
                        if not job.is_async:  # (it holds its slot until its task ends)
                            self._running -= 1
                    if role != self._role:
                        return True  # (the watchdog cleared _leader_busy_since)
                    self._leader_busy_since = None
                if not self._reading:
                    return False
            finally:
                lock.release()

    def _next_locked(self) -> tuple[str, _Running | None, int | None]:
        """What a thread without the reader role does next: read, run a call, or exit."""
        while self._reading:
            now = time.monotonic()
            if not self._leader_taken:
                self._leader_taken = True
                return _READ, None, self._role
            if self._jobs and self._running < self.limit:
                return _RUN, self._take_locked(now), None
            if self._watchdog != "on":
                self._watchdog = "on"
                decided = self._watch_locked()
                if decided is not None:
                    return decided
                # quiet: sleep until a call needs a watchdog again
            self._asleep += 1
            self._sleepers.wait()  # whoever wakes us decremented _asleep
        return _EXIT, None, None

    def _watch_locked(self) -> tuple[str, _Running | None, int | None] | None:
        """The watchdog's timed loop; returns what to do, or None to sleep."""
        while self._reading:
            now = time.monotonic()
            stuck = self._leader_busy_since
            stale = (
                bool(self._jobs)
                and self._running < self.limit
                and now - self._jobs[0][1] >= _HELP_AFTER
            )
            if stuck is not None and now - stuck >= _HELP_AFTER:
                self._watchdog = "none"
                self._role += 1  # the busy leader finds out when its call ends
                self._leader_busy_since = None
                if self._lane:  # calls read with the long one: queued, first in line
                    queued = map(self.worker.queued_plain, reversed(self._lane))
                    self._jobs.extendleft((job, now) for job in queued)
                    self._lane.clear()
                self._wake_helpers_locked()
                return _READ, None, self._role
            if stale:
                self._watchdog = "none"
                job = self._take_locked(now)
                self._wake_helpers_locked()
                return _RUN, job, None
            if stuck is None and not self._jobs and now - self._last_call >= _WATCH_FOR:
                self._watchdog = "none"  # quiet: the next call wakes a watchdog
                return None
            # A plain sleep, not a timed Condition.wait (which makes a lock and
            # edits a waiter list each time): nobody needs to wake the watchdog
            # early, and it wakes ~500 times a second while calls come in.
            self._lock.release()
            try:
                time.sleep(_HELP_AFTER)
            finally:
                self._lock.acquire()
        return _EXIT, None, None

    def _run_plain(self, calls: list[_PlainCall], role: int) -> bool:
        """Run plain calls the leader read, in order, in one slot; false if it lost the role.

        The *plain lane* (see ``Worker.plain_calls``): what ``_lead`` and
        ``Worker._sync_call_body`` do with queued calls, minus the queue, the
        ``Call`` and the ``_Running``, written out in one function: a Python
        call costs about as much here as the no-op call itself. If one call
        takes long, the watchdog takes the reader role over and moves the
        calls not started yet to the front of the queue (``_watch_locked``):
        from there they can run side by side, be cancelled or withdrawn.

        Only one thread at a time runs the lane (it holds a slot, and is only
        taken with none held), so the lane has an encoder of its own.
        """
        worker, lock, lane = self.worker, self._lock, self._lane
        encode, writer = worker.plain_encoder.encode_parts, worker.writer
        assert writer is not None
        leading = True
        lock.acquire()  # (held except while a call runs: one round trip per call)
        try:
            lane.extend(calls)
            self._running += 1
            while lane:
                call_id, command, handler, kwargs = lane.popleft()
                now = time.monotonic()
                if leading:
                    leading = role == self._role
                    if leading:
                        self._leader_busy_since = now
                self._started_locked(now)
                lock.release()
                try:
                    value = handler(**kwargs)
                except BaseException as exc:
                    worker.report_error(call_id, command, exc, traceback.format_exc())
                else:
                    try:
                        parts = encode({"t": _RESULT_TAG, "i": call_id, "r": value})
                    except (TypeError, ProtocolError):  # the general way says what is wrong
                        worker.answer_value(call_id, command, value)
                    else:
                        writer.write(*parts)
                finally:
                    lock.acquire()
        finally:
            lane.clear()  # (only after an exception: a bug)
            self._running -= 1
            if role == self._role:
                self._leader_busy_since = None
            else:
                leading = False
            lock.release()
        return leading

    def _take_locked(self, now: float) -> _Running:
        job, _ = self._jobs.popleft()
        self._running += 1
        self._started_locked(now)
        return job

    def _started_locked(self, now: float) -> None:
        """A call started: make sure a watchdog will notice if it takes long."""
        self._last_call = now
        if self._watchdog != "on":
            # (also when a thread woken to watch took this call instead)
            self._watchdog = "called"
            self._wake_locked(1)

    def _wake_helpers_locked(self) -> None:
        """Threads for every call that may run now, and a new watchdog."""
        runnable = min(len(self._jobs), self.limit - self._running)
        if self._watchdog == "none":
            self._watchdog = "called"
            runnable += 1
        self._wake_locked(runnable)

    def _wake_locked(self, n: int) -> None:
        woken = min(n, self._asleep)
        if woken:
            self._asleep -= woken
            self._sleepers.notify(woken)
        for _ in range(n - woken):
            if self._threads >= self.limit + 1:
                break
            self._spawn_locked()

    def _spawn_locked(self) -> None:
        self._threads += 1
        thread = threading.Thread(
            target=self._run, name=f"snakepool-handler-{next(self._names)}", daemon=True
        )
        thread.start()


class _Running:
    """A call in progress: what runs it, what to cancel, and its stream credit.

    A sync call is queued on the threads as its ``_Running`` (calling it runs
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
        "task",
        "thread_credit",
    )

    def __init__(
        self,
        call: p.Call,
        handler: Callable[..., Any],
        args: dict[str, Any],
        ctx: CallContext | None,
        body: Callable[[_Running], None],
        *,
        is_async: bool = False,
    ) -> None:
        self.call = call
        self.handler = handler
        self.args = args  # the handler's keyword arguments
        self.ctx = ctx
        self.body = body  # runs the call (sync), or starts its task (async)
        self.is_async = is_async
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


class _WorkerSession:
    """What this worker keeps for one session: its local state and variable cache."""

    __slots__ = ("lock", "pending_restore", "state", "variables", "version")

    def __init__(self) -> None:
        self.state: dict[str, Any] = {}
        self.variables: dict[str, Any] = {}
        self.version = -1
        self.pending_restore: dict[str, Any] | None = None
        self.lock = threading.Lock()  # restore runs once even with concurrent calls


class Worker:
    """Dispatches protocol messages to the adapter's commands."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.conn = p.Connection(p.Role.WORKER)
        self.writer: _FrameWriter | None = None
        self._encoders = threading.local()  # a Packer is not thread-safe: one per thread
        self._max_frame_bytes = p.DEFAULT_MAX_FRAME_BYTES
        self.plain_encoder = p.FrameEncoder()  # the plain lane's (see _Threads._run_plain)
        self.finished: asyncio.Future[int] = loop.create_future()
        self.adapter: Adapter | None = None
        self.commands: dict[str, CommandSpec] = {}
        # The plain lane's commands (sync, not streams, no ctx): bound handler, spec.
        self._plain: dict[str, tuple[Callable[..., Any], CommandSpec]] = {}
        self.running: dict[int, _Running] = {}
        self.sessions: dict[str, _WorkerSession] = {}
        self._host_calls: dict[int, concurrent.futures.Future[Any] | asyncio.Future[Any]] = {}
        self._host_call_ids = itertools.count(1)
        self.threads: _Threads | None = None
        self.init: p.Init | None = None
        self.log = _log
        self._closing = False
        self._loop_thread = threading.get_ident()

    # --- receiving ---------------------------------------------------------

    def receive(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing:
            return
        try:
            self.conn.receive_data(data)
            next_event = self.conn.next_event
            while True:
                event = next_event()
                if type(event) is _CALL_MESSAGE:  # most messages: no on_message hop
                    self.start_call(event)
                elif event is p.NEED_DATA:
                    return
                elif event is p.CLOSED:
                    self._begin_shutdown(EXIT_OK, "stdin closed")
                    return
                else:
                    assert isinstance(event, p.Message)
                    self.on_message(event)
        except ProtocolError as exc:
            print(f"snakepool worker: protocol error from host: {exc}", file=sys.stderr)
            self._begin_shutdown(EXIT_PROTOCOL_ERROR, f"protocol error: {exc}")

    def plain_calls(self, data: bytes) -> list[_PlainCall] | None:
        """The calls in ``data``, if it holds nothing but whole frames of plain calls.

        A plain call has no session and no ``ctx``, and calls a sync command
        that is not a stream with arguments that fit: most calls. The reader
        runs them itself, in order (``_Threads._run_plain``), with no
        ``Call`` message, queue entry or ``running`` record. None (nothing
        consumed) sends ``data`` the general way, through ``receive``; so does
        anything unusual, down to a float id, which ``next_event`` then refuses.
        """
        plain = self._plain
        if not plain or self._closing:
            return None
        frames = self.conn.whole_frames(data)
        if frames is None:
            return None
        calls: list[_PlainCall] = []
        for wire in frames:
            fields = p.call_fields(wire) if wire.get("t") == _CALL_TAG else None
            if fields is None:
                return None
            call_id, command, args, mode, _, session = fields
            entry = plain.get(command)
            if entry is None or mode != _CALL or session is not None:
                return None
            handler, spec = entry
            kwargs = spec.keyword_arguments(args)
            if kwargs is None:
                return None  # (the general path explains the mismatch)
            calls.append((call_id, command, handler, kwargs))
        return calls

    def queued_plain(self, plain: _PlainCall) -> _Running:
        """A plain call the lane had not started, as a queued call (``start_call``'s)."""
        call_id, command, handler, kwargs = plain
        call = p.Call(id=call_id, command=command, args=kwargs)
        running = self.running[call_id] = _Running(
            call, handler, kwargs, None, self._sync_call_body
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
            self._sync_session(message)
        elif isinstance(message, p.SessionDrop):
            self.sessions.pop(message.session_id, None)
        elif isinstance(message, p.HostReply | p.HostFailure):
            self._host_answered(message)
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
        self._send_wire(p.to_wire(message))

    def _send_wire(self, wire: dict[str, Any]) -> None:
        """``send`` of a message's map (a hot path builds the map itself)."""
        writer = self.writer
        if writer is None or writer.is_closing():
            return
        encoder: p.FrameEncoder | None = getattr(self._encoders, "encoder", None)
        if encoder is None or encoder.max_frame_bytes != self._max_frame_bytes:
            encoder = self._encoders.encoder = p.FrameEncoder(self._max_frame_bytes)
        writer.write(*encoder.encode_parts(wire))

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
            self._max_frame_bytes = init.max_frame_bytes
            self.plain_encoder = p.FrameEncoder(init.max_frame_bytes)
            self.log = logging.getLogger(f"snakepool.worker.{init.pool}.{init.worker_id}")
            _install_log_forwarding(self)
            cls = load_adapter_class(init.adapter)
            self.adapter = cls()
            self.adapter.setup(dict(init.config))
        except BaseException as exc:  # anything at all: report it, then exit
            traceback.print_exc(file=sys.stderr)
            self._startup_failed(_type_name(exc), str(exc), traceback.format_exc())
            return
        self.commands = dict(cls.commands)
        self._plain = {
            name: (getattr(self.adapter, spec.attribute), spec)
            for name, spec in self.commands.items()
            if not (spec.is_async or spec.is_stream or spec.wants_context)
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
            self._fail(
                call.id,
                p.FailureKind.UNKNOWN_COMMAND,
                "UnknownCommand",
                f"unknown command {call.command!r}; this adapter has: {known}",
            )
            return
        if call.mode != _CALL or spec.is_stream:  # (a plain call of a plain command fits)
            problem = _mode_problem(spec, call.mode)
            if problem:
                self._fail(call.id, p.FailureKind.WRONG_MODE, "TypeError", problem)
                return
        kwargs = spec.keyword_arguments(call.args)
        if kwargs is None:  # not the plain case: let inspect bind (and explain)
            try:
                bound = spec.signature.bind(**call.args)
            except TypeError as exc:
                self._fail(
                    call.id,
                    p.FailureKind.BAD_ARGUMENTS,
                    "TypeError",
                    f"command {call.command!r}: {exc} (signature: {spec.name}{spec.signature})",
                )
                return
            kwargs = _keyword_arguments(spec, bound)
        ctx = None
        if spec.wants_context or call.session_id is not None:
            ctx = self._context(call)
            if spec.wants_context:
                kwargs["ctx"] = ctx
        handler = getattr(self.adapter, spec.attribute)
        # A stream may run STREAM_WINDOW items ahead of what the host consumed.
        if spec.is_async:
            # Async calls queue like sync ones (same order, same limit); taking
            # one off the queue starts its task on the loop.
            running = _Running(call, handler, kwargs, ctx, self._launch, is_async=True)
            if spec.is_stream:
                running.async_credit = asyncio.Semaphore(p.STREAM_WINDOW)
        elif spec.is_stream:
            running = _Running(call, handler, kwargs, ctx, self._sync_stream_body)
            running.thread_credit = threading.Semaphore(p.STREAM_WINDOW)
        else:  # the common case: a plain sync call
            running = _Running(call, handler, kwargs, ctx, self._sync_call_body)
        self.running[call.id] = running
        assert self.threads is not None
        self.threads.submit(running)

    def _launch(self, running: _Running) -> None:
        """Start an async call's task on the loop (its queue slot is held until it ends)."""
        stream = running.async_credit is not None
        body = self._run_async_stream(running) if stream else self._run_async(running)
        if not self._call_soon(self._start_task, body, running):
            body.close()  # the loop is gone: we are exiting

    def _context(self, call: p.Call) -> CallContext:
        assert self.init is not None
        session = None
        if call.session_id is not None:
            session = self.sessions.get(call.session_id)
            if session is None:  # (the host syncs first; this is only a safety net)
                session = self.sessions[call.session_id] = _WorkerSession()
        return CallContext(
            call_id=call.id,
            command=call.command,
            worker_id=self.init.worker_id,
            session_id=call.session_id,
            session_state=session.state if session is not None else {},
            deadline=(self.loop.time() + call.timeout) if call.timeout else None,
            log=self.log,
            variables=SessionVariables(session.variables) if session is not None else None,
            bridge=self,
        )

    def _start_task(self, body: Coroutine[Any, Any, None], running: _Running) -> None:
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
            self._finish_error(running.call, asyncio.CancelledError(), "")
            return
        running.cancel()
        self._call_soon(self._cancel_task, running)

    def withdraw_call(self, call_id: int) -> None:
        """The host wants the call back to send elsewhere: only if it has not started."""
        if self.threads is None or self.threads.take_back(call_id) is None:
            return  # started (or answered): it finishes here
        self._fail(
            call_id,
            p.FailureKind.WITHDRAWN,
            "Withdrawn",
            "the host withdrew the call before it started",
        )

    @staticmethod
    def _cancel_task(running: _Running) -> None:
        if running.task is not None:
            running.task.cancel()

    # sync handlers run on the leader/follower threads and write their own outcome.

    def _sync_call_body(self, running: _Running) -> None:
        call = running.call
        try:
            if running.ctx is not None:
                self._restore_if_needed(running.ctx)
            value = running.handler(**running.args)
        except BaseException as exc:
            self._finish_error(call, exc, traceback.format_exc())
        else:
            self._finish_value(call, value)  # written from this thread

    def _sync_stream_body(self, running: _Running) -> None:
        call, credit = running.call, running.thread_credit
        assert credit is not None
        try:
            if running.ctx is not None:
                self._restore_if_needed(running.ctx)
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
                    self._send_item(call, item)
                    if call.id not in self.running:
                        break  # the item could not be encoded: the call already failed
            finally:
                generator.close()
        except BaseException as exc:
            self._finish_error(call, exc, traceback.format_exc())
        else:
            self._finish_stream(call)

    # --- sessions and the host bridge -------------------------------------------

    def _sync_session(self, sync: p.SessionSync) -> None:
        session = self.sessions.get(sync.session_id)
        if session is None:
            session = self.sessions[sync.session_id] = _WorkerSession()
        # Replace the cache wholesale: views held by running calls keep the old
        # dict, calls that start after this message see the new one.
        session.variables = dict(sync.variables)
        session.version = sync.version
        if sync.restore is not None:
            session.pending_restore = dict(sync.restore)

    def _restore_if_needed(self, ctx: CallContext) -> None:
        """Run ``restore_session`` once, before the first call of a moved session."""
        if ctx.session_id is None or self.adapter is None:
            return
        session = self.sessions.get(ctx.session_id)
        if session is None or session.pending_restore is None:
            return
        with session.lock:
            state, session.pending_restore = session.pending_restore, None
            if state is not None:
                self.adapter.restore_session(ctx, state)

    def call_host(self, call_id: int, tool: str, args: Any, timeout: float | None) -> Any:
        """Blocking host tool call, from a handler thread."""
        if threading.get_ident() == self._loop_thread:
            raise RuntimeError(
                "ctx.call_host() would block the worker's event loop: use await ctx.acall_host()"
            )
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        host_call_id = next(self._host_call_ids)
        self._send_host_call(host_call_id, call_id, tool, args, future)
        try:
            return future.result(timeout=timeout)
        except concurrent.futures.TimeoutError:
            raise TimeoutError(
                f"host tool {tool!r} did not answer within the call's deadline"
            ) from None
        finally:
            self._host_calls.pop(host_call_id, None)

    async def acall_host(self, call_id: int, tool: str, args: Any, timeout: float | None) -> Any:
        """Host tool call from an async handler."""
        future: asyncio.Future[Any] = self.loop.create_future()
        host_call_id = next(self._host_call_ids)
        self._send_host_call(host_call_id, call_id, tool, args, future)
        try:
            return await asyncio.wait_for(future, timeout)
        finally:
            self._host_calls.pop(host_call_id, None)

    def _send_host_call(
        self,
        host_call_id: int,
        call_id: int,
        tool: str,
        args: Any,
        future: concurrent.futures.Future[Any] | asyncio.Future[Any],
    ) -> None:
        try:
            frame_message = p.HostCall(id=host_call_id, call_id=call_id, tool=tool, args=args)
            self._host_calls[host_call_id] = future
            self.send(frame_message)
        except (TypeError, ProtocolError) as exc:
            self._host_calls.pop(host_call_id, None)
            future.set_exception(
                TypeError(f"arguments of host tool {tool!r} cannot be sent: {exc}")
            )

    def _host_answered(self, message: p.HostReply | p.HostFailure) -> None:
        future = self._host_calls.pop(message.id, None)
        if future is None:
            return  # the caller gave up (deadline) meanwhile
        if isinstance(future, asyncio.Future):  # belongs to the loop: resolve it there
            self._call_soon(_resolve_future, future, message)
        else:
            _resolve_future(future, message)

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
            self._finish_error(call, asyncio.CancelledError(), "")
        if self.threads is not None:
            self.threads.release()

    async def _run_async(self, running: _Running) -> None:
        call = running.call
        try:
            if running.ctx is not None:
                self._restore_if_needed(running.ctx)
            value = await running.handler(**running.args)
        except BaseException as exc:
            self._finish_error(call, exc, traceback.format_exc())
        else:
            self._finish_value(call, value)

    async def _run_async_stream(self, running: _Running) -> None:
        call, credit = running.call, running.async_credit
        assert credit is not None
        try:
            if running.ctx is not None:
                self._restore_if_needed(running.ctx)
        except BaseException as exc:
            self._finish_error(call, exc, traceback.format_exc())
            return
        generator: AsyncIterator[Any] = running.handler(**running.args)
        try:
            async for item in generator:
                await credit.acquire()
                self._send_item(call, item)
                if self.running.get(call.id) is None:
                    break  # an item failed to encode; the call already failed
        except BaseException as exc:
            self._finish_error(call, exc, traceback.format_exc())
        else:
            self._finish_stream(call)
        finally:
            with contextlib.suppress(BaseException):
                await generator.aclose()  # type: ignore[attr-defined]

    # outcomes (loop thread) --------------------------------------------------

    def _finish_value(self, call: p.Call, value: Any) -> None:
        if self.running.pop(call.id, None) is not None:  # (else answered: cancelled at shutdown)
            self.answer_value(call.id, call.command, value)

    def answer_value(self, call_id: int, command: str, value: Any) -> None:
        try:
            # = p.to_wire(p.Result(id=call_id, value=value)), without making
            # the message object (tests/test_worker_fast_path.py pins the bytes).
            self._send_wire({"t": _RESULT_TAG, "i": call_id, "r": value})
        except (TypeError, ProtocolError) as exc:
            self._send_unencodable(call_id, command, "result", value, exc)

    def _send_item(self, call: p.Call, item: Any) -> None:
        if call.id not in self.running:
            return
        try:
            self.send(p.Item(id=call.id, value=item))
        except (TypeError, ProtocolError) as exc:
            running = self._take(call.id)
            if running is not None:
                running.cancel()
            self._send_unencodable(call.id, call.command, "stream item", item, exc)

    def _finish_stream(self, call: p.Call) -> None:
        if self._take(call.id) is not None:
            self.send(p.End(id=call.id))

    def _finish_error(self, call: p.Call, exc: BaseException, tb: str) -> None:
        running = self._take(call.id)
        if running is not None:
            self.report_error(call.id, call.command, exc, tb, cancelled=running.cancelled)

    def report_error(
        self, call_id: int, command: str, exc: BaseException, tb: str, *, cancelled: bool = False
    ) -> None:
        """Answer a call that raised ``exc`` (``cancelled``: the host had cancelled it)."""
        if isinstance(exc, asyncio.CancelledError) or (
            cancelled and isinstance(exc, GeneratorExit)
        ):
            self._fail(
                call_id,
                p.FailureKind.CANCELLED,
                "Cancelled",
                f"call {command!r} was cancelled by the host",
                take=False,
            )
            return
        self._fail(
            call_id, p.FailureKind.APPLICATION, _type_name(exc), _describe(exc), tb, take=False
        )

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
        self._fail(call_id, p.FailureKind.SERIALIZATION, type_name, message, take=False)

    def _fail(
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
            self._take(call_id)
        try:
            self.send(
                p.Failure(id=call_id, kind=kind, type=type_name, message=message, traceback=tb)
            )
        except (TypeError, ProtocolError):  # over max_frame_bytes: say less, but say it
            short = message[:_SHORT_MESSAGE] + (
                " [...truncated]" if len(message) > _SHORT_MESSAGE else ""
            )
            self.send(p.Failure(id=call_id, kind=kind, type=type_name, message=short))

    def _take(self, call_id: int) -> _Running | None:
        return self.running.pop(call_id, None)

    # --- shutdown --------------------------------------------------------------

    def _begin_shutdown(self, code: int, reason: str, *, teardown: bool = True) -> None:
        if self._closing:
            return
        self._closing = True
        if self.threads is not None:
            for job in self.threads.drain():  # queued, never started
                self._finish_error(job.call, asyncio.CancelledError(), "")
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


#: A call of the plain lane: id, command, handler, keyword arguments.
_PlainCall = tuple[int, str, Callable[..., Any], dict[str, Any]]
_SHORT_MESSAGE = 500  # characters of a failure message that did not fit in a frame
_CALL = p.CallMode.CALL
_CALL_MESSAGE = p.Call
_CALL_TAG = p.Call.TAG
_RESULT_TAG = p.Result.TAG


def _describe(exc: BaseException) -> str:
    """``str(exc)``, even for an exception whose ``__str__`` raises."""
    try:
        return str(exc)
    except Exception as inner:
        return f"<str() of this {type(exc).__name__} raised {type(inner).__name__}>"


def _resolve_future(
    future: concurrent.futures.Future[Any] | asyncio.Future[Any],
    message: p.HostReply | p.HostFailure,
) -> None:
    if future.done():
        return
    if isinstance(message, p.HostReply):
        future.set_result(message.value)
    else:
        future.set_exception(RemoteError(message.type, message.message))


def _keyword_arguments(spec: CommandSpec, bound: inspect.BoundArguments) -> dict[str, Any]:
    """The bound arguments as keywords, a ``**kwargs`` parameter flattened into them."""
    kwargs: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        if spec.signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            kwargs.update(value)
        else:
            kwargs[name] = value
    return kwargs


def _mode_problem(spec: CommandSpec, mode: str) -> str | None:
    if mode not in p.CallMode.ALL:
        return f"unknown call mode {mode!r}"
    if spec.is_stream and mode != p.CallMode.STREAM:
        return (
            f"command {spec.name!r} is a stream (a generator): use pool.stream(), not pool.call()"
        )
    if not spec.is_stream and mode == p.CallMode.STREAM:
        return f"command {spec.name!r} is not a stream: use pool.call(), not pool.stream()"
    return None


def _type_name(exc: BaseException) -> str:
    cls = type(exc)
    if cls.__module__ in ("builtins", "__main__"):
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"


class _ForwardingHandler(logging.Handler):
    """Sends log records to the host as ``Log`` messages."""

    def __init__(self, worker: Worker) -> None:
        super().__init__(level=logging.INFO)
        self.worker = worker

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
            self.worker.send(p.Log(level=record.levelno, logger=record.name, message=message))
        except Exception:
            self.handleError(record)


def _install_log_forwarding(worker: Worker) -> None:
    root = logging.getLogger()
    handler = _ForwardingHandler(worker)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root.addHandler(handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.WARNING)
    worker.log.setLevel(logging.INFO)
