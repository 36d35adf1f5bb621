"""The quick start: a pool of real worker processes, used from async code.

Run: python examples/quickstart.py
"""

from __future__ import annotations

import anyio

import snakepool


async def main() -> None:
    async with snakepool.Pool("generic", size=2, adapter_config={"allow": ["math"]}) as pool:
        print("echo       ->", await pool.call("echo", {"value": {"hello": "world"}}))
        print("math:sqrt  ->", await pool.call("call", {"target": "math:sqrt", "args": [2]}))
        print("count      ->", [item async for item in pool.stream("count", {"n": 5})])

        async with anyio.create_task_group() as tg:  # 20 concurrent calls over 2 workers
            for _ in range(20):
                tg.start_soon(pool.call, "sleep", {"seconds": 0.05})

        try:
            await pool.call("call", {"target": "os:system", "args": ["true"]})
        except snakepool.RemoteError as exc:
            print("refused    ->", exc.remote_type, "-", exc.remote_message)

        stats = pool.statistics()
        print(f"statistics -> {stats.completed} completed, failed by category {dict(stats.failed)}")
        for worker in stats.workers:
            print(
                f"  worker {worker.id}: pid {worker.pid}, {worker.requests} requests, {worker.state}"
            )


if __name__ == "__main__":
    anyio.run(main)
