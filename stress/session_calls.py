"""Session calls against plain calls, side by side in one run (issue 18's target).

The shape: 64 sessions, one caller each, on 2 workers with the memory store
(``--store redis`` for the Redis store, on a ``redis-server`` this run starts on
loopback: issue 19's target is 0.3x there; or ``--store redis://...``); each session has two variables, ``set``s
one of them every 100 of its calls, and calls a handler that reads
``ctx.variables`` (and checks it saw the value just set). Against it, in the
same pool and the same run, 64 callers making plain calls of a no-op. Rounds
alternate plain, session, session, plain, ... and the medians are compared.

Run: python stress/session_calls.py [--rounds 5] [--calls 20000] [--workers 2]
     [--store memory|redis|redis://...]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ab import SESSIONS, _SessionCaller  # (the same caller as stress/ab.py's session scenario)

ADAPTER_SOURCE = """\
from snakepool.adapters import Adapter, CallContext, command


class SessionBench(Adapter):
    @command
    def noop(self, value: int = 0) -> int:
        return value

    @command
    def read(self, ctx: CallContext) -> float:
        return ctx.variables["temperature"]
"""


async def _plain(pool: Any, calls: int) -> tuple[float, float]:
    async def caller(n: int) -> None:
        for i in range(n):
            await pool.call("noop", {"value": i})

    return await _timed(calls, [caller(calls // SESSIONS) for _ in range(SESSIONS)])


async def _sessions(callers: list[_SessionCaller], calls: int) -> tuple[float, float]:
    return await _timed(calls, [caller.run(calls // SESSIONS) for caller in callers])


async def _timed(calls: int, runs: list[Any]) -> tuple[float, float]:
    """Calls/s, and the host process's CPU time per call in us (its own share of the
    cost, less noisy than wall time on a shared machine)."""
    done = (calls // SESSIONS) * SESSIONS
    started, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*runs)
    return done / (time.perf_counter() - started), (time.process_time() - cpu) / done * 1e6


async def main(rounds: int, calls: int, workers: int, store: str) -> int:
    import snakepool

    with tempfile.TemporaryDirectory() as adapters:
        Path(adapters, "session_bench.py").write_text(ADAPTER_SOURCE)
        async with snakepool.Pool(
            "session_bench:SessionBench", size=workers, pythonpath=[adapters], session_store=store
        ) as pool:
            callers = []
            for _ in range(SESSIONS):
                session = await pool.session().open()
                caller = _SessionCaller(session)
                await caller.define()
                callers.append(caller)
            await _plain(pool, min(calls, 4000))  # warm-up
            await _sessions(callers, min(calls, 4000))
            found: dict[str, list[float]] = {"plain": [], "session": []}
            cpu: dict[str, list[float]] = {"plain": [], "session": []}
            for index in range(rounds):
                order = ("plain", "session") if index % 2 == 0 else ("session", "plain")
                for kind in order:
                    rate, us = await (
                        _plain(pool, calls) if kind == "plain" else _sessions(callers, calls)
                    )
                    found[kind].append(rate)
                    cpu[kind].append(us)
                ratio = found["session"][-1] / found["plain"][-1]
                print(
                    f"round {index + 1}/{rounds}: plain {found['plain'][-1]:9,.0f} calls/s, "
                    f"session {found['session'][-1]:9,.0f} calls/s, session/plain {ratio:.2f}; "
                    f"host CPU per call: plain {cpu['plain'][-1]:.1f} us, "
                    f"session {cpu['session'][-1]:.1f} us"
                )
    plain, session = statistics.median(found["plain"]), statistics.median(found["session"])
    ratios = [s / p for s, p in zip(found["session"], found["plain"], strict=True)]
    print(
        f"median: plain {plain:,.0f} calls/s, session {session:,.0f} calls/s; "
        f"session/plain per round, median {statistics.median(ratios):.2f} "
        f"(target >= {0.7 if store == 'memory' else 0.3}); host CPU per call, median: "
        f"plain {statistics.median(cpu['plain']):.1f} us, "
        f"session {statistics.median(cpu['session']):.1f} us ("
        f"{workers} workers, {SESSIONS} sessions and callers, store {store})"
    )
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--store", default="memory")
    args = parser.parse_args()
    if args.store != "redis":
        sys.exit(asyncio.run(main(args.rounds, args.calls, args.workers, args.store)))
    from redis_sessions import redis_server  # (stress/: this script's directory)

    with redis_server() as url:
        sys.exit(asyncio.run(main(args.rounds, args.calls, args.workers, url)))
