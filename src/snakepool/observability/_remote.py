"""The socket server's ``logs`` and ``subscribe`` requests (docs/protocol.md,
"Observing"): each answers with ``item`` frames, and ``logs`` without
``f`` with an ``end``; the client ends the others with ``cancel``.

The server hands the request's frame to :func:`observe` and sends what it
yields. Nothing here waits on a pool: a subscriber that reads slowly loses
the oldest events or lines (each item says how many so far, ``dropped``).
"""

from __future__ import annotations

import math
from collections.abc import AsyncGenerator, Callable, Mapping
from typing import Any

import anyio

from ..pool import Event, Pool
from ._logs import DEFAULT_LINES, LogLine, worker_logs
from ._stream import DEFAULT_BUFFER, Subscription, check_buffer

__all__ = ["OBSERVE_REQUESTS", "event_item", "observe", "plain"]

#: The request types :func:`observe` serves.
OBSERVE_REQUESTS = frozenset({"logs", "subscribe"})
#: How often a waiting request looks whether the server is shutting down.
_CHECK_EVERY = 0.5
_DEFAULT_LAST = 100


def observe(
    kind: str,
    frame: Mapping[str, Any],
    pools: Mapping[str, Pool],
    stopping: Callable[[], bool] = lambda: False,
) -> AsyncGenerator[dict[str, Any], None]:
    """The items answering a ``logs`` or ``subscribe`` request. Its fields are
    checked first: ``ValueError``, ``TypeError`` or ``KeyError`` say what is
    wrong before anything is sent. Ends when ``stopping()`` turns true."""
    if kind == "logs":
        return _logs(frame, pools, stopping)
    if kind == "subscribe":
        return _subscribe(frame, pools, stopping)
    raise ValueError(f"unknown request type {kind!r}; one of {', '.join(sorted(OBSERVE_REQUESTS))}")


def _logs(
    frame: Mapping[str, Any], pools: Mapping[str, Pool], stopping: Callable[[], bool]
) -> AsyncGenerator[dict[str, Any], None]:
    name = frame.get("p")
    if not isinstance(name, str) or name not in pools:
        raise KeyError(f"no pool named {name!r} (pools: {', '.join(sorted(pools))})")
    worker = frame.get("u")
    if worker is not None and (type(worker) is not int or worker < 0):
        raise ValueError(f"logs: worker 'u' must be a worker id (an int >= 0), got {worker!r}")
    if worker is not None and worker >= pools[name].config.worker_count:
        raise ValueError(
            f"logs: pool {name!r} has no worker {worker} "
            f"(its workers: 0 to {pools[name].config.worker_count - 1})"
        )
    last = frame.get("n", _DEFAULT_LAST)
    if type(last) is not int or last < 0:
        raise ValueError(f"logs: 'n' (lines to show) must be an int >= 0, got {last!r}")
    follow = frame.get("f", False)
    if type(follow) is not bool:
        raise TypeError(f"logs: 'f' (follow) must be true or false, got {follow!r}")
    logs = worker_logs()

    async def items() -> AsyncGenerator[dict[str, Any], None]:
        if not follow:
            for kept in logs.lines(name, worker, last):
                yield _line_item(kept, 0)
            return
        follower = logs.follow(name, worker, last=last, buffer=DEFAULT_LINES)
        try:
            while not stopping():
                line: LogLine | None = None
                with anyio.move_on_after(_CHECK_EVERY):  # (never around a yield)
                    line = await follower.get()
                if line is not None:
                    yield _line_item(line, follower.dropped)
        finally:
            follower.close()

    return items()


def _line_item(line: LogLine, dropped: int) -> dict[str, Any]:
    return {
        "pool": line.pool,
        "worker": line.worker,
        "time": line.time,
        "level": line.level,
        "line": line.line,
        "dropped": dropped,
    }


def _subscribe(
    frame: Mapping[str, Any], pools: Mapping[str, Pool], stopping: Callable[[], bool]
) -> AsyncGenerator[dict[str, Any], None]:
    names, wanted, buffer = frame.get("e"), frame.get("p"), frame.get("b", DEFAULT_BUFFER)
    check_buffer(buffer)
    subscription = Subscription(pools.values(), names=names, pool_names=wanted, buffer=buffer)

    async def items() -> AsyncGenerator[dict[str, Any], None]:
        try:
            while not stopping():
                got = None
                with anyio.move_on_after(_CHECK_EVERY):  # (never around a yield)
                    got = await subscription.next_stamped()
                if got is not None:
                    yield event_item(got[1], got[0], subscription.dropped)
        except StopAsyncIteration:
            return
        finally:
            subscription.close()

    return items()


def event_item(event: Event, stamp: float, dropped: int) -> dict[str, Any]:
    """An event as a plain map (its data made of plain values)."""
    return {
        "name": event.name,
        "pool": event.pool,
        "worker": event.worker,
        "time": stamp,
        "data": plain(event.data),
        "dropped": dropped,
    }


def plain(value: Any, depth: int = 0) -> Any:
    """``value`` as JSON/MessagePack-friendly values (anything else as its repr)."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if depth > 8:
        return repr(value)
    if isinstance(value, Mapping):
        return {str(key): plain(item, depth + 1) for key, item in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [plain(item, depth + 1) for item in value]
    return repr(value)
