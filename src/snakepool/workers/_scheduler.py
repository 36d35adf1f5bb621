"""Who runs what next in a worker: leader/follower threads and a watchdog.

Reading uses *leader/follower* threads (:class:`Scheduler`): whichever thread
holds the "leader" role reads the protocol pipe, dispatches what it read, and
runs the sync calls it read itself, so a quick call costs two wake-ups (host
-> worker, worker -> host), as in a bare read/answer loop. A call of a sync
command that is not a stream, with arguments that fit (most calls, with a
session or a ``ctx`` or without), read while the worker is idle skips the
queue: the *lane*, a policy of the same scheduler fed the same ``Call``
messages (a call with neither a session nor a ``ctx`` skips the ``Running``
record too; one with a ``ctx`` is registered, so a cancel reaches it). An idle
*watchdog* thread takes the reading over when the leader has been inside one
call for 2 ms (pings and cancellations keep flowing) and wakes helper threads
for calls that waited that long. There are at most ``concurrency + 1``
threads, started on demand.

Calls start in the order they arrive, sync and async alike, and at most
``limit`` run at once: the host may send more (they wait in the queue), and
it relies on that order to know which calls cannot have started.
"""

from __future__ import annotations

import collections
import enum
import itertools
import os
import sys
import threading
import time
import traceback
from typing import Protocol

from .. import protocol as p
from ..errors import ProtocolError
from ._calls import Calls, LaneCall, Running
from ._stdio import EXIT_INTERNAL_ERROR, FrameWriter, flush_and_exit

__all__ = ["Scheduler", "SchedulerHost"]


class SchedulerHost(Protocol):
    """What the scheduler needs of the worker it serves."""

    calls: Calls
    conn: p.Connection
    writer: FrameWriter | None

    def decode(self, data: bytes | bytearray | memoryview) -> list[p.Message]: ...
    def dispatch(self, messages: list[p.Message]) -> None: ...
    def lane_calls(self, messages: list[p.Message]) -> list[LaneCall] | None: ...
    def queued_from_lane(self, entry: LaneCall) -> Running: ...


class Action(enum.Enum):
    """What a thread without the reader role does next."""

    READ = "read"
    RUN = "run"
    EXIT = "exit"


class Watchdog(enum.Enum):
    """Whether a thread is watching the leader and the queue."""

    NONE = "none"  # nobody: the next call wakes one
    CALLED = "called"  # a thread was woken to watch
    ON = "on"  # a thread is watching


# Module names for the members used per call: looking a member up on its Enum
# class costs ~100 ns on Python 3.11, a module global a few.
_READ, _RUN, _EXIT = Action.READ, Action.RUN, Action.EXIT
_NOBODY, _CALLED, _ON = Watchdog.NONE, Watchdog.CALLED, Watchdog.ON


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


class Scheduler:
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

    def __init__(self, worker: SchedulerHost, fd: int) -> None:
        self.worker = worker
        self.fd = fd
        self.limit = 1  # sync handlers running at once (Init sets concurrency)
        self._lock = threading.Lock()
        self._sleepers = threading.Condition(self._lock)
        self._jobs: collections.deque[tuple[Running, float]] = collections.deque()
        # The lane's calls not started yet (see _run_lane).
        self._lane: collections.deque[LaneCall] = collections.deque()
        self._running = 0
        self._leader_taken = False
        self._leader_busy_since: float | None = None  # the leader is inside a call
        self._role = 0  # bumped when the watchdog takes the reader role over
        self._watchdog = _NOBODY
        self._asleep = 0
        self._threads = 0
        self._last_call = 0.0
        self._reading = True  # false after EOF or a protocol error: nobody reads again
        self._names = itertools.count(1)
        self._read_buffer = bytearray(_READ_BYTES)  # only the leader reads: one is enough

    def start(self) -> None:
        with self._lock:
            self._spawn_locked()

    def submit(self, job: Running) -> None:
        """Queue a call (the leader does, while it dispatches).

        Calls start in the order they arrive, at most ``limit`` at once, sync
        and async alike: the host may send more than ``limit`` (they wait
        here), and it counts on that order to know which ones cannot have
        started (see ``take_back``).
        """
        with self._lock:
            self._jobs.append((job, time.monotonic()))

    def take_back(self, call_id: int) -> Running | None:
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

    def drain(self) -> list[Running]:
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
        a read of plain calls goes to ``_run_lane`` (one lock round trip per
        call); anything else costs one lock round trip after the read and one
        after each call.
        """
        buffer, fd, jobs, lock = self._read_buffer, self.fd, self._jobs, self._lock
        worker = self.worker
        decode, dispatch, lane_calls = worker.decode, worker.dispatch, worker.lane_calls
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
                    dispatch(decode(data))  # (the decoder copies what it keeps)
                large = count == _READ_BYTES
            else:
                large = count == _SMALL_READ
                messages = decode(chunk)
                # Nothing queued or running (only the reader queues calls, and
                # we are it): plain calls may run right here, without a queue.
                calls = lane_calls(messages) if not jobs and not self._running else None
                if calls is not None:
                    if not self._run_lane(calls, role):
                        return True  # the watchdog took reading over: follow
                    continue
                dispatch(messages)
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

    def _next_locked(self) -> tuple[Action, Running | None, int | None]:
        """What a thread without the reader role does next: read, run a call, or exit."""
        while self._reading:
            now = time.monotonic()
            if not self._leader_taken:
                self._leader_taken = True
                return _READ, None, self._role
            if self._jobs and self._running < self.limit:
                return _RUN, self._take_locked(now), None
            if self._watchdog is not _ON:
                self._watchdog = _ON
                decided = self._watch_locked()
                if decided is not None:
                    return decided
                # quiet: sleep until a call needs a watchdog again
            self._asleep += 1
            self._sleepers.wait()  # whoever wakes us decremented _asleep
        return _EXIT, None, None

    def _watch_locked(self) -> tuple[Action, Running | None, int | None] | None:
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
                self._watchdog = _NOBODY
                self._role += 1  # the busy leader finds out when its call ends
                self._leader_busy_since = None
                if self._lane:  # calls read with the long one: queued, first in line
                    queued = map(self.worker.queued_from_lane, reversed(self._lane))
                    self._jobs.extendleft((job, now) for job in queued)
                    self._lane.clear()
                self._wake_helpers_locked()
                return _READ, None, self._role
            if stale:
                self._watchdog = _NOBODY
                job = self._take_locked(now)
                self._wake_helpers_locked()
                return _RUN, job, None
            if stuck is None and not self._jobs and now - self._last_call >= _WATCH_FOR:
                self._watchdog = _NOBODY  # quiet: the next call wakes a watchdog
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

    def _run_lane(self, calls: list[LaneCall], role: int) -> bool:
        """Run the lane calls the leader read, in order, in one slot; false if it lost the role.

        The *lane* (see ``Worker.lane_calls``): what ``_lead`` and
        ``Calls.sync_call_body`` do with queued calls, minus the queue (and,
        for a call without a ``ctx``, the ``Running``), written out in one
        function: a Python call costs about as much here as the no-op call
        itself. A call with a ``ctx`` is registered (a cancel reaches it), so
        it is answered only if still registered, and fails as a queued one
        would. If one call
        takes long, the watchdog takes the reader role over and moves the
        calls not started yet to the front of the queue (``_watch_locked``):
        from there they can run side by side, be cancelled or withdrawn.
        """
        worker, lock, lane = self.worker, self._lock, self._lane
        calls_in_progress, restore = worker.calls.running, worker.calls.restore
        send_parts, writer = worker.conn.send_parts, worker.writer
        assert writer is not None
        # One Result message for the lane's answers, refilled for each: it is
        # encoded at once and never kept (making one per call would cost
        # about as much as the rest of answering it).
        result = p.Result(0, None)
        leading = True
        lock.acquire()  # (held except while a call runs: one round trip per call)
        try:
            lane.extend(calls)
            self._running += 1
            while lane:
                call_id, command, handler, kwargs, running = lane.popleft()
                now = time.monotonic()
                if leading:
                    leading = role == self._role
                    if leading:
                        self._leader_busy_since = now
                self._started_locked(now)
                lock.release()
                try:
                    if running is not None and running.restore is not None:
                        restore(running.restore)  # (its session moved here: rebuilt first)
                    value = handler(**kwargs)
                except BaseException as exc:
                    if running is None:
                        worker.calls.report_error(call_id, command, exc, traceback.format_exc())
                    else:  # (registered: it may have been cancelled)
                        worker.calls.finish_error(running.call, exc, traceback.format_exc())
                else:
                    if running is not None and calls_in_progress.pop(call_id, None) is None:
                        continue  # (answered already: cancelled as the worker stopped)
                    result.id, result.value = call_id, value
                    try:
                        parts = send_parts(result)
                    except (TypeError, ProtocolError):  # the general way says what is wrong
                        worker.calls.answer_value(call_id, command, value)
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

    def _take_locked(self, now: float) -> Running:
        job, _ = self._jobs.popleft()
        self._running += 1
        self._started_locked(now)
        return job

    def _started_locked(self, now: float) -> None:
        """A call started: make sure a watchdog will notice if it takes long."""
        self._last_call = now
        if self._watchdog is not _ON:
            # (also when a thread woken to watch took this call instead)
            self._watchdog = _CALLED
            self._wake_locked(1)

    def _wake_helpers_locked(self) -> None:
        """Threads for every call that may run now, and a new watchdog."""
        runnable = min(len(self._jobs), self.limit - self._running)
        if self._watchdog is _NOBODY:
            self._watchdog = _CALLED
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
