"""A host process for orphan tests: starts a pool, prints its worker pids, then waits.

Usage: python sp_host.py (async|blocking) SIZE
"""

from __future__ import annotations

import json
import sys
import time

import anyio

import snakepool


def report(pool_stats: snakepool.PoolStatistics) -> None:
    print(json.dumps([w.pid for w in pool_stats.workers]), flush=True)


async def run_async(size: int) -> None:
    async with snakepool.Pool("sp_adapters:Basic", size=size, name="orphan-test") as pool:
        report(pool.statistics())
        await anyio.sleep(3600)


def run_blocking(size: int) -> None:
    with snakepool.BlockingPool("sp_adapters:Basic", size=size, name="orphan-test") as pool:
        report(pool.statistics())
        time.sleep(3600)


if __name__ == "__main__":
    mode, size = sys.argv[1], int(sys.argv[2])
    if mode == "async":
        anyio.run(run_async, size)
    else:
        run_blocking(size)
