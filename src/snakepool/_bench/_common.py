"""What the benchmark compares and what it calls things, shared by its modules:
the peers and their labels, sizes, the peer interface, percentiles and ratios."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

MiB = 2**20
CONCURRENCY = (1, 8, 64)
STARTUP_SIZES = (4, 16, 64)
BANDWIDTH_SIZES = (1 * MiB, 16 * MiB)
#: Peers in the order they run (the fork-based stdlib pools first, before the
#: host has started helper threads).
PEERS = (
    "multiprocessing_pool",
    "process_pool_executor",
    "loky",
    "raw_loop",
    "snakepool",
    "snakepool_c8",
)
LABELS = {
    "snakepool": "snakepool (worker_concurrency=1)",
    "snakepool_c8": "snakepool (worker_concurrency=8)",
    "process_pool_executor": "ProcessPoolExecutor",
    "multiprocessing_pool": "multiprocessing.Pool",
    "loky": "loky",
    "raw_loop": "raw asyncio loop (pipelined)",
}
#: RSS growth below this many MiB over the whole run counts as noise.
RSS_NOISE_MIB = 8.0

#: Peers whose sequential latency is also measured interleaved (for the target).
INTERLEAVED = ("raw_loop", "snakepool", "snakepool_c8")

Progress = Callable[[str], None]


class Peer:
    """One contender: ``start`` it, ``call`` it many times, ``aclose`` it."""

    how = ""

    async def start(self) -> None:
        raise NotImplementedError

    async def call(self, value: Any) -> Any:
        raise NotImplementedError

    async def aclose(self) -> None:
        raise NotImplementedError


def size_label(size: int) -> str:
    return f"{size // MiB} MiB" if size >= MiB else f"{size // 1024} KiB"


def percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted sequence."""
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def ratio_of(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def bandwidth_field(size_key: str) -> str:
    """The key of a bandwidth (MB/s) in the alternating rounds' results."""
    return f"{size_key} MB/s"
