"""``Program.evaluate`` fanned out over a DSPy pool, against an LM that answers in 200 ms.

Target (issue 22): 400 examples on 4 workers with ``worker_concurrency=16``
finish within 1.3x of the ideal ``examples x latency / (workers x
concurrency)`` = 1.25 s. The LM is tests/lm_server.py in a process of its
own (its threads take nothing from the host's interpreter); each round is
one ``evaluate`` after a warm-up round that reaches every worker (the first
LM call of a worker, and a session landing on a new worker, are one-time
costs).

``--flat N`` checks the host side alone instead: N examples from a lazy
devset through ``evaluate(keep_results=False)`` with calls that answer at
once, printing the host's peak traced memory and RSS growth (flat: back-
pressure, not a list of futures).

Run: python stress/dspy_eval.py [--examples 400] [--latency 0.2] [--workers 4]
     [--concurrency 16] [--rounds 3]      or: python stress/dspy_eval.py --flat 100000
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import psutil

import snakepool
from snakepool.dspy import Program, configure_lm

TARGET = 1.3
#: A model DSPy knows: for an unknown one it scans its whole model table on every call
#: (to estimate the cost), which costs more CPU than the rest of the call.
MODEL = "openai/gpt-4o-mini"
LM_SERVER = Path(__file__).resolve().parent.parent / "tests" / "lm_server.py"


def devset(n: int) -> Iterator[dict[str, str]]:
    for i in range(n):
        yield {"question": f"question {i}", "answer": f"answer: question {i}"}


@contextlib.contextmanager
def lm_server(latency: float) -> Iterator[str]:
    """tests/lm_server.py in a process of its own; yields its api_base."""
    server = subprocess.Popen(
        [sys.executable, str(LM_SERVER), "--latency", str(latency)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        yield server.stdout.readline().strip()
    finally:
        assert server.stdin is not None
        server.stdin.close()  # (it serves until its stdin closes)
        server.wait(10)


async def timed_rounds(
    api_base: str, examples: int, workers: int, concurrency: int, rounds: int
) -> list[float]:
    async with (
        snakepool.Pool(
            "dspy",
            size=workers,
            worker_concurrency=concurrency,
            queue_size=max(1000, examples),
            call_timeout=60.0,
        ) as pool,
        pool.session() as session,
    ):
        await configure_lm(session, MODEL, api_base=api_base, api_key="x", num_retries=0)
        qa = await Program.create(session, "question -> answer")
        warm = await qa.evaluate(devset(2 * workers * concurrency))
        assert warm.score == 1.0, warm
        times = []
        for _ in range(rounds):
            started = time.perf_counter()
            report = await qa.evaluate(devset(examples), keep_results=False)
            times.append(time.perf_counter() - started)
            assert (report.count, report.score) == (examples, 1.0), report
        return times


class _InstantSession:
    async def call(self, command: str, args: Mapping[str, Any] | None = None, **_: Any) -> Any:
        await anyio.lowlevel.checkpoint()
        return {"prediction": {"answer": "x"}, "score": 1.0}

    def stream(self, command: str, args: Mapping[str, Any] | None = None, **_: Any) -> Any:
        raise NotImplementedError


async def flat(examples: int) -> None:
    def rows() -> Iterator[dict[str, str]]:
        for i in range(examples):
            yield {"question": f"{i:08d}" * 128, "answer": "x"}  # ~1 KiB each

    process = psutil.Process()
    qa = Program(_InstantSession(), "qa")
    await qa.evaluate(devset(100), keep_results=False)
    rss_before = process.memory_info().rss
    tracemalloc.start()
    started = time.perf_counter()
    report = await qa.evaluate(rows(), concurrency=64, keep_results=False)
    elapsed = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    grown = (process.memory_info().rss - rss_before) / 2**20
    print(
        f"{report.count} lazy examples (~1 KiB each), 64 in flight: {elapsed:.1f} s, "
        f"peak traced {peak / 2**20:.2f} MiB, RSS grew {grown:.1f} MiB "
        f"(holding them would take ~{examples / 1024:.0f} MiB)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--examples", type=int, default=400)
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--flat", type=int, metavar="N", help="the host-memory check instead")
    args = parser.parse_args()
    if args.flat:
        anyio.run(flat, args.flat)
        return 0
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    with lm_server(args.latency) as api_base:
        times = anyio.run(
            timed_rounds, api_base, args.examples, args.workers, args.concurrency, args.rounds
        )
    ideal = args.examples * args.latency / (args.workers * args.concurrency)
    best, median = min(times), statistics.median(times)
    verdict = "PASS" if median / ideal <= TARGET else "FAIL"
    print(
        f"{args.examples} examples x {args.latency:g} s LM on {args.workers} workers x "
        f"{args.concurrency}: rounds {', '.join(f'{t:.2f}' for t in times)} s; median "
        f"{median:.2f} s, best {best:.2f} s, ideal {ideal:.2f} s; ratio {median / ideal:.2f} "
        f"(target <= {TARGET}): {verdict}"
    )
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
