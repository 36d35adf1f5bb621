"""I/O-bound work with ``worker_concurrency``: 1000 calls that each wait 200 ms.

Target (issue 7): on 2 workers, within 1.5x of the ideal
``ceil(calls / (workers * concurrency)) * wait`` seconds.

Run: python stress/io_bound.py [--calls 1000] [--wait 0.2] [--workers 2] [--concurrency 100]
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import anyio

import snakepool


async def io_bound(
    calls: int, wait: float, workers: int, concurrency: int, sync: bool = False
) -> tuple[float, float]:
    """Seconds taken and the ideal, for ``calls`` concurrent waits of ``wait`` s.

    The wait is the generic adapter's async ``sleep``, or with ``sync`` a
    blocking ``time.sleep`` in the worker's threads (a sync LM client).
    """
    async with snakepool.Pool(
        "generic",
        size=workers,
        worker_concurrency=concurrency,
        queue_size=calls,
        adapter_config={"allow": ["time"]},
    ) as pool:
        command, args = (
            ("call", {"target": "time:sleep", "args": [wait]})
            if sync
            else (
                "sleep",
                {"seconds": wait},
            )
        )
        started = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for _ in range(calls):
                tg.start_soon(pool.call, command, args)
        elapsed = time.perf_counter() - started
    ideal = math.ceil(calls / (workers * concurrency)) * wait
    return elapsed, ideal


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--wait", type=float, default=0.2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument(
        "--sync", action="store_true", help="wait in a sync handler (time.sleep in threads)"
    )
    args = parser.parse_args()
    elapsed, ideal = anyio.run(
        io_bound, args.calls, args.wait, args.workers, args.concurrency, args.sync
    )
    ratio = elapsed / ideal
    verdict = "PASS" if ratio <= 1.5 else "FAIL"
    print(
        f"{args.calls} {'sync' if args.sync else 'async'} calls x {args.wait:g} s on "
        f"{args.workers} workers x {args.concurrency}: "
        f"{elapsed:.2f} s, ideal {ideal:.2f} s, ratio {ratio:.2f} (target <= 1.5): {verdict}"
    )
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
