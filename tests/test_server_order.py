"""Order on one connection: requests that name the same session take effect in
the order sent (a ``set`` then a call, back to back, runs the call with the new
value); plain calls and casts enter their pool's queue in the order received.
Against a real ``snakepool up``, by hand and through ``snakepool.connect()``."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

import snakepool
from server_wire import Raw, snakepool_up

pytestmark = pytest.mark.anyio

# ``general`` has two workers (a session's calls may run on either, affinity
# "hint"); ``one`` has one, which runs calls in the order they left the queue.
CONFIG = """
[pools.general]
adapter = "sp_server_adapters:Served"
size = 2

[pools.one]
adapter = "sp_server_adapters:Served"
size = 1
"""


def _session(i: int, op: str, **args: Any) -> dict[str, Any]:
    return {"t": "session", "i": i, "p": "general", "op": op, "s": "order-1", "a": args}


def _var(i: int) -> dict[str, Any]:
    return {"t": "call", "i": i, "p": "general", "c": "var", "a": {"name": "t"}, "s": "order-1"}


async def _sessions_in_order(raw: Raw) -> None:
    await raw.send(_session(1, "open"), _session(2, "define", name="t", type="int", initial=0))
    assert [a["r"] for a in (await raw.answers(2)).values()] == ["order-1", None]
    # set, call; set, call; ... 50 times in one write, no answer awaited
    burst = []
    for k in range(1, 51):
        burst += [_session(100 + 2 * k, "set", name="t", value=k), _var(101 + 2 * k)]
    await raw.send(*burst)
    answers = await raw.answers(100)
    assert [answers[101 + 2 * k]["r"] for k in range(1, 51)] == list(range(1, 51))
    # call, set, call: the first call runs before the set, the second after it
    burst = []
    for k in range(51, 71):
        burst += [_var(1000 + 3 * k), _session(1001 + 3 * k, "set", name="t", value=k)]
        burst += [_var(1002 + 3 * k)]
    await raw.send(*burst)
    answers = await raw.answers(60)
    seen = [(answers[1000 + 3 * k]["r"], answers[1002 + 3 * k]["r"]) for k in range(51, 71)]
    assert seen == [(k - 1, k) for k in range(51, 71)]


async def _plain_calls_in_order(raw: Raw) -> None:
    burst = [
        {"t": "call", "i": 5000 + n, "p": "one", "c": "note", "a": {"n": n}}
        | ({"m": "cast"} if n % 3 == 0 else {})
        for n in range(1, 301)
    ]
    await raw.send(*burst)
    answers = await raw.answers(300)
    assert all(a["t"] == "result" for a in answers.values())
    # (one worker: `noted`, queued after them all, runs after them all)
    await raw.send({"t": "call", "i": 1, "p": "one", "c": "noted"})
    assert (await raw.next())["r"] == list(range(1, 301))


async def _through_the_python_client(sock: Path) -> None:
    async with snakepool.connect(sock) as client, client["general"].session("order-2") as s:
        await s.variables.define("t", "int", 0)
        for k in range(1, 31):
            _, seen = await asyncio.gather(s.variables.set("t", k), s.call("var", {"name": "t"}))
            assert seen == k
        for k in range(31, 46):
            before, _, after = await asyncio.gather(
                s.call("var", {"name": "t"}),
                s.variables.set("t", k),
                s.call("var", {"name": "t"}),
            )
            assert (before, after) == (k - 1, k)


async def test_one_connection_keeps_its_order(workdir: Path, env: dict[str, str]) -> None:
    with snakepool_up(workdir, env, CONFIG) as up:
        sock = up.socket
        raw = await Raw.unix(sock)
        try:
            await raw.hello()
            await _sessions_in_order(raw)
            await _plain_calls_in_order(raw)
        finally:
            await raw.aclose()
        await _through_the_python_client(sock)
