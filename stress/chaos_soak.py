"""Chaos soak: many calls while a killer SIGKILLs random workers.

Every call must resolve (the echoed value, or a ``SnakepoolError`` of an
infrastructure or application category), none may hang or be lost, the pool
must return to full size, no worker process may outlive the pool, and the
host's file descriptors must not grow.

Run: python stress/chaos_soak.py [--calls 100000] [--kill-every 300] [--workers 4]
Exit status 1 if any rule was broken (the summary says which).
"""

from __future__ import annotations

import argparse
import gc
import random
import sys
import time
from typing import Any

import anyio
from soak_adapters import (
    ADAPTER,
    STRESS_DIR,
    SoakReport,
    WorkerKiller,
    add_kill_arguments,
    finish_report,
    num_fds,
    setup_logging,
    wait_full_size,
)

import snakepool
from snakepool import ErrorCategory, SnakepoolError
from snakepool.errors import INFRASTRUCTURE_CATEGORIES

ACCEPTED = INFRASTRUCTURE_CATEGORIES | {ErrorCategory.APPLICATION}
CALL_TIMEOUT = 10.0
#: A call (or a whole stream) that has not resolved after this long hangs.
HANG_AFTER = 2 * CALL_TIMEOUT + 5.0


def _pool(workers: int) -> snakepool.Pool:
    return snakepool.Pool(
        ADAPTER,
        name="chaos",
        size=workers,
        pythonpath=[STRESS_DIR],
        call_timeout=CALL_TIMEOUT,
        queue_size=10_000,
    )


async def chaos_soak(
    calls: int,
    kill_every: int,
    workers: int = 4,
    concurrency: int = 32,
    seed: int = 0,
    min_worker_age: float = 0.0,
) -> SoakReport:
    """Issue ``calls`` calls from ``concurrency`` tasks while killing a worker every
    ``kill_every`` resolved calls; return what was counted and what was broken."""
    report = SoakReport("chaos soak")
    report.info["settings"] = (
        f"calls={calls} kill_every={kill_every} workers={workers} "
        f"concurrency={concurrency} seed={seed} min_worker_age={min_worker_age}"
    )
    rng = random.Random(seed)
    started = time.monotonic()

    # A warm-up pool first: whatever the first pool opens once (imports, the
    # runtime dir, loop internals) is not counted as growth.
    async with _pool(1) as warm:
        await warm.call("echo", {"value": 1})
    gc.collect()
    fds_before = num_fds()

    seen: set[int] = set()
    pool = _pool(workers)
    pool.add_listener(
        lambda e: (
            seen.add(e.data["pid"]) if e.name == "worker.started" and e.data.get("pid") else None
        )
    )
    issued = resolved = 0
    hung: list[str] = []
    try:
        async with pool:
            seen.update(w.pid for w in pool.statistics().workers if w.pid)
            killer = WorkerKiller(pool, kill_every, random.Random(rng.random()), min_worker_age)
            next_index = 0

            async def one(i: int, crng: random.Random) -> None:
                nonlocal issued, resolved
                roll = crng.random()
                delay = crng.uniform(0.0, 0.005) if crng.random() < 0.2 else 0.0
                issued += 1
                kind = "stream" if roll < 0.15 else "idempotent" if roll < 0.35 else "call"
                report.count(f"issued_{kind}")
                try:
                    with anyio.fail_after(HANG_AFTER):
                        if kind == "stream":
                            n = crng.randint(1, 8)
                            items: list[Any] = []
                            async with pool.stream(
                                "count", {"n": n, "delay": delay / 4}, timeout=CALL_TIMEOUT
                            ) as stream:
                                async for item in stream:
                                    items.append(item)
                            if items != list(range(n)):
                                report.violate(f"stream {i}: got {items!r}, expected 0..{n - 1}")
                        else:
                            value = {"i": i, "b": crng.randbytes(crng.randint(0, 64))}
                            result = await pool.call(
                                "echo",
                                {"value": value, "delay": delay},
                                timeout=CALL_TIMEOUT,
                                idempotent=kind == "idempotent",
                            )
                            if result != value:
                                report.violate(f"call {i}: got {result!r}, expected {value!r}")
                    report.count("succeeded")
                except SnakepoolError as exc:
                    report.error(f"{type(exc).__name__} ({exc.category.value}) in {kind}", exc)
                    if exc.category not in ACCEPTED:
                        report.violate(
                            f"{kind} {i}: {type(exc).__name__} of category "
                            f"{exc.category.value}: {str(exc).splitlines()[0]}"
                        )
                except TimeoutError:
                    hung.append(f"{kind} {i}")
                    report.violate(f"{kind} {i} hung: not resolved within {HANG_AFTER:g}s")
                except Exception as exc:
                    report.error(f"{type(exc).__name__} (uncategorized) in {kind}", exc)
                    report.violate(f"{kind} {i}: uncategorized {type(exc).__name__}: {exc}")
                finally:
                    resolved += 1
                    killer.done()

            async def caller() -> None:
                nonlocal next_index
                crng = random.Random(rng.random())
                while next_index < calls:
                    i = next_index
                    next_index += 1
                    await one(i, crng)

            async with anyio.create_task_group() as outer:
                outer.start_soon(killer.run)
                async with anyio.create_task_group() as callers:
                    for _ in range(concurrency):
                        callers.start_soon(caller)
                outer.cancel_scope.cancel()

            report.counts.update(issued=issued, resolved=resolved, kills=killer.kills)
            if issued != calls or resolved != issued:
                report.violate(f"lost calls: {calls} wanted, {issued} issued, {resolved} resolved")
            recovery = await wait_full_size(pool, report)
            report.info["back to full size after"] = f"{recovery:.2f}s"

            stats = pool.statistics()
            seen.update(w.pid for w in stats.workers if w.pid)
            restarts = sum(w.restarts for w in stats.workers)
            report.counts["worker_restarts"] = restarts
            if restarts != killer.kills:
                report.violate(
                    f"{restarts} worker restarts for {killer.kills} kills "
                    "(a worker died or was replaced for another reason)"
                )
            if stats.queued or any(w.inflight for w in stats.workers):
                report.violate(
                    f"calls left in the pool after every caller returned: queued={stats.queued}, "
                    f"inflight={[w.inflight for w in stats.workers]}"
                )
            failed = report.counts.get("resolved", 0) - report.counts.get("succeeded", 0)
            report.counts["failed"] = failed
            # With worker_concurrency=1 a kill fails the call it was running,
            # and perhaps one sent before its death was noticed (or a stream).
            if failed > 3 * killer.kills + 3:
                report.violate(
                    f"{failed} failed calls for {killer.kills} kills: more than kills explain"
                )
            report.info["breaker"] = stats.breaker_state
            report.info["pool counted"] = f"completed={stats.completed} failed={dict(stats.failed)}"

            # The pool is healthy after the chaos: every call now succeeds.
            for i in range(4 * workers):
                try:
                    if await pool.call("echo", {"value": i}) != i:
                        report.violate(f"after the chaos, echo {i} came back wrong")
                except Exception as exc:
                    report.violate(f"after the chaos, a call failed: {type(exc).__name__}: {exc}")
    finally:
        await finish_report(report, seen, fds_before, started)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=100_000)
    parser.add_argument("--kill-every", type=int, default=300)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=32)
    add_kill_arguments(parser)
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    report = anyio.run(
        chaos_soak,
        args.calls,
        args.kill_every,
        args.workers,
        args.concurrency,
        args.seed,
        args.min_worker_age,
    )
    print(report.summary())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
