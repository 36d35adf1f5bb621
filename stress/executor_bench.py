"""snakepool.Executor against ProcessPoolExecutor, and numpy arrays against raw bytes (issue 25).

Run::

    python stress/executor_bench.py [--workers N] [--rounds 5] [--calls 20000] [--quick]

Side by side in one run, in alternating rounds (this VM's speed drifts by tens
of percent over minutes: each round measures every contender in turn, and the
median of the rounds is reported):

1. ``submit`` of a no-op with 64 futures in flight, two ways: 64 asyncio tasks
   each awaiting ``loop.run_in_executor(executor, noop, i)``, and one thread
   that keeps 64 futures in flight (a semaphore released by a done-callback).
   Target: snakepool.Executor >= 2x ProcessPoolExecutor.
2. ``map(noop, range(n), chunksize=c)`` for a few chunk sizes (items per second).
3. ``map`` over 100,000 items with default settings (chunksize 1): that it works
   (the Executor's FIFO has no bound), and how long it takes next to PPE's.
4. Round trip of a 16 MiB float32 numpy array through ``Pool.call`` (the worker
   protocol's array extension type, both ways) against the raw pipe loop's
   16 MiB ``bytes`` round trip (``snakepool bench``'s raw asyncio loop).
   Target: >= 1x.

Both executors get the same worker count (default: ``os.cpu_count()``).
Calls per second drift with whatever else runs on a shared VM; the CPU each
call costs (this process, all its threads, plus the workers) drifts far less,
so the submit rows report it too. Nothing here asserts a number: targets
print PASS/FAIL with their ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import psutil

import snakepool
from snakepool._bench._raw import RawLoopPeer

MiB = 2**20
IN_FLIGHT = 64


def noop(x: Any = None) -> Any:
    return x


# --- 1. submit with 64 in flight ---------------------------------------------------------------


def _cpu_seconds() -> float:
    """CPU time of this process (every thread) and of all its descendants so far."""
    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        with contextlib.suppress(psutil.Error):  # (a worker that just exited)
            total += sum(child.cpu_times()[:2])
    return total


def with_cpu(measure: Callable[[], float], calls: int) -> tuple[float, float]:
    """``measure()``'s rate, and the CPU (host and workers) it took per call, in us."""
    before = _cpu_seconds()
    rate = measure()
    return rate, (_cpu_seconds() - before) / calls * 1e6


async def _run_in_executor(executor: concurrent.futures.Executor, calls: int) -> float:
    loop = asyncio.get_running_loop()
    left = calls

    async def caller() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await loop.run_in_executor(executor, noop, left)

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(IN_FLIGHT)))
    return calls / (time.perf_counter() - started)


def run_in_executor_rate(executor: concurrent.futures.Executor, calls: int) -> float:
    return asyncio.run(_run_in_executor(executor, calls))


def window_rate(executor: concurrent.futures.Executor, calls: int) -> float:
    """One thread keeps IN_FLIGHT futures in flight (a semaphore freed by each done-callback)."""
    slots = threading.BoundedSemaphore(IN_FLIGHT)

    def free(_: object) -> None:
        slots.release()

    started = time.perf_counter()
    for i in range(calls):
        slots.acquire()
        executor.submit(noop, i).add_done_callback(free)
    for _ in range(IN_FLIGHT):
        slots.acquire()
    return calls / (time.perf_counter() - started)


def map_rate(executor: concurrent.futures.Executor, items: int, chunksize: int) -> float:
    started = time.perf_counter()
    count = sum(1 for _ in executor.map(noop, range(items), chunksize=chunksize))
    assert count == items
    return items / (time.perf_counter() - started)


# --- 4. a 16 MiB array against 16 MiB of bytes -------------------------------------------------


async def _bandwidth(call: Callable[[Any], Any], payload: Any, size: int, rounds: int) -> float:
    echoed = await call(payload)  # (and a check that it came back whole)
    assert len(bytes(echoed)) == size if isinstance(echoed, bytes) else echoed.nbytes == size
    started = time.perf_counter()
    for _ in range(rounds):
        await call(payload)
    return size * rounds / (time.perf_counter() - started) / 1e6


async def array_against_bytes(workers: int, rounds: int, per_round: int) -> dict[str, list[float]]:
    size = 16 * MiB
    array = np.random.default_rng(0).random(size // 4, dtype=np.float32)
    payload = os.urandom(size)
    raw = RawLoopPeer(workers)
    await raw.start()
    moved: dict[str, list[float]] = {"array": [], "bytes": []}
    try:
        async with snakepool.Pool("generic", name="values-bench", size=workers) as pool:

            async def echo(value: Any) -> Any:
                return await pool.call("echo", {"value": value})

            for _ in range(rounds):
                moved["bytes"].append(await _bandwidth(raw.call, payload, size, per_round))
                moved["array"].append(await _bandwidth(echo, array, size, per_round))
    finally:
        await raw.aclose()
    return moved


# --- the run -----------------------------------------------------------------------------------


def _median(values: list[float]) -> float:
    return statistics.median(values)


def _verdict(name: str, ratio: float, target: float) -> str:
    return f"{name}: {ratio:.2f}x (target >= {target:g}x) {'PASS' if ratio >= target else 'FAIL'}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=20_000, help="calls per round (submit)")
    parser.add_argument("--quick", action="store_true", help="2 rounds of fewer calls")
    args = parser.parse_args(argv)
    rounds, calls = (2, 3000) if args.quick else (args.rounds, args.calls)
    workers = args.workers
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs (load average {load}), "
        f"{workers} workers each"
    )

    makers: dict[str, Callable[[], concurrent.futures.Executor]] = {
        "ProcessPoolExecutor": lambda: concurrent.futures.ProcessPoolExecutor(workers),
        "snakepool.Executor": lambda: snakepool.Executor(workers),
    }
    executors = {name: make() for name, make in makers.items()}
    results: dict[str, dict[str, list[float]]] = {name: {} for name in executors}
    chunk_sizes = (1, 16, 256)
    map_items = calls
    try:
        for executor in executors.values():  # (workers up, code paths warm)
            run_in_executor_rate(executor, 500)
            window_rate(executor, 500)
        for _ in range(rounds):
            for name, executor in executors.items():
                got = results[name]
                for key, measure in (
                    ("run_in_executor", run_in_executor_rate),
                    ("window", window_rate),
                ):
                    rate, cpu = with_cpu(lambda m=measure, e=executor: m(e, calls), calls)
                    got.setdefault(key, []).append(rate)
                    got.setdefault(f"{key} CPU us/call", []).append(cpu)
                for chunksize in chunk_sizes:
                    rate = map_rate(executor, map_items * (1 if chunksize == 1 else 5), chunksize)
                    got.setdefault(f"map c={chunksize}", []).append(rate)
        hundred_k = {}
        for name, executor in executors.items():
            started = time.perf_counter()
            done = sum(1 for _ in executor.map(noop, range(100_000)))
            hundred_k[name] = (done, time.perf_counter() - started)
    finally:
        for executor in executors.values():
            executor.shutdown()

    sp, ppe = results["snakepool.Executor"], results["ProcessPoolExecutor"]
    rates = [key for key in sp if "CPU" not in key]
    print(f"\n1-2. no-op calls per second, median of {rounds} alternating rounds")
    print(f"{'':28}" + "".join(f"{key:>18}" for key in rates))
    for name, got in results.items():
        print(f"{name:28}" + "".join(f"{_median(got[key]):>18,.0f}" for key in rates))
    print(f"{'ratio':28}" + "".join(f"{_median(sp[k]) / _median(ppe[k]):>17.2f}x" for k in rates))
    cpu = [key for key in sp if "CPU" in key]
    print(f"\n    CPU per call (us: this process and the workers), median of {rounds} rounds")
    print(f"{'':28}" + "".join(f"{key:>30}" for key in cpu))
    for name, got in results.items():
        print(f"{name:28}" + "".join(f"{_median(got[key]):>30,.1f}" for key in cpu))
    print(
        f"{'ProcessPoolExecutor / snakepool':28}"
        + "".join(f"{_median(ppe[k]) / _median(sp[k]):>29.2f}x" for k in cpu)
    )
    for key in ("run_in_executor", "window"):
        ratio = _median(sp[key]) / _median(ppe[key])
        print(_verdict(f"submit, {IN_FLIGHT} in flight ({key}) vs ProcessPoolExecutor", ratio, 2))
        for name, got in results.items():
            print(f"    {name} rounds: " + ", ".join(f"{rate:,.0f}" for rate in got[key]))

    print("\n3. map over 100,000 items, default settings (chunksize=1)")
    for name, (done, taken) in hundred_k.items():
        print(f"{name:28}{done:>10,} results in {taken:.1f} s ({done / taken:,.0f}/s)")

    per_round = 2 if args.quick else 4
    moved = asyncio.run(array_against_bytes(workers, rounds, per_round))
    array, raw = _median(moved["array"]), _median(moved["bytes"])
    print(f"\n4. 16 MiB round trips, MB/s, median of {rounds} alternating rounds of {per_round}")
    print(f"{'float32 array, Pool.call(echo)':40}{array:>10,.0f}")
    print(f"{'bytes, raw pipe loop':40}{raw:>10,.0f}")
    print(_verdict("16 MiB float32 array vs the raw loop's 16 MiB bytes", array / raw, 1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
