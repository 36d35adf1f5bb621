"""How the send-ahead pacing horizon trades throughput against head-of-line waits.

A busy worker holds about as many calls as it answers in
``snakepool.pool._pacing.AHEAD_HORIZON`` (see ``Pool.send_ahead``). This probe
sets that horizon to each value given, in alternating rounds in one process
(so every value sees the same machine), and reports for each:

- ``throughput``: 64 callers of the no-op ``echo`` on 2 workers: calls/s, and
  the share of calls that had to wait in the pool's queue (host work a deeper
  pipeline avoids). ``--hog N`` runs N busy-looping processes meanwhile: the
  host, slowed, times the workers' answers as slower too.
- ``mixed``: 32 callers, 2% of calls sleep 0.3 s and the rest ``--short``
  seconds: p50/p99 of the short calls (calls parked behind a slow one wait
  for it; a deeper pipeline parks more).

Run: python stress/pacing.py [--horizons 0.001 0.002 0.004] [--hog 1]
It reads and sets a private constant: a probe for the maintainers, not an API.
"""

from __future__ import annotations

import argparse
import multiprocessing
import random
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager

import anyio

import snakepool
from snakepool.pool import _dispatch, _pacing


def _set_horizon(seconds: float) -> None:
    _pacing.AHEAD_HORIZON = seconds
    _dispatch.AHEAD_HORIZON = seconds


def _spin() -> None:
    while True:
        pass


@contextmanager
def _hogs(count: int) -> Iterator[None]:
    procs = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(count)]
    for proc in procs:
        proc.start()
    try:
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.join()


async def throughput(
    horizons: list[float], rounds: int, calls: int
) -> dict[float, tuple[float, float]]:
    """Per horizon: median calls/s over ``rounds``, and the share of calls queued."""
    queued = 0
    original = _dispatch.Dispatcher.enqueue_call

    def counting(self: _dispatch.Dispatcher, *args: object, **kwargs: object) -> object:
        nonlocal queued
        queued += 1
        return original(self, *args, **kwargs)  # type: ignore[arg-type]

    _dispatch.Dispatcher.enqueue_call = counting  # type: ignore[assignment,method-assign]
    rates: dict[float, list[float]] = {h: [] for h in horizons}
    waited: dict[float, int] = dict.fromkeys(horizons, 0)
    per_caller = max(1, calls // 64)
    try:
        async with snakepool.Pool("generic", size=2) as pool:

            async def caller() -> None:
                for i in range(per_caller):
                    await pool.call("echo", {"value": i})

            for _ in range(rounds):
                for horizon in horizons:
                    _set_horizon(horizon)
                    queued = 0
                    started = time.perf_counter()
                    async with anyio.create_task_group() as tg:
                        for _ in range(64):
                            tg.start_soon(caller)
                    rates[horizon].append(64 * per_caller / (time.perf_counter() - started))
                    waited[horizon] += queued
    finally:
        _dispatch.Dispatcher.enqueue_call = original  # type: ignore[method-assign]
    return {
        h: (statistics.median(rates[h]), waited[h] / (rounds * 64 * per_caller)) for h in horizons
    }


async def mixed(
    horizons: list[float], rounds: int, short: float, calls: int | None = None
) -> dict[float, tuple[float, float, int]]:
    """Per horizon: p50 and p99 (seconds) of the short calls, and how many there
    were (``calls`` per round, by default about 0.2 s of short calls per caller)."""
    latencies: dict[float, list[float]] = {h: [] for h in horizons}
    per_caller = max(1, calls // 32) if calls else max(20, int(0.2 / short))
    async with snakepool.Pool("generic", size=2, adapter_config={"allow": ["time"]}) as pool:

        async def caller(horizon: float, rng: random.Random) -> None:
            for _ in range(per_caller):
                slow = rng.random() < 0.02
                started = time.perf_counter()
                args = {"target": "time:sleep", "args": [0.3 if slow else short]}
                await pool.call("call", args)
                if not slow:
                    latencies[horizon].append(time.perf_counter() - started)

        for n in range(rounds):
            for horizon in horizons:
                _set_horizon(horizon)
                async with anyio.create_task_group() as tg:
                    for c in range(32):  # (the same slow calls for every horizon)
                        tg.start_soon(caller, horizon, random.Random(n * 100 + c))
    found = {}
    for horizon in horizons:
        values = sorted(latencies[horizon])
        found[horizon] = (values[len(values) // 2], values[int(len(values) * 0.99)], len(values))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--horizons", type=float, nargs="+", default=[0.001, 0.002, 0.004])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--calls", type=int, default=25_600, help="per throughput round")
    parser.add_argument("--short", type=float, default=0.0001, help="seconds, mixed probe")
    parser.add_argument("--hog", type=int, default=0, help="busy processes meanwhile")
    parser.add_argument("--skip-mixed", action="store_true")
    options = parser.parse_args()
    chosen = _pacing.AHEAD_HORIZON
    print(f"current AHEAD_HORIZON: {chosen * 1e3:.1f} ms; {options.hog} CPU hog(s)")
    try:
        with _hogs(options.hog):
            rates = anyio.run(throughput, options.horizons, options.rounds, options.calls)
            for h, (rate, share) in rates.items():
                print(
                    f"throughput  horizon {h * 1e3:.1f} ms: {rate:,.0f} calls/s (median of "
                    f"{options.rounds}), {share:.1%} of calls queued in the pool"
                )
            if not options.skip_mixed:
                rounds = max(1, options.rounds // 3)
                waits = anyio.run(mixed, options.horizons, rounds, options.short)
                for h, (p50, p99, n) in waits.items():
                    print(
                        f"mixed       horizon {h * 1e3:.1f} ms: short calls p50 "
                        f"{p50 * 1e3:.1f} ms, p99 {p99 * 1e3:.1f} ms ({n:,} calls)"
                    )
    finally:
        _set_horizon(chosen)


if __name__ == "__main__":
    main()
