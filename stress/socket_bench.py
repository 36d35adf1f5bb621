"""The socket server against the embedded pool, side by side in one run.

The same pool (``generic``, ``--workers`` workers, ``echo``) twice: embedded
in this process (``Pool.call``), and served by a real ``snakepool up`` in a
subprocess, called through ``snakepool.connect()``. They take turns, round
after round, so a drift of the machine hits both alike: each round,
sequential calls (p50 latency) of each, then ``--callers`` concurrent callers
(throughput) of each. CPU per call is the scheduler's CPU time (Linux:
``/proc/<pid>/task/*/schedstat``) of the *host*, the process doing the pool's
host work (this process for the embedded pool, ``snakepool up`` for the
socket), and of *all* the processes a call costs (the host, its workers and,
through the socket, this process as the client). Medians over the rounds;
the ratios are the medians of each round's own ratio.

A bare round trip over a Unix socket (an echo server on uvloop in a
subprocess, no snakepool at either end) is timed each round too: the least
a hop through any local server adds to a sequential call on this machine,
so ``embedded p50 + bare round trip`` is a floor of the socket's p50. So is
a round trip through a relay (a uvloop process that forwards each message to
the echo server and back: three processes and four hops, as client, server
and worker make, with no work): ``embedded p50 + relay - bare`` is what
waking a third process twice more costs a sequential call on this machine.

Run: python stress/socket_bench.py [--workers 2] [--rounds 10] [--sequential 500]
                                   [--calls 5000] [--callers 64] [--uvloop] [--json OUT]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
from cpu_per_call import worker_cpu_ns  # (the same per-thread CPU reading)

import snakepool

Call = Callable[[Any], Awaitable[Any]]

POOL_OPTIONS = {"call_timeout": 300.0, "queue_size": 100_000, "startup_timeout": 300.0}


def cpu_seconds(*pids: int) -> float:
    """CPU time of every thread of these processes (the scheduler's, in
    nanoseconds: far finer than the 10 ms ticks of ``cpu_times()``)."""
    return worker_cpu_ns(list(pids)) / 1e9


@dataclass
class Peer:
    """One way to make the call, and the processes whose CPU it costs."""

    call: Call
    host: int  #: the process doing the pool's host work
    workers: list[int]
    client: int | None = None  #: this process, when it is not the host

    def cpu(self) -> tuple[float, float, float]:
        """CPU so far: (host, workers, client)."""
        client = cpu_seconds(self.client) if self.client else 0.0
        return cpu_seconds(self.host), cpu_seconds(*self.workers), client


def start_up(workdir: Path, workers: int) -> tuple[subprocess.Popen[bytes], Path]:
    """A real ``snakepool up`` serving pool ``bench`` (same options as the embedded one)."""
    config = workdir / "pools.toml"
    options = "".join(f"{key} = {value!r}\n" for key, value in POOL_OPTIONS.items())
    config.write_text(f'[pools.bench]\nadapter = "generic"\nsize = {workers}\n{options}')
    sock = workdir / "s.sock"
    env = {**os.environ, "SNAKEPOOL_RUNTIME_DIR": str(workdir / "run")}
    env.pop("SNAKEPOOL_SOCKET", None)
    command = [sys.executable, "-m", "snakepool.cli", "up", "--config", str(config)]
    up = subprocess.Popen(
        [*command, "--socket", str(sock), "--no-live"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        env=env,
    )
    return up, sock


def stop_up(up: subprocess.Popen[bytes]) -> None:
    up.send_signal(signal.SIGTERM)
    try:
        up.wait(timeout=60)
    except subprocess.TimeoutExpired:
        up.kill()
        up.wait()


@contextlib.asynccontextmanager
async def snakepool_up(workdir: Path, workers: int) -> AsyncIterator[tuple[Path, int]]:
    """A real ``snakepool up`` serving pool ``bench``; yields (socket, pid) once it answers."""
    up, sock = start_up(workdir, workers)
    try:
        deadline = time.monotonic() + 300
        while True:
            if up.poll() is not None:
                raise RuntimeError(f"snakepool up exited with {up.returncode}")
            try:
                async with snakepool.connect(sock) as client:
                    await client["bench"].call("echo", {"value": 0})
                    break
            except ConnectionError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)
        yield sock, up.pid
    finally:
        stop_up(up)


_HELPER_SERVER = """
import asyncio, sys
class Echo(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport
    def data_received(self, data):
        self.transport.write(data)
class Relay(asyncio.Protocol):  # each message on to the server at argv[2], its answer back
    def connection_made(self, transport):
        self.transport = transport
        self.onward = None
        self.early = []
        asyncio.ensure_future(self.connect())
    async def connect(self):
        back = self.transport
        class Back(asyncio.Protocol):
            def data_received(self, data):
                back.write(data)
        loop = asyncio.get_running_loop()
        self.onward, _ = await loop.create_unix_connection(Back, sys.argv[2])
        for data in self.early:
            self.onward.write(data)
    def data_received(self, data):
        if self.onward is None:
            self.early.append(data)
        else:
            self.onward.write(data)
async def main(path):
    server = Relay if len(sys.argv) > 2 else Echo
    await asyncio.get_running_loop().create_unix_server(server, path)
    print("ready", flush=True)
    await asyncio.Event().wait()
try:
    import uvloop
    run = uvloop.run
except ImportError:
    run = asyncio.run
run(main(sys.argv[1]))
"""


class _Echoed(asyncio.Protocol):
    def __init__(self) -> None:
        self.answered: asyncio.Future[None] | None = None

    def data_received(self, data: bytes) -> None:
        if self.answered is not None and not self.answered.done():
            self.answered.set_result(None)


@contextlib.asynccontextmanager
async def _serving(path: Path, onward: Path | None = None) -> AsyncIterator[None]:
    """An echo server at ``path`` (or, given ``onward``, a relay to the server
    there), listening once it prints a line."""
    argv = [str(path)] if onward is None else [str(path), str(onward)]
    server = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _HELPER_SERVER, *argv, stdout=subprocess.PIPE
    )
    try:
        assert server.stdout is not None
        await server.stdout.readline()
        yield
    finally:
        server.kill()
        await server.wait()


@contextlib.asynccontextmanager
async def _round_trips(path: Path) -> AsyncIterator[Call]:
    """A call that is one round trip of ~40 bytes through the server at ``path``."""
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_unix_connection(_Echoed, str(path))
    request = b"\x00" * 40  # (about an echo call's request)

    async def round_trip(value: Any) -> Any:
        protocol.answered = loop.create_future()
        transport.write(request)
        await protocol.answered
        return value

    try:
        yield round_trip
    finally:
        transport.close()


@contextlib.asynccontextmanager
async def bare_echo(workdir: Path) -> AsyncIterator[tuple[Call, Call]]:
    """Two calls: one bare round trip through a Unix socket echo server, and one
    through a relay to it (three processes, four hops, no work)."""
    echo, relay = workdir / "echo.sock", workdir / "relay.sock"
    async with (
        _serving(echo),
        _serving(relay, echo),
        _round_trips(echo) as bare,
        _round_trips(relay) as relayed,
    ):
        yield bare, relayed


async def sequential(call: Call, n: int) -> list[float]:
    samples = []
    for i in range(n):
        started = time.perf_counter()
        await call(i)
        samples.append(time.perf_counter() - started)
    return samples


async def concurrent(call: Call, callers: int, total: int) -> float:
    """Seconds for ``total`` calls from ``callers`` concurrent tasks."""
    remaining = total

    async def caller() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            if await call(7) != 7:
                raise AssertionError("echo returned something else")

    started = time.perf_counter()
    async with asyncio.TaskGroup() as tg:
        for _ in range(min(callers, total)):
            tg.create_task(caller())
    return time.perf_counter() - started


async def measure(args: argparse.Namespace) -> dict[str, dict[str, list[float]]]:
    keys = ("p50", "seq_cpu", "seq_total", "rate", "cpu", "workers", "client", "total")
    found: dict[str, dict[str, list[float]]] = {
        name: {key: [] for key in keys} for name in ("embedded", "socket")
    }
    found["bare"] = {"p50": []}
    found["relay"] = {"p50": []}
    me = os.getpid()
    with tempfile.TemporaryDirectory(prefix="sp-bench-") as tmp:
        async with (
            snakepool.Pool("generic", size=args.workers, **POOL_OPTIONS) as pool,  # type: ignore[arg-type]
            snakepool_up(Path(tmp), args.workers) as (sock, up_pid),
            snakepool.connect(sock) as client,
            bare_echo(Path(tmp)) as (bare, relay),
        ):
            remote = client["bench"]

            async def embedded(value: Any) -> Any:
                return await pool.call("echo", {"value": value})

            async def socket(value: Any) -> Any:
                return await remote.call("echo", {"value": value})

            served = [child.pid for child in psutil.Process(up_pid).children(recursive=True)]
            peers = {
                "embedded": Peer(embedded, me, [w.pid for w in pool.statistics().workers if w.pid]),
                "socket": Peer(socket, up_pid, served, client=me),
            }
            for peer in peers.values():  # warm up
                await sequential(peer.call, 300)
                await concurrent(peer.call, args.callers, 2000)
            await sequential(bare, 300)
            await sequential(relay, 300)
            # Short turns, many rounds: each peer sees the same (drifting) machine.
            for _ in range(args.rounds):
                for name, peer in peers.items():
                    row = found[name]
                    before = peer.cpu()
                    samples = sorted(await sequential(peer.call, args.sequential))
                    row["p50"].append(samples[len(samples) // 2])
                    used = [
                        (b - a) / args.sequential for a, b in zip(before, peer.cpu(), strict=True)
                    ]
                    row["seq_cpu"].append(used[0])
                    row["seq_total"].append(sum(used))
                for name, reference in (("bare", bare), ("relay", relay)):
                    samples = sorted(await sequential(reference, args.sequential))
                    found[name]["p50"].append(samples[len(samples) // 2])
                for name, peer in peers.items():
                    row = found[name]
                    before = peer.cpu()
                    elapsed = await concurrent(peer.call, args.callers, args.calls)
                    row["rate"].append(args.calls / elapsed)
                    used = [(b - a) / args.calls for a, b in zip(before, peer.cpu(), strict=True)]
                    for key, value in zip(("cpu", "workers", "client"), used, strict=True):
                        row[key].append(value)
                    row["total"].append(sum(used))
    return found


def report(found: dict[str, dict[str, list[float]]], args: argparse.Namespace) -> str:
    med = {name: {k: statistics.median(v) for k, v in row.items()} for name, row in found.items()}
    emb, sock = med["embedded"], med["socket"]
    rounds = list(
        zip(found["embedded"]["p50"], found["bare"]["p50"], found["relay"]["p50"], strict=True)
    )
    floors = [(e + b) / e for e, b, _ in rounds]
    relay_floors = [(e + r - b) / e for e, b, r in rounds]

    def ratio(key: str) -> str:  # the median of the rounds' own ratios
        pairs = zip(found["socket"][key], found["embedded"][key], strict=True)
        ratios = [s / e for s, e in pairs if e]
        return f"{statistics.median(ratios):17.2f}x" if ratios else ""

    def row(label: str, key: str, scale: float = 1e6, fmt: str = "12.1f") -> str:
        return f"{label:34}{emb[key] * scale:{fmt}}{sock[key] * scale:{fmt}}{ratio(key)}"

    n = args.callers
    return "\n".join(
        [
            f"socket server vs embedded pool: generic echo, {args.workers} workers, "
            f"median of {args.rounds} rounds, this process on "
            f"{'uvloop' if getattr(args, 'uvloop', False) else 'asyncio'}",
            f"{'':34}{'embedded':>12}{'socket':>12}{'socket/embedded':>18}",
            row("sequential p50 (us)", "p50"),
            f"{'  bare socket round trip p50 (us)':34}{'':12}{med['bare']['p50'] * 1e6:12.1f}",
            f"{'  floor: embedded p50 + bare':34}{'':12}"
            f"{(emb['p50'] + med['bare']['p50']) * 1e6:12.1f}{statistics.median(floors):17.2f}x",
            f"{'  relay round trip p50 (us)':34}{'':12}{med['relay']['p50'] * 1e6:12.1f}",
            f"{'  floor: embedded p50 + relay - bare':34}{'':12}"
            f"{(emb['p50'] + med['relay']['p50'] - med['bare']['p50']) * 1e6:12.1f}"
            f"{statistics.median(relay_floors):17.2f}x",
            row(f"{n} in flight (calls/s)", "rate", 1, "12,.0f"),
            row("host CPU per call, sequential (us)", "seq_cpu"),
            row(f"host CPU per call, {n} in flight (us)", "cpu"),
            row("  its workers' CPU per call (us)", "workers"),
            row("  the client's CPU per call (us)", "client"),
            row("all CPU per call, sequential (us)", "seq_total"),
            row(f"all CPU per call, {n} in flight (us)", "total"),
            "host: this process for the embedded pool, the snakepool up process for the",
            "socket; client: this process, through the socket; all: host, workers, client.",
            "Ratios are the medians of each round's own ratio. Bare: a round trip through a",
            "Unix socket echo server (uvloop, no snakepool): what any local server's hop costs.",
            "Relay: through a uvloop relay to that echo server (3 processes, 4 hops, no work):",
            "relay - bare is what waking a third process twice more costs, as the socket does.",
        ]
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--sequential", type=int, default=500)
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--callers", type=int, default=64)
    parser.add_argument(
        "--uvloop",
        action="store_true",
        help="run this process (the embedded pool and the client) on uvloop too "
        "(snakepool up runs on uvloop whenever it is installed)",
    )
    parser.add_argument("--json", type=Path, help="also write the raw samples here")
    args = parser.parse_args()
    if args.uvloop:
        import uvloop

        found = uvloop.run(measure(args))
    else:
        found = asyncio.run(measure(args))
    print(report(found, args))
    if args.json is not None:
        args.json.write_text(json.dumps(found, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
