"""``snakepool.Executor``: a ``concurrent.futures.Executor`` running calls in a snakepool pool.

How it works: a :class:`~snakepool.pool.Pool` of the built-in executor adapter
(``snakepool.adapters._executor``) lives on an asyncio loop in a background
thread that the Executor owns. ``submit`` pickles the call at once (so later
changes to its arguments do not travel, and nothing keeps them alive), puts
it in the Executor's own FIFO and returns its future; runner tasks on the
loop take calls from that FIFO into the pool, each awaiting one
``pool.call`` at a time. So:

* ``submit`` never refuses for load: what waits, waits in the Executor's
  FIFO, which has no bound (as ``ProcessPoolExecutor``'s pending work has
  none). The pool holds a window of the Executor's calls: those its workers
  run, and beyond them about as many as they answer in 20 ms (at least one
  per worker, at most ``send_ahead`` per worker and never more than its
  ``queue_size``, so it never refuses them): quick calls are pipelined
  deeply, slow ones stay in the FIFO. A future is ``running`` from the
  moment its call goes to the pool; until then ``cancel()`` takes it back
  (and ``shutdown(cancel_futures=True)`` cancels them all).
* A call is one ``pool.call``, so it gets the pool's failure semantics: a
  crashed worker fails the call it was running with ``WorkerCrashed`` (its
  unstarted calls go to another worker) and is replaced; the Executor never
  breaks. A handler's exception arrives as an instance of its own type that
  is also a ``RemoteError`` carrying the remote traceback.
* Only a failure to start the workers at all (a failing ``initializer``, an
  import error) breaks the Executor, as it breaks ``ProcessPoolExecutor``:
  its futures fail with :class:`~snakepool.errors.ExecutorBroken`.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import concurrent.futures
import contextlib
import functools
import itertools
import logging
import math
import os
import threading
import time
import types
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Final, TypeVar

from .adapters._executor import dumps, function_bytes, loads, run_chunk
from .errors import ExecutorBroken, PoolClosed, PoolOverloaded
from .pool import Pool, PoolStatistics

__all__ = ["Executor"]

_ADAPTER: Final = "snakepool.adapters._executor:ExecutorAdapter"
#: Beyond the calls its workers run, the pool holds (sent ahead to a worker, or
#: queued) about as many as they answer in this long, at least one per worker:
#: short calls are pipelined deeply, long ones stay in the Executor's FIFO,
#: where they can still be cancelled. (Long enough to cover the host's own
#: delays: a window of calls answered in less than a round trip would shrink
#: itself, as its rate is what it lets through.)
_AHEAD_SECONDS: Final = 0.02
#: How often the answer rate behind that is measured.
_RATE_PERIOD: Final = 0.02
#: A call the pool refused for load (a pool set up with a small ``queue_size``,
#: while workers restart) is offered again after this many seconds.
_RETRY_OVERLOADED: Final = 0.01
#: ``ProcessPoolExecutor`` logs an initializer's failure on this logger; so does
#: the Executor (code that watches for it keeps working).
_futures_log = logging.getLogger("concurrent.futures")
_log = logging.getLogger("snakepool.executor")

R = TypeVar("R")

#: Live executors, shut down (waiting for their calls) when the interpreter exits.
_live: weakref.WeakSet[Executor] = weakref.WeakSet()
_exiting = False


def _forked() -> None:
    for executor in list(_live):
        executor._forked = True


os.register_at_fork(after_in_child=_forked)


@atexit.register
def _shutdown_all() -> None:
    global _exiting
    _exiting = True
    for executor in list(_live):
        if not executor._forked:  # (a forked child's copy has no loop thread to stop)
            executor.shutdown(wait=True)


class _Work:
    """One submitted call, waiting in the Executor's FIFO."""

    __slots__ = ("future", "payload", "timeout")

    def __init__(
        self,
        future: concurrent.futures.Future[Any],
        payload: dict[str, bytes],
        timeout: float | None,
    ):
        self.future = future
        self.payload = payload  # (the arguments of the adapter's run)
        self.timeout = timeout


class Executor(concurrent.futures.Executor):
    """``ProcessPoolExecutor``'s API on a snakepool pool: ``submit``, ``map``,
    ``shutdown``, a context manager; usable from any thread and through
    ``loop.run_in_executor``.

    ``max_workers`` is the pool's ``size`` (default ``os.cpu_count()``);
    ``initializer(*initargs)`` runs in every worker when it starts (a
    replaced worker included). ``pool_options`` are :class:`~snakepool.Pool`'s
    (``call_timeout``, ``max_requests``, ``max_memory_mb``, ``preload``,
    ``pythonpath``, ``python``...), except ``size``, ``adapter_config``. The
    workers start in the background at once; calls submitted meanwhile wait.

    Functions and arguments travel pickled (cloudpickle for functions defined
    in ``__main__``, lambdas and closures), so a worker must be able to import
    the modules they come from (``pythonpath=``, ``cwd=``).
    """

    def __init__(
        self,
        max_workers: int | None = None,
        *,
        initializer: Callable[..., object] | None = None,
        initargs: Iterable[Any] = (),
        **pool_options: Any,
    ) -> None:
        if max_workers is not None:
            if not isinstance(max_workers, int) or isinstance(max_workers, bool):
                raise TypeError(f"max_workers must be an int or None, not {max_workers!r}")
            if max_workers <= 0:
                raise ValueError("max_workers must be greater than 0")
        for taken in ("size", "adapter_config"):
            if taken in pool_options:
                fix = "pass max_workers" if taken == "size" else "pass initializer/initargs"
                raise TypeError(f"Executor() sets the pool's {taken!r} itself: {fix}")
        if initializer is not None and not callable(initializer):
            raise TypeError(f"initializer must be callable, not {type(initializer).__name__}")
        config = {"initializer": dumps((initializer, tuple(initargs)))} if initializer else {}
        pool_options.setdefault("name", "executor")
        self._pool = Pool(_ADAPTER, size=max_workers, adapter_config=config, **pool_options)
        pool_config = self._pool.config
        self._max_workers = pool_config.worker_count
        #: Calls the workers run at once; calls in the pool beyond them, at least and at most.
        self._capacity = self._max_workers * pool_config.worker_concurrency
        most = min(pool_config.queue_size, self._max_workers * max(1, pool_config.send_ahead))
        self._ahead = (min(self._max_workers, most), most)
        #: Calls in the pool at most (each awaited by a runner task), calls in the
        #: pool now, and runner tasks (made as the window grows; they park, never end).
        self._window = max(1, self._capacity + self._ahead[0])
        self._in_pool = 0
        self._started_ok = False  # (the pool started: calls go to it directly)
        self._runners = 0
        self._parked: collections.deque[asyncio.Future[None]] = collections.deque()
        self._answered = 0  # since _rate_since
        self._rate_since = 0.0
        self._queue: collections.deque[_Work] = collections.deque()
        self._lock = threading.Lock()  # submit vs shutdown and breaking
        self._shutdown = False
        #: False, or why the Executor is broken (the name ProcessPoolExecutor uses).
        self._broken: str | bool = False
        #: A runner parked for want of calls: the next submit wakes the runners.
        self._wanting = False
        self._forked = False  # (set in a forked child: its loop thread is not there)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._serve, name=f"snakepool-executor-{self._pool.name}", daemon=True
        )
        self._thread.start()
        _live.add(self)

    # --- the concurrent.futures API ------------------------------------------------------

    def submit(
        self, fn: Callable[..., R], /, *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future[R]:
        """Schedule ``fn(*args, **kwargs)`` in a worker; its future.

        A call that cannot be pickled gets a future that failed with
        ``TypeError`` naming the fix (as ``ProcessPoolExecutor``'s future would).
        """
        return self._submit(fn, args, kwargs, None)

    def map(
        self,
        fn: Callable[..., R],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
    ) -> Iterator[R]:
        """As ``ProcessPoolExecutor.map``: every item is submitted at once (in
        chunks of ``chunksize`` items, one call each); results come in order.
        ``timeout`` bounds the whole iteration, as in ``concurrent.futures``."""
        return self._map(fn, iterables, timeout, chunksize, None)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """No more calls; ``cancel_futures``: cancel those not sent to the pool yet.

        The rest run to completion, then the workers stop. ``wait`` blocks until
        that is done; without it, it happens in the background (and, at the
        latest, when the interpreter exits).
        """
        with self._lock:
            self._shutdown = True
        if cancel_futures:
            self._cancel_queued()
        self._wake_threadsafe()
        if wait and threading.current_thread() is not self._thread:
            self._thread.join()

    # --- snakepool's additions ------------------------------------------------------------

    def options(self, *, timeout: float | None = None) -> ExecutorOptions:
        """The same Executor with per-call options: ``timeout`` (seconds) limits
        each call from when it leaves the Executor's FIFO for the pool; a call
        over it fails with :class:`~snakepool.CallTimeout` and, if its worker
        does not stop within ``cancel_grace``, that worker alone is killed and
        replaced. ``executor.options(timeout=5).submit(fn, x)``."""
        if timeout is not None and (isinstance(timeout, bool) or not timeout > 0):
            raise ValueError(f"timeout must be a number of seconds > 0 or None, not {timeout!r}")
        return ExecutorOptions(self, timeout)

    async def asubmit(self, fn: Callable[..., R], /, *args: Any, **kwargs: Any) -> R:
        """``await`` a call from asyncio code (``submit`` wrapped for the running loop)."""
        return await asyncio.wrap_future(self.submit(fn, *args, **kwargs))

    def statistics(self) -> PoolStatistics:
        """The pool's statistics (workers, their pids and requests, failures by category)."""
        if not self._thread.is_alive() or threading.current_thread() is self._thread:
            return self._pool.statistics()
        return asyncio.run_coroutine_threadsafe(self._statistics(), self._loop).result()

    @property
    def max_workers(self) -> int:
        return self._max_workers

    def __repr__(self) -> str:
        state = "broken" if self._broken else "shut down" if self._shutdown else "running"
        return f"<snakepool.Executor {self._pool.name!r} max_workers={self._max_workers} {state}>"

    # --- submitting -----------------------------------------------------------------------

    def _submit(
        self,
        fn: Callable[..., R],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        timeout: float | None,
    ) -> concurrent.futures.Future[R]:
        if not callable(fn):
            raise TypeError(f"{fn!r} is not callable")
        future: concurrent.futures.Future[R] = concurrent.futures.Future()
        try:
            payload = _pickled(fn, args, kwargs)
        except TypeError as exc:
            self._check_open()
            future.set_running_or_notify_cancel()
            future.set_exception(exc)
            return future
        with self._lock:
            self._check_open()
            self._queue.append(_Work(future, payload, timeout))
            wake = self._wanting
            self._wanting = False
        if wake:
            self._loop.call_soon_threadsafe(self._wake)
        return future

    def _check_open(self) -> None:
        if self._broken:
            raise ExecutorBroken(str(self._broken))
        if self._shutdown:
            if _exiting:
                raise RuntimeError("cannot schedule new futures after interpreter shutdown")
            raise RuntimeError("cannot schedule new futures after shutdown")
        if self._forked:
            raise RuntimeError(
                "this Executor belongs to the process this one was forked from: make a new one here"
            )

    def _map(
        self,
        fn: Callable[..., R],
        iterables: tuple[Iterable[Any], ...],
        timeout: float | None,
        chunksize: int,
        call_timeout: float | None,
    ) -> Iterator[R]:
        if not isinstance(chunksize, int) or chunksize < 1:
            raise ValueError(f"chunksize must be an int >= 1, not {chunksize!r}")
        submit = functools.partial(self._submit_args, call_timeout)
        if chunksize == 1:
            return _results(submit, fn, zip(*iterables, strict=False), timeout)
        chunks = _chunks(zip(*iterables, strict=False), chunksize)
        return itertools.chain.from_iterable(
            _results(submit, functools.partial(run_chunk, fn), ((c,) for c in chunks), timeout)
        )

    def _submit_args(
        self, timeout: float | None, fn: Callable[..., R], args: tuple[Any, ...]
    ) -> concurrent.futures.Future[R]:
        return self._submit(fn, args, {}, timeout)

    def _cancel_queued(self) -> None:
        """Cancel the calls in the FIFO, once the runners took what they would take
        now (as ProcessPoolExecutor's shutdown leaves the calls it already queued
        for its workers to run)."""
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            with contextlib.suppress(RuntimeError):  # (the loop closed meanwhile)
                ran = asyncio.run_coroutine_threadsafe(self._cancel_on_loop(), self._loop)
                ran.result()
                return
        self._cancel_now()

    async def _cancel_on_loop(self) -> None:
        self._wake()  # (the calls the window has room for)
        for _ in range(2):  # (a woken runner takes a call in its next step)
            await asyncio.sleep(0)
        self._cancel_now()

    def _cancel_now(self) -> None:
        queue = self._queue
        while True:
            try:
                work = queue.popleft()
            except IndexError:
                return
            if work.future.cancel():
                work.future.set_running_or_notify_cancel()  # (wakes wait() and as_completed())

    def _wake_threadsafe(self) -> None:
        with contextlib.suppress(RuntimeError):  # (the loop is closed: nothing waits)
            self._loop.call_soon_threadsafe(self._wake_all)

    # --- the loop thread ------------------------------------------------------------------

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._main())
        except BaseException as exc:  # (a bug: say so, and fail what waits, not hang it)
            _log.exception("snakepool.Executor %r stopped", self._pool.name)
            with self._lock:
                self._broken = f"the Executor stopped: {exc!r}"
            self._fail_queued(exc)
        finally:
            self._loop.close()

    async def _main(self) -> None:
        # The runners take calls at once (those futures are running: as with
        # ProcessPoolExecutor, a few calls are committed before any worker is
        # up); their calls wait for the pool to start.
        #: None once the pool started; the error if it could not start
        self._started: asyncio.Future[BaseException | None] = self._loop.create_future()
        try:
            async with asyncio.TaskGroup() as self._tasks:
                self._rate_since = time.monotonic()
                self._add_runners()
                try:
                    await self._pool.start()
                except Exception as exc:  # (the pool closed itself)
                    self._break(exc)  # (and the runners end)
                else:
                    self._started.set_result(None)
                    self._started_ok = True
        finally:
            await self._pool.aclose()

    def _break(self, exc: BaseException) -> None:
        """The workers cannot start: fail every call, now and later."""
        _futures_log.critical(
            "snakepool.Executor %r cannot start its workers, and is broken: %s",
            self._pool.name,
            exc,
        )
        with self._lock:
            self._broken = f"the Executor's workers could not start: {exc}"
        exc = _detached(exc)
        self._started.set_result(exc)  # (the runners' calls fail)
        self._fail_queued(exc)
        self._wake_all()

    def _fail_queued(self, cause: BaseException) -> None:
        queue = self._queue
        while queue:
            work = queue.popleft()
            if work.future.set_running_or_notify_cancel():
                work.future.set_exception(self._broken_error(cause))

    def _broken_error(self, cause: BaseException) -> ExecutorBroken:
        """A fresh error for each call (a shared one would gather each raiser's frames)."""
        error = ExecutorBroken(str(self._broken))
        error.__cause__ = cause
        return error

    # Runners: each takes a call from the FIFO into the pool and awaits it, while
    # the pool holds fewer than the window's calls; else it parks. A runner whose
    # call ended goes on by itself, and wakes parked ones for the calls it finds
    # beyond its own: while every worker is busy, the calls' ends drive the rest
    # on the loop, with no wake-up from other threads. Only a runner that parks
    # with a worker free sets _wanting: the next submit then wakes the loop.

    async def _runner(self) -> None:
        queue, call = self._queue, self._pool.call
        while True:
            if not queue or self._in_pool >= self._window:
                if self._broken or (self._shutdown and not queue):
                    self._wake_all()  # (the others end too)
                    return
                await self._park()
                continue
            work = queue.popleft()
            future = work.future
            if not future.set_running_or_notify_cancel():
                continue
            self._in_pool += 1
            if queue and self._parked and self._in_pool < self._window:
                self._wake()  # (more calls, and room for them)
            try:
                try:
                    if self._started_ok:
                        answer = await call("run", work.payload, timeout=work.timeout)
                    else:
                        answer = await self._call(call, work)
                except PoolOverloaded:
                    answer = await self._call(call, work)
                result = loads(answer)
            except BaseException as exc:
                if isinstance(exc, asyncio.CancelledError):  # (the loop stops: a bug)
                    future.set_exception(PoolClosed("the Executor stopped"))
                    raise
                future.set_exception(_detached(exc))
                del exc
            else:
                future.set_result(result)
                del result  # (a runner keeps no result alive while it parks)
            finally:
                self._in_pool -= 1
            del work, future
            self._answered += 1
            if self._in_pool or queue:
                if not self._answered & 15:  # (a clock reading every 16 answers is enough)
                    self._measure()
            else:  # (idle now: the rate is measured again from the next call on)
                self._answered, self._rate_since = 0, time.monotonic()

    async def _park(self) -> None:
        parked = self._loop.create_future()
        self._parked.append(parked)
        if not self._queue and self._in_pool < self._capacity:
            self._wanting = True
            if self._queue or self._shutdown or self._broken:  # (came in between: see _submit)
                self._wake_all()
        await parked

    def _wake(self) -> None:
        """Wake a parked runner for each call in the FIFO the window has room for."""
        parked, queue = self._parked, self._queue
        woken = 0
        while True:
            room = self._window - self._in_pool - woken
            calls = len(queue) - woken
            while parked and room > 0 and calls > 0:
                waiter = parked.popleft()
                if not waiter.done():
                    waiter.set_result(None)
                    woken, room, calls = woken + 1, room - 1, calls - 1
            if not parked or room <= 0 or self._in_pool + woken >= self._capacity:
                return  # (the calls' ends drive the rest)
            self._wanting = True  # (out of calls, a worker free: the next submit wakes runners)
            if len(queue) <= woken:
                return
            self._wanting = False  # (a call came in between: wake for it here)

    def _wake_all(self) -> None:
        parked, self._parked = self._parked, collections.deque()
        for waiter in parked:
            if not waiter.done():
                waiter.set_result(None)

    def _add_runners(self) -> None:
        for _ in range(self._window - self._runners):
            self._tasks.create_task(self._runner())
        self._runners = max(self._runners, self._window)

    def _measure(self) -> None:
        """Every _RATE_PERIOD: the window from the rate at which calls are answered
        (while there are calls: idle time does not shrink it)."""
        now = time.monotonic()
        elapsed = now - self._rate_since
        if elapsed < _RATE_PERIOD:
            return
        least, most = self._ahead
        ahead = math.ceil(self._answered / elapsed * _AHEAD_SECONDS)
        grew = self._capacity + min(max(ahead, least), most) - self._window
        self._window += grew
        self._answered, self._rate_since = 0, now
        if grew > 0 and self._queue:
            self._add_runners()
            self._wake()

    async def _call(self, call: Callable[..., Any], work: _Work) -> Any:
        """A call the slow way: once the workers started, and offered again while
        the pool refuses it for load (submit never refuses for load: it waits)."""
        if (broken := await self._started) is not None:
            raise self._broken_error(broken)
        while True:
            try:
                return await call("run", work.payload, timeout=work.timeout)
            except PoolOverloaded:
                await asyncio.sleep(_RETRY_OVERLOADED)

    async def _statistics(self) -> PoolStatistics:
        return self._pool.statistics()


class ExecutorOptions:
    """An :class:`Executor` with per-call options (see :meth:`Executor.options`)."""

    def __init__(self, executor: Executor, timeout: float | None) -> None:
        self.executor = executor
        self.timeout = timeout

    def submit(
        self, fn: Callable[..., R], /, *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future[R]:
        return self.executor._submit(fn, args, kwargs, self.timeout)

    def map(
        self,
        fn: Callable[..., R],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
    ) -> Iterator[R]:
        """``Executor.map``; the per-call timeout applies to each chunk."""
        return self.executor._map(fn, iterables, timeout, chunksize, self.timeout)

    async def asubmit(self, fn: Callable[..., R], /, *args: Any, **kwargs: Any) -> R:
        return await asyncio.wrap_future(self.submit(fn, *args, **kwargs))


def _pickled(
    fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> dict[str, bytes]:
    """The arguments of the executor adapter's ``run`` for ``fn(*args, **kwargs)``;
    ``TypeError`` naming what cannot be pickled, and the fix."""
    function = function_bytes(fn)
    try:
        arguments = dumps((args, kwargs), "the arguments")
    except TypeError as exc:
        raise TypeError(f"calling {getattr(fn, '__qualname__', fn)!r}: {exc}") from exc.__cause__
    return {"fn": function, "args": arguments}


def _chunks(items: Iterator[tuple[Any, ...]], size: int) -> Iterator[list[tuple[Any, ...]]]:
    while chunk := list(itertools.islice(items, size)):
        yield chunk


def _results(
    submit: Callable[[Callable[..., R], tuple[Any, ...]], concurrent.futures.Future[R]],
    fn: Callable[..., R],
    calls: Iterable[tuple[Any, ...]],
    timeout: float | None,
) -> Iterator[R]:
    """``concurrent.futures.Executor.map``'s result iterator (every call submitted
    first; on leaving early, the calls not started are cancelled)."""
    end = None if timeout is None else timeout + time.monotonic()
    futures = [submit(fn, args) for args in calls]
    return _yield_in_order(futures, end)


def _yield_in_order(futures: list[concurrent.futures.Future[R]], end: float | None) -> Iterator[R]:
    try:
        futures.reverse()  # (popped from the end: nothing finished stays referenced)
        while futures:
            if end is None:
                yield futures.pop().result()
            else:
                yield futures.pop().result(end - time.monotonic())
    finally:
        for future in futures:
            future.cancel()


def _detached(exc: BaseException) -> BaseException:
    """``exc`` without the frames of runner tasks in its traceback.

    A future's exception reaches user code, which may clear its traceback's
    frames (``unittest``'s ``assertRaises`` does): clearing the frame of a
    suspended coroutine closes it, which would end a runner.
    """
    tb = exc.__traceback__
    if tb is None:
        return exc
    kept = []
    while tb is not None:
        if tb.tb_frame.f_code not in _RUNNER_CODE:
            kept.append(tb)
        tb = tb.tb_next
    rebuilt = None
    for entry in reversed(kept):
        rebuilt = types.TracebackType(rebuilt, entry.tb_frame, entry.tb_lasti, entry.tb_lineno)
    return exc.with_traceback(rebuilt)


#: The code of the coroutines that live as long as the Executor (see _detached).
_RUNNER_CODE: Final = frozenset({Executor._runner.__code__, Executor._main.__code__})
