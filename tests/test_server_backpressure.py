"""Back-pressure, not refusal: a connection past its bounds (requests running,
bytes held) is held back, its requests wait in order, a ``cancel`` still
works, and a client that never reads leaves the server's memory bounded.
Streams wait for credit. Real workers, a real server (and ``snakepool up``
where the server's own memory is measured)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import psutil
import pytest

import snakepool
from server_wire import Raw, frame, never_reading, snakepool_up
from snakepool.server import ConnectionStatistics, SocketServer
from waiting import wait_until

pytestmark = pytest.mark.anyio

ADAPTER = "sp_server_adapters:Served"
MiB = 2**20


@asynccontextmanager
async def serving(size: int = 1, **options: Any) -> AsyncIterator[tuple[SocketServer, Path]]:
    directory = Path(tempfile.mkdtemp(prefix="sp-"))
    try:
        async with snakepool.Pool(ADAPTER, size=size, name="general") as pool:
            server = SocketServer({"general": pool}, socket_path=directory / "s.sock", **options)
            async with anyio.create_task_group() as tg:
                await tg.start(server.serve)
                yield server, directory / "s.sock"
                tg.cancel_scope.cancel()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _only(server: SocketServer) -> ConnectionStatistics:
    [connection] = server.statistics().connections
    return connection


def _call(i: int, command: str, **args: Any) -> dict[str, Any]:
    return {"t": "call", "i": i, "p": "general", "c": command, "a": args}


async def test_a_connection_past_its_bounds_waits_and_can_still_cancel(workdir: Path) -> None:
    release = str(workdir / "release")
    async with serving(max_inflight_per_client=2) as (server, sock):
        raw = await Raw.unix(sock)
        await raw.hello()
        await raw.send(
            *(_call(i, "hold", release=release) for i in (1, 2, 3, 4)), _call(5, "echo", value=5)
        )
        await wait_until(lambda: _only(server).held == 3)  # 1 and 2 run, 3, 4, 5 wait
        await raw.send({"t": "cancel", "i": 4})  # held: answered at once
        assert (await raw.next())["i"] == 4
        await raw.send({"t": "cancel", "i": 1})  # running: cancelled in the pool
        cancelled = await raw.next()
        assert (cancelled["i"], cancelled["k"]) == (1, "cancelled")
        (workdir / "release").touch()
        answers = await raw.answers(3)
        assert {i: a["t"] for i, a in answers.items()} == {2: "result", 3: "result", 5: "result"}
        assert answers[5]["r"] == 5
        stats = _only(server)
        assert (stats.held, stats.held_back, stats.in_flight) == (0, 3, 0)
        await raw.aclose()


async def test_a_thousand_calls_in_flight_are_all_served() -> None:
    async with serving(size=2) as (server, sock), snakepool.connect(sock) as client:
        general = client["general"]
        with anyio.fail_after(60):
            results = []
            async with anyio.create_task_group() as tg:

                async def one(n: int) -> None:
                    results.append(await general.call("echo", {"value": n}))

                for n in range(1000):
                    tg.start_soon(one, n)
        assert sorted(results) == list(range(1000))  # (none refused: no PoolOverloaded)
        assert _only(server).held_back > 0  # (past the 256 running, they waited)


async def test_a_client_that_never_reads_is_held_to_the_byte_bound() -> None:
    bound = 2 * MiB
    value = b"v" * (256 * 1024)
    async with serving(max_bytes_per_client=bound) as (server, sock):
        calls = b"".join(frame(_call(i, "echo", value=value)) for i in range(1, 201))  # 50 MiB
        with never_reading(sock, calls):
            await wait_until(
                lambda: (
                    bool(server.statistics().connections)
                    and _only(server).reading_paused
                    and _only(server).writing_paused
                )
            )
            stats = _only(server)
            assert stats.held > 0
            assert stats.bytes_in < len(calls) // 2
            # what the server holds: requests held and running, answers not taken
            assert stats.buffered_bytes <= 3 * bound + len(frame(_call(1, "echo", value=value)))
        await wait_until(lambda: not server.statistics().connections)


async def test_snakepool_up_memory_stays_bounded_for_a_client_that_never_reads(
    workdir: Path, env: dict[str, str]
) -> None:
    """The report: 256 calls of 1 MiB values, answers never read, held 775 MB."""
    config = '[pools.general]\nadapter = "generic"\nsize = 2\n'
    with snakepool_up(workdir, env, config) as up:
        sock = up.socket
        async with snakepool.connect(sock) as watcher:
            server = psutil.Process(up.pid)
            base = server.memory_info().rss
            calls = b"".join(frame(_call(i, "echo", value=b"x" * MiB)) for i in range(1, 257))

            async def paused() -> bool:
                rows = (await watcher.server_statistics())["connections"]
                return any(row["reading_paused"] for row in rows)

            with never_reading(sock, calls):
                await wait_until(paused, timeout=30)
                peak = server.memory_info().rss
            assert peak - base < 200 * MiB, f"{(peak - base) / MiB:.0f} MiB held"
            assert await watcher["general"].call("echo", {"value": 1}) == 1


async def test_a_stream_waits_for_credit() -> None:
    async with serving() as (server, sock):
        raw = await Raw.unix(sock)
        await raw.hello()
        await raw.send(_call(1, "count_to", n=10) | {"m": "stream", "w": 3})
        items = [(await raw.next())["r"] for _ in range(3)]
        await wait_until(lambda: _only(server).streams_paused == 1)
        assert _only(server).bytes_out == raw.received  # (nothing more was sent)
        await raw.send({"t": "credit", "i": 1, "n": 7})
        while (got := await raw.next())["t"] == "item":
            items.append(got["r"])
        assert (got["t"], items) == ("end", list(range(10)))
        await raw.aclose()


async def test_the_python_client_reads_streams_through_a_window() -> None:
    async with serving() as (server, sock), snakepool.connect(sock) as client:
        stream = client["general"].stream("count_to", {"n": 1000})
        first = await stream.__anext__()
        await wait_until(lambda: _only(server).streams_paused == 1)  # 64 sent, then it waits
        rest = [item async for item in stream]
        assert [first, *rest] == list(range(1000))
