"""Choosing a worker for a call: synchronous decisions, a bounded FIFO of waiters.

``acquire()`` returns a worker with one slot *reserved* for the caller
(``worker.reserved``); ``WorkerHandle.submit`` consumes the reservation and
``release()`` returns an unused one. A reservation is what makes it safe to
await between choosing a worker and sending it the call (a session's state
is fetched from its store in between).

Waiters may want one particular worker (a session with strict affinity); a
slot that frees goes to the first waiter that can use it.

A waiter that carries its call (``enqueue_call``: every call but a session's) is
*sent* at the hand-off, in the same event-loop turn the slot freed, without
waking its caller first: a saturated pool's workers then never sit idle while
a woken caller gets scheduled, and the caller wakes once, for the answer.

Sending ahead: a worker runs ``concurrency`` calls and
may hold ``ahead`` more, which it starts in arrival order as slots free, so
a busy worker never waits a round trip for its next call. Least-loaded
choice keeps calls on free workers first. When a worker has free slots and
nothing is queued, calls waiting inside another worker are *withdrawn* from
it (the worker gives back one that has not started) and sent to the free
one: a quick call never stays stuck behind a slow one.

``queue_size`` bounds every *waiting* call: those in the queue here and those
sent ahead that a worker holds but has not started (what it holds beyond its
``concurrency``). A full pool refuses a call at once (``PoolOverloaded``)
instead of parking it in a busy worker. The check is O(1) on the hot path:
a counter that grows with every call sent ahead is an upper bound of those
not started yet, and only when it says "full" are the workers counted
exactly (which resets it): answers cost nothing extra.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Callable, Sequence

import anyio

from ..errors import PoolOverloaded, SnakepoolError
from ._backend import Loop, NotStarted
from ._calls import PendingCall
from ._pacing import AHEAD_HORIZON
from ._worker import READY_STATES, WorkerHandle

__all__ = ["Dispatcher"]


class _Waiter:
    """A caller queued for a free worker slot.

    It waits on ``event`` (made on first use). A waiter with a ``call`` is
    sent at the hand-off instead (its caller waits on the call itself).
    """

    __slots__ = ("_event", "call", "deadline", "error", "frame", "want", "worker")

    def __init__(self, want: WorkerHandle | None) -> None:
        self._event: anyio.Event | None = None
        self.want = want
        self.worker: WorkerHandle | None = None
        self.error: SnakepoolError | None = None
        self.call: PendingCall | None = None
        self.frame = b""
        self.deadline = 0.0  # (event-loop time) a call is not sent after it

    @property
    def event(self) -> anyio.Event:
        if self._event is None:
            self._event = anyio.Event()
        return self._event

    def reset(self) -> None:
        self._event = None
        self.worker = None

    def wake(self) -> None:
        if self._event is not None:
            self._event.set()

    def can_use(self, worker: WorkerHandle) -> bool:
        return self.want is None or self.want is worker


class Dispatcher:
    """Least-loaded dispatch with a bounded queue (``PoolOverloaded`` when full)."""

    def __init__(
        self,
        pool: str,
        queue_size: int,
        workers: Sequence[WorkerHandle],
        check_open: Callable[[], None],
    ) -> None:
        self.pool = pool
        self.queue_size = queue_size
        self._workers = workers
        self._check_open = check_open
        self.loop: Loop = NotStarted()  # (the pool's, once it starts)
        self._waiters: collections.deque[_Waiter] = collections.deque()
        self._sent_ahead = False  # some call may be waiting inside a worker
        self._recheck_armed = False  # a timer will look for calls to take back
        # At least as many as the calls sent ahead that workers hold and have not
        # started (exact after ``waiting_ahead()``, +1 per call sent ahead since).
        self._ahead_bound = 0

    @property
    def queued(self) -> int:
        return len(self._waiters)

    def waiting_ahead(self) -> int:
        """Calls sent ahead that workers hold and have not started, counted now:
        what each holds beyond its ``concurrency`` (it starts them in order)."""
        total = 0
        for worker in self._workers:
            held = len(worker.pending) - worker.concurrency
            if held > 0:
                total += held
        self._ahead_bound = total
        return total

    def _refuse_if_full(self) -> None:
        """One more waiting call would go over ``queue_size``: ``PoolOverloaded``."""
        queued = len(self._waiters)
        if queued + self._ahead_bound < self.queue_size:
            return  # (the bound says there is room: then there is)
        ahead = self.waiting_ahead()
        if queued + ahead >= self.queue_size:
            raise PoolOverloaded(
                f"pool {self.pool!r} is overloaded: {queued + ahead} calls are waiting "
                f"({queued} in its queue, {ahead} sent ahead to busy workers and not started; "
                f"queue_size={self.queue_size}); the call was refused, nothing queued"
            )

    def has_work_for(self, worker: WorkerHandle) -> bool:
        """A slot that freed in ``worker`` has someone to go to: a queued caller,
        or (when the worker has a slot free) a call waiting inside another one."""
        if self._waiters:
            return True
        return self._sent_ahead and len(worker.pending) + worker.reserved < worker.concurrency

    # --- choosing ---------------------------------------------------------------

    def pick(
        self,
        bound_sessions: Callable[[WorkerHandle], int] | None = None,
        skip: Callable[[WorkerHandle], bool] | None = None,
        *,
        ahead: bool = False,
    ) -> WorkerHandle | None:
        """The least-loaded ready worker with a free slot (fewest sessions on ties).

        ``ahead``: a slot to wait in the worker counts as free too, unless the
        worker has a slot promised to a caller who has not sent yet (a session
        call being prepared): later calls must not get in before it.
        """
        best: WorkerHandle | None = None
        best_load = best_bound = 0
        for worker in self._workers:  # (this runs per call: plain reads, no properties)
            if worker.state not in READY_STATES:
                continue
            reserved = worker.reserved
            load = len(worker.pending) + reserved
            if ahead and not reserved:
                limit = worker.concurrency + worker.ahead
            else:
                limit = worker.concurrency
            if load >= limit or (skip is not None and skip(worker)):
                continue
            if bound_sessions is None:
                if not load:
                    return worker  # idle: nothing beats it
                if best is None or load < best_load:
                    best, best_load = worker, load
                continue
            bound = bound_sessions(worker)
            if best is None or (load, bound) < (best_load, best_bound):
                best, best_load, best_bound = worker, load, bound
                if not load and not bound:
                    break
        return best

    @staticmethod
    def _fits(worker: WorkerHandle, ahead: bool) -> bool:
        """``worker`` is ready and has a free slot (``ahead``: or one to wait in; see pick)."""
        load = worker.load_if_ready
        if ahead and not worker.reserved:
            return 0 <= load < worker.concurrency + worker.ahead
        return 0 <= load < worker.concurrency

    def try_reserve(
        self,
        want: WorkerHandle | None = None,
        bound_sessions: Callable[[WorkerHandle], int] | None = None,
        *,
        ahead: bool = False,
    ) -> WorkerHandle | None:
        """Reserve a slot now if one is free and no earlier caller could use it.

        ``ahead``: a slot to wait in a busy worker will do.
        """
        waiters = self._waiters
        if (
            waiters
            and want is None
            and (waiters[0].want is None or any(waiter.want is None for waiter in waiters))
        ):
            return None  # a queued caller takes any worker, so it comes first (FIFO)
        if want is not None:
            worker = want if self._fits(want, ahead) and not self._claimed(want) else None
        else:
            worker = self.pick(bound_sessions, skip=self._claimed if waiters else None, ahead=ahead)
        if worker is not None:
            if ahead and len(worker.pending) + worker.reserved >= worker.concurrency:
                # It would wait in the worker. (The bound is checked first: the
                # exact count runs only when it says the pool may be full.)
                if len(waiters) + self._ahead_bound >= self.queue_size:
                    self._refuse_if_full()
                self._sent_ahead = True
                self._ahead_bound += 1
            worker.reserved += 1
        return worker

    def _claimed(self, worker: WorkerHandle) -> bool:
        """A queued caller could use ``worker``: it comes first."""
        return any(waiter.can_use(worker) for waiter in self._waiters)

    def reserve_home(self, home: WorkerHandle) -> WorkerHandle | None:
        """A slot on ``home`` for a call of a session bound to it: a free one, or
        one to wait in, up to the worker's send-ahead *limit* (the pool's
        ``send_ahead``), not its paced depth; none if a queued caller that
        could use ``home`` comes first.

        Why not the paced depth: pacing keeps a quick call from waiting long in
        a worker when another could take it, but a session's call can only go
        to its worker (or move, at the price of a restore): it waits for that
        worker either way. And a slot promised to a caller still preparing
        (``reserved``) does not stop it: calls of other sessions may go first.
        """
        waiters = self._waiters
        if waiters and any(waiter.can_use(home) for waiter in waiters):
            return None
        load = home.load_if_ready
        if not 0 <= load < home.concurrency + home.pacing.limit:
            return None
        if load >= home.concurrency:  # it waits in the worker: a waiting call
            if len(waiters) + self._ahead_bound >= self.queue_size:  # (see try_reserve)
                self._refuse_if_full()
            self._sent_ahead = True
            self._ahead_bound += 1
        home.reserved += 1
        return home

    def try_reserve_first(self) -> WorkerHandle | None:
        """A free slot (not one to wait in) for a call that goes before every queued one."""
        worker = self.pick()
        if worker is not None:
            worker.reserved += 1
        return worker

    async def acquire(
        self,
        want: WorkerHandle | None = None,
        bound_sessions: Callable[[WorkerHandle], int] | None = None,
    ) -> WorkerHandle:
        """A worker with a slot reserved for the caller (``want``: only that one)."""
        worker = self.try_reserve(want, bound_sessions)
        if worker is not None:
            return worker
        return await self.wait(self.enqueue(want))

    def enqueue(self, want: WorkerHandle | None = None) -> _Waiter:
        """A place in the queue, or ``PoolOverloaded`` when ``queue_size`` calls
        already wait (queued, or sent ahead and not started)."""
        if len(self._waiters) + self._ahead_bound >= self.queue_size:
            self._refuse_if_full()
        waiter = _Waiter(want)
        self._waiters.append(waiter)
        return waiter

    def enqueue_call(
        self,
        call: PendingCall,
        frame: bytes,
        deadline: float,
        *,
        first: bool = False,
        want: WorkerHandle | None = None,
    ) -> _Waiter:
        """Queue ``call`` to be sent by the hand-off (the caller waits on ``call.waiter``).

        Once sent, ``call.worker`` is set. A call whose ``deadline`` (event-loop
        time) has passed is dropped from the queue instead, never sent, even
        if its timer has not run yet: the caller raises when it does.
        ``first``: a call sent before, which its worker never started, goes
        back to the head of the line (and is never refused). ``want``: only
        that worker may take it (a session's call waits for its worker).
        """
        if first:
            waiter = _Waiter(None)
            self._waiters.appendleft(waiter)
        else:
            waiter = self.enqueue(want)
        waiter.call, waiter.frame, waiter.deadline = call, frame, deadline
        return waiter

    async def wait(self, waiter: _Waiter) -> WorkerHandle:
        while True:
            # (after a requeue the hand-off may already have happened)
            if waiter.worker is None and waiter.error is None:
                try:
                    await waiter.event.wait()
                except BaseException:
                    self.leave(waiter)
                    raise
            if waiter.error is not None:
                raise waiter.error
            worker = waiter.worker
            assert worker is not None
            if worker.is_ready:
                return worker
            self._requeue(waiter, worker)

    def _requeue(self, waiter: _Waiter, worker: WorkerHandle) -> None:
        """The worker died between the hand-off and now: queue again, at the front."""
        worker.reserved -= 1
        self._check_open()
        waiter.reset()
        if waiter.want is worker:
            waiter.want = None
        self._waiters.appendleft(waiter)
        self.hand_off_any()

    def release(self, worker: WorkerHandle) -> None:
        """Give back a reservation that was not used."""
        worker.reserved -= 1
        self.on_capacity(worker)

    def leave(self, waiter: _Waiter) -> None:
        """The caller gave up: drop it from the queue, or return its hand-off."""
        if waiter.call is not None:  # sent (then the caller abandons the call) or queued
            if waiter.call.worker is None:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            return
        if waiter.worker is not None:
            worker, waiter.worker = waiter.worker, None
            self.release(worker)
        else:
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)

    # --- handing off ----------------------------------------------------------------

    def on_capacity(self, worker: WorkerHandle) -> None:
        """A slot freed (or a worker became ready): hand it to the first waiter that can use it.

        Nobody waiting and a slot still free: take a call back from a worker
        that holds calls it has not started (see ``_withdraw_for``).
        """
        waiters = self._waiters
        now = None
        while waiters:
            load = worker.load_if_ready
            first = waiters[0]
            if first.want is None or first.want is worker:  # the usual case: the first in line
                waiter = first
            else:
                found = next((w for w in waiters if w.can_use(worker)), None)
                if found is None:
                    break  # (nobody queued can use it: it may still take calls back)
                waiter = found
            call = waiter.call
            if call is None or worker.reserved:  # (see pick: a promised slot comes first)
                limit = worker.concurrency
            else:
                limit = worker.concurrency + worker.ahead
            if load < 0 or load >= limit:
                return
            if waiter is first:
                waiters.popleft()
            else:
                waiters.remove(waiter)
            if call is None:
                waiter.worker = worker
                worker.reserved += 1
                waiter.wake()
            else:
                if now is None:
                    now = self.loop.time()
                if call.expired or now >= waiter.deadline:
                    continue  # dropped, never sent: its caller raises CallTimeout
                if load >= worker.concurrency:  # (from the queue into the worker: still waiting)
                    self._sent_ahead = True
                    self._ahead_bound += 1
                worker.reserved += 1
                call.queued = None  # (out of the queue: and no cycle left for the GC to find)
                worker.submit(call, waiter.frame)
        if self._sent_ahead:
            self._withdraw_for(worker)

    def _withdraw_for(self, worker: WorkerHandle) -> None:
        """``worker`` has free slots and nothing is queued: ask other workers for
        calls they hold but have not started (the newest first), one per slot.

        Not from a worker that will start them soon anyway (``holds_briefly``:
        quick calls flowing), which a withdrawal would only slow down; that
        is looked at again after ``AHEAD_HORIZON``, in case it stalled.
        """
        load = worker.load_if_ready
        free = worker.concurrency - load
        if free <= 0 or load < 0:
            return
        surplus_anywhere = flowing = False
        for other in self._workers:
            if other is worker or free <= 0:
                continue
            waiting = len(other.pending) - other.concurrency  # surely not started
            if waiting <= 0:
                continue
            surplus_anywhere = True
            if other.holds_briefly():
                flowing = True
                continue
            for call in reversed(other.pending.values()):
                if waiting <= 0 or free <= 0:
                    break
                waiting -= 1
                if call.withdrawing:  # already on its way back: it fills a free slot
                    free -= 1
                elif call.frame and not call.abandoned and call.session_id is None:
                    other.withdraw(call)
                    free -= 1
        if not surplus_anywhere and free > 0:
            self._sent_ahead = False  # nothing waits in any worker now
        elif flowing and free > 0 and not self._recheck_armed:
            self._recheck_armed = True
            self.loop.call_at(self.loop.time() + AHEAD_HORIZON, self._recheck)

    def _recheck(self) -> None:
        self._recheck_armed = False
        if self._sent_ahead and not self._waiters:
            for worker in self._workers:
                self._withdraw_for(worker)

    def hand_off_any(self) -> None:
        for worker in self._workers:
            if not self._waiters:
                return
            self.on_capacity(worker)

    def on_worker_exit(self, worker: WorkerHandle) -> list[PendingCall]:
        """Waiters that wanted only this worker now take any (their session
        moves); the queued calls that wanted only it leave the queue and are
        returned, in order (their session's route sends them again)."""
        orphans: list[PendingCall] = []
        kept: list[_Waiter] = []
        for waiter in self._waiters:
            if waiter.want is worker:
                if waiter.call is not None:
                    orphans.append(waiter.call)
                    continue
                waiter.want = None
            kept.append(waiter)
        self._waiters.clear()
        self._waiters.extend(kept)
        self.hand_off_any()
        return orphans

    def fail_all(self, error: SnakepoolError) -> None:
        for waiter in self._waiters:
            waiter.error = error
            waiter.wake()
            call = waiter.call
            if call is not None and call.waiter is not None and not call.waiter.done():
                call.waiter.set_result(None)  # its caller finds waiter.error
        self._waiters.clear()
