"""Requests made in one event-loop turn, answered by one batch (the Redis store's
reads and TTL refreshes: one round trip shared by every session call of a turn)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Generic, TypeVar

from ..errors import SessionStoreUnavailable

__all__ = ["Batcher"]

_K = TypeVar("_K")
_V = TypeVar("_V")
#: A request of a ``Batcher``: its future, and what makes its result of the value
#: read; or no future, and a callback given the value or the error (``Batcher.soon``).
_Waiter = tuple["asyncio.Future[Any] | None", Callable[..., Any]]


class Batcher(Generic[_K, _V]):
    """Requests made in one event-loop turn go together, as one batch; those made
    while a batch is on its way wait for it, then go together as the next one.

    ``run`` gets the distinct keys and returns a value for each, in order. A request
    waits for a batch sent after it was made (never one already in flight), so its
    answer is as new as a request of its own would have been. One task sends the
    batches: woken by the first request of a turn, it sends at the next turn, with
    every request made by then. (Two batches in flight cost more per call and were
    no faster: the batches shrink.)
    """

    def __init__(self, run: Callable[[list[_K]], Awaitable[list[_V]]]) -> None:
        self._run = run
        self._waiting: dict[_K, list[_Waiter]] = {}
        self._wakeup: asyncio.Future[None] | None = None  # the sender waits on it when idle
        self._sender: asyncio.Task[None] | None = None
        self._closed = False

    def get(self, key: _K) -> asyncio.Future[_V]:
        """The value of ``key``, from the next batch (a future: no coroutine per call)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[_V] = loop.create_future()
        if self._closed:
            future.set_exception(_closed())
        else:
            self._add(key, (future, _same))
        return future

    def soon(self, key: _K, done: Callable[[_V | None, Exception | None], None]) -> bool:
        """Call ``done(value, None)``, or ``done(None, error)``, in the completion of the
        next batch (never before this returns); false if closed (nothing is called)."""
        if self._closed:
            return False
        self._add(key, (None, done))
        return True

    def _add(self, key: _K, waiter: _Waiter) -> None:
        waiting = self._waiting.get(key)
        if waiting is None:
            self._waiting[key] = [waiter]
        else:
            waiting.append(waiter)
        wakeup = self._wakeup
        if wakeup is not None and not wakeup.done():
            wakeup.set_result(None)
        elif self._sender is None or self._sender.done():
            self._sender = asyncio.get_running_loop().create_task(self._send_forever())

    async def _send_forever(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                if not self._waiting:
                    self._wakeup = loop.create_future()
                    await self._wakeup
                batch, self._waiting = self._waiting, {}
                await self._batch(batch)
        except BaseException:  # (cancelled: the store is closing)
            _fail(self._waiting, _closed())
            self._waiting = {}
            raise

    async def _batch(self, batch: dict[_K, list[_Waiter]]) -> None:
        keys = list(batch)
        try:
            values = await self._run(keys)
        except Exception as exc:
            _fail(batch, exc)
            return
        except BaseException:
            _fail(batch, _closed())
            raise
        for key, value in zip(keys, values, strict=True):
            for future, then in batch[key]:
                if future is None:
                    then(value, None)
                elif not future.done():  # (else its caller left)
                    future.set_result(then(value))

    async def aclose(self) -> None:
        self._closed = True
        sender, self._sender = self._sender, None
        if sender is not None:
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
        _fail(self._waiting, _closed())
        self._waiting = {}


def _closed() -> SessionStoreUnavailable:
    return SessionStoreUnavailable("the session store was closed")


def _same(value: _V) -> _V:
    return value


def _fail(batch: Mapping[Any, list[_Waiter]], error: Exception) -> None:
    for waiters in batch.values():
        for future, then in waiters:
            if future is None:
                then(None, _copy(error))
            elif not future.done():
                future.set_exception(_copy(error))


def _copy(exc: Exception) -> Exception:
    """A fresh exception like ``exc`` for each waiter (each raise adds to a traceback)."""
    try:
        copy = type(exc)(*exc.args)
    except Exception:
        return exc
    copy.__cause__ = exc.__cause__
    return copy
