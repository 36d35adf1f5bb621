"""CPU per call, host and workers, snakepool against the bench's raw loop.

Where ``stress/bench.py`` reports wall-clock numbers, this says where the CPU
goes. The peers (the raw asyncio loop, snakepool with ``worker_concurrency=1``
and with 8) take turns, round after round, so a drift of the machine hits all
of them alike. Each round: sequential calls (p50 latency, and CPU per call),
then the same no-op from 64 callers (throughput, and CPU per call). Host CPU
is this process's CPU time; worker CPU is the scheduler's run time of every
thread of the peer's worker processes (``/proc/<pid>/task/*/schedstat``,
nanoseconds; Linux only). Medians over the rounds.

Run: python stress/cpu_per_call.py [--rounds 5] [--sequential 2000] [--calls 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import statistics
import sys
import time
from typing import Any

import psutil

from snakepool import _bench

PEERS = ("raw_loop", "snakepool", "snakepool_c8")


def worker_cpu_ns(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        for path in glob.glob(f"/proc/{pid}/task/*/schedstat"):
            try:
                with open(path) as stats:
                    total += int(stats.read().split()[0])
            except (OSError, ValueError, IndexError):
                continue  # (a thread that ended meanwhile)
    return total


async def start_peers() -> tuple[dict[str, Any], dict[str, list[int]]]:
    me = psutil.Process()
    peers: dict[str, Any] = {}
    pids: dict[str, list[int]] = {}
    for name in PEERS:
        before = {child.pid for child in me.children(recursive=True)}
        peer = _bench.make_peer(name, 2)
        assert not isinstance(peer, str), peer
        await peer.start()
        peers[name] = peer
        pids[name] = [c.pid for c in me.children(recursive=True) if c.pid not in before]
        for i in range(300):  # warm up
            await peer.call(i)
    return peers, pids


async def measure(rounds: int, sequential: int, calls: int) -> dict[str, dict[str, list[float]]]:
    peers, pids = await start_peers()
    keys = ("latency", "seq_host", "seq_workers", "throughput", "host", "workers")
    found = {name: {key: [] for key in keys} for name in peers}
    try:
        for _ in range(rounds):
            for name, peer in peers.items():
                row = found[name]
                host, workers = time.process_time_ns(), worker_cpu_ns(pids[name])
                for i in range(sequential):
                    started = time.perf_counter()
                    await peer.call(i)
                    row["latency"].append(time.perf_counter() - started)
                row["seq_host"].append((time.process_time_ns() - host) / sequential / 1e3)
                row["seq_workers"].append((worker_cpu_ns(pids[name]) - workers) / sequential / 1e3)
                host, workers = time.process_time_ns(), worker_cpu_ns(pids[name])
                elapsed = await _bench.run_calls(peer, 64, calls)
                row["throughput"].append(calls / elapsed)
                row["host"].append((time.process_time_ns() - host) / calls / 1e3)
                row["workers"].append((worker_cpu_ns(pids[name]) - workers) / calls / 1e3)
    finally:
        for peer in peers.values():
            await peer.aclose()
    return found


def report(found: dict[str, dict[str, list[float]]]) -> str:
    median = statistics.median
    raw = found["raw_loop"]
    lines = []
    for name, row in found.items():
        p50 = median(row["latency"])
        lines.append(
            f"{_bench.LABELS[name]}:\n"
            f"  sequential: p50 {p50 * 1e6:5.1f} us ({p50 / median(raw['latency']):.2f}x raw), "
            f"CPU per call: host {median(row['seq_host']):5.1f} us, "
            f"workers {median(row['seq_workers']):5.1f} us\n"
            f"  64 callers: {median(row['throughput']):9,.0f} calls/s "
            f"({median(row['throughput']) / median(raw['throughput']):.2f}x raw), "
            f"CPU per call: host {median(row['host']):5.1f} us, "
            f"workers {median(row['workers']):5.1f} us"
        )
    return "\n".join(lines)


def main() -> int:
    if not sys.platform.startswith("linux"):
        print("cpu_per_call: needs Linux (/proc/<pid>/task/*/schedstat)", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sequential", type=int, default=2000)
    parser.add_argument("--calls", type=int, default=20000)
    args = parser.parse_args()
    print(report(asyncio.run(measure(args.rounds, args.sequential, args.calls))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
