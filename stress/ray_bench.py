"""A Ray-backed pool against plain Ray actors, side by side on one local Ray cluster.

Three measurements (issue 21), each with the pool and its baseline in the same run:

- throughput: a pool of 2 Ray-backed workers with 64 callers making no-op calls,
  against 2 Ray async actors called directly with 64 calls in flight
  (target: the pool >= 3x);
- start: 16 Ray-backed workers ready, against 16 plain actors answering a
  first call (target: <= 2x);
- sequential p50: one no-op call at a time, pool against a direct actor call,
  the two interleaved call by call so both see the same machine
  (target: <= 1.5x).

Each is repeated ``--rounds`` times (pool and baseline back to back each
round), and the Ray messages the pool sends per call are counted: writes
(each one remote call, whose reply brings back what the worker answered by
then) and long polls (what no write brought back).

Run: ``PYTHONPATH=src:tests python stress/ray_bench.py [--seconds 5] [--rounds 2]``
(it starts a 2-node cluster with ``ray.cluster_utils.Cluster`` and shuts it down).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # sp_adapters

import ray
from ray.cluster_utils import Cluster

import snakepool
from snakepool.pool._ray import RayPipes

ADAPTER = "sp_adapters:Basic"
RAY_OPTIONS: dict[str, Any] = {"num_cpus": 0}


@ray.remote
class Direct:
    """The baseline: an async actor whose method does nothing."""

    async def echo(self, value: Any = None) -> Any:
        return value


async def pool_calls(pool: snakepool.Pool, callers: int, seconds: float) -> tuple[int, float]:
    """No-op calls from ``callers`` callers for ``seconds``: (calls made, seconds taken)."""
    done = 0
    end = time.perf_counter() + seconds

    async def caller() -> None:
        nonlocal done
        while time.perf_counter() < end:
            await pool.call("echo", {"value": 1})
            done += 1

    start = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(callers)))
    return done, time.perf_counter() - start


async def pool_throughput(pool: snakepool.Pool, callers: int, seconds: float) -> float:
    done, taken = await pool_calls(pool, callers, seconds)
    return done / taken


async def direct_throughput(actors: list[Any], in_flight: int, seconds: float) -> float:
    done = 0
    end = time.perf_counter() + seconds

    async def caller(n: int) -> None:
        nonlocal done
        actor = actors[n % len(actors)]
        while time.perf_counter() < end:
            await actor.echo.remote(1)
            done += 1

    start = time.perf_counter()
    await asyncio.gather(*(caller(n) for n in range(in_flight)))
    return done / (time.perf_counter() - start)


async def p50s(calls: list[Any], count: int) -> list[float]:
    """The median time of each of ``calls``, made in turn ``count`` times."""
    times: list[list[float]] = [[] for _ in calls]
    for _ in range(count):
        for call, taken in zip(calls, times, strict=True):
            start = time.perf_counter()
            await call()
            taken.append(time.perf_counter() - start)
    return [statistics.median(taken) for taken in times]


class Messages:
    """Counts the Ray-backed workers' remote calls: writes and long polls."""

    def __init__(self) -> None:
        self.writes = self.polls = 0
        flush, poll = RayPipes._flush, RayPipes._poll

        def counted_flush(pipes: RayPipes, close: bool = False) -> None:
            self.writes += bool(pipes._unsent) or close
            flush(pipes, close)

        def counted_poll(pipes: RayPipes) -> None:
            self.polls += 1
            poll(pipes)

        RayPipes._flush = counted_flush  # type: ignore[method-assign]
        RayPipes._poll = counted_poll  # type: ignore[method-assign]

    def per_call(self, calls: int) -> str:
        return f"{self.writes / calls:.3f} writes + {self.polls / calls:.3f} polls per call"


async def pool_calls_counted(
    pool: snakepool.Pool, messages: Messages, callers: int, seconds: float
) -> str:
    """Messages per call at ``callers`` in flight and one at a time."""
    messages.writes = messages.polls = 0
    done, _ = await pool_calls(pool, callers, seconds)
    loaded = messages.per_call(done)
    messages.writes = messages.polls = 0
    for _ in range(200):
        await pool.call("echo", {"value": 1})
    return f"{callers} in flight: {loaded}; sequential: {messages.per_call(200)}"


async def start_pool(size: int) -> tuple[float, snakepool.Pool]:
    start = time.perf_counter()
    pool = snakepool.Pool(ADAPTER, size=size, backend="ray", ray=RAY_OPTIONS)
    await pool.start()
    return time.perf_counter() - start, pool


async def start_actors(count: int) -> tuple[float, list[Any]]:
    start = time.perf_counter()
    actors = [Direct.options(**RAY_OPTIONS).remote() for _ in range(count)]  # type: ignore[attr-defined]
    await asyncio.gather(*(actor.echo.remote() for actor in actors))
    return time.perf_counter() - start, actors


async def main(seconds: float, callers: int, workers: int, rounds: int) -> None:
    rows: list[tuple[str, float, float, str]] = []
    messages = Messages()
    for round_ in range(rounds):
        # which starts first takes turns (the first may find Ray's idle workers warm)
        if round_ % 2:
            pool_s, big = await start_pool(workers)
            await big.aclose()
        actors_s, plain = await start_actors(workers)
        for actor in plain:
            ray.kill(actor)
        if not round_ % 2:
            pool_s, big = await start_pool(workers)
            await big.aclose()
        rows.append((f"{workers} workers ready (s)", pool_s, actors_s, "<= 2x"))

    pool = snakepool.Pool(ADAPTER, size=2, backend="ray", ray=RAY_OPTIONS)
    await pool.start()
    try:
        _, direct = await start_actors(2)
        await pool_throughput(pool, callers, 0.5)  # warm both
        await direct_throughput(direct, callers, 0.5)
        for _ in range(rounds):
            pool_rate = await pool_throughput(pool, callers, seconds)
            direct_rate = await direct_throughput(direct, callers, seconds)
            rows.append(
                (f"calls/s, 2 workers, {callers} in flight", pool_rate, direct_rate, ">= 3x")
            )
        for _ in range(rounds):
            pool_p50, direct_p50 = await p50s(
                [lambda: pool.call("echo", {"value": 1}), lambda: direct[0].echo.remote(1)], 300
            )
            rows.append(("sequential p50 (ms)", pool_p50 * 1e3, direct_p50 * 1e3, "<= 1.5x"))
        counted = await pool_calls_counted(pool, messages, callers, 1.0)
    finally:
        await pool.aclose()
    print(f"{'measure':<34} {'ray pool':>10} {'actors':>10} {'ratio':>7}  target")
    for name, ours, theirs, target in rows:
        print(f"{name:<34} {ours:>10.3f} {theirs:>10.3f} {ours / theirs:>7.2f}  {target}")
    print(f"Ray messages: {counted}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="per throughput run")
    parser.add_argument("--callers", type=int, default=64)
    parser.add_argument("--workers", type=int, default=16, help="for the start-time row")
    parser.add_argument("--rounds", type=int, default=2, help="each measure, this many times")
    args = parser.parse_args()
    node = {"num_cpus": 8, "object_store_memory": 100 * 2**20}
    # No idle Ray workers started ahead: otherwise whichever starts first finds 16
    # warm processes (one per CPU, started when the driver connects) and the other
    # none, and the start-time row measures that (4 s against 11 here), not snakepool.
    cold = {"prestart_worker_first_driver": False, "enable_worker_prestart": False}
    cluster = Cluster(
        initialize_head=True,
        connect=True,
        head_node_args={**node, "include_dashboard": False, "_system_config": cold},
    )
    try:
        cluster.add_node(**node)
        cluster.wait_for_nodes()
        asyncio.run(main(args.seconds, args.callers, args.workers, args.rounds))
    finally:
        ray.shutdown()
        cluster.shutdown()
