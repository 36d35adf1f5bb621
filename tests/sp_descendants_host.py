"""A host for the descendant tests: starts a pool whose worker starts children
that try to escape, prints the worker's and the children's pids, then waits to
be killed.

Usage: python sp_descendants_host.py START_METHOD [GPUS]
"""

from __future__ import annotations

import json
import sys

import anyio

import snakepool


async def main(start_method: str, gpus: list[int] | None) -> None:
    async with snakepool.Pool(
        "sp_descendants:Spawner", size=1, start_method=start_method, gpus=gpus
    ) as pool:
        children = await pool.call("spawn_children")
        holder = await pool.call("c_fork_holder")
        worker = pool.statistics().workers[0].pid
        print(json.dumps({"worker": worker, "holder": holder, **children}), flush=True)
        await anyio.sleep(3600)


if __name__ == "__main__":
    gpus = [int(g) for g in sys.argv[2].split(",")] if len(sys.argv) > 2 else None
    anyio.run(main, sys.argv[1], gpus)
