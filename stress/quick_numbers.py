"""Quick numbers for snakepool alone: start-up, sequential latency, throughput.

The side-by-side benchmark against the peers is issue 7's ``stress/bench.py``;
this script is the yardstick the closing notes quote until then.

Run: python stress/quick_numbers.py [--workers 2] [--calls 3000]
"""

from __future__ import annotations

import argparse
import statistics
import time

import anyio

import snakepool


async def measure(workers: int, calls: int) -> None:
    started = time.perf_counter()
    async with snakepool.Pool("generic", size=workers) as pool:
        startup = time.perf_counter() - started
        for i in range(200):  # warm-up
            await pool.call("echo", {"value": i})
        latencies = []
        for i in range(calls):
            t0 = time.perf_counter()
            await pool.call("echo", {"value": i})
            latencies.append(time.perf_counter() - t0)
        latencies.sort()
        p50 = latencies[len(latencies) // 2] * 1e6
        p99 = latencies[int(len(latencies) * 0.99)] * 1e6
        print(f"workers={workers} start-up: {startup * 1000:.0f} ms")
        print(
            f"sequential echo: p50 {p50:.0f} us, p99 {p99:.0f} us, mean {statistics.mean(latencies) * 1e6:.0f} us"
        )
        for callers in (1, 8, 64):
            per_caller = max(1, calls // callers)

            async def caller(n: int = per_caller) -> None:
                for i in range(n):
                    await pool.call("echo", {"value": i})

            t0 = time.perf_counter()
            async with anyio.create_task_group() as tg:
                for _ in range(callers):
                    tg.start_soon(caller)
            elapsed = time.perf_counter() - t0
            print(
                f"throughput, {callers:>2} callers: {per_caller * callers / elapsed:,.0f} calls/s"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--calls", type=int, default=3000)
    args = parser.parse_args()
    anyio.run(measure, args.workers, args.calls)


if __name__ == "__main__":
    main()
