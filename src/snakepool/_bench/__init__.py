"""The side-by-side benchmark behind ``snakepool bench`` and ``stress/bench.py``.

One process run measures, one peer after another and with the same worker
count and the same no-op (an echo of a small int):

* ``snakepool`` -- the ``generic`` adapter's ``echo`` (``worker_concurrency=1``,
  and a second row with ``worker_concurrency=8``);
* ``concurrent.futures.ProcessPoolExecutor``, ``multiprocessing.Pool`` and
  ``loky`` (optional: its row is skipped when it is not installed);
* a raw asyncio loop: length-prefixed MessagePack frames written straight to
  bare worker scripts over their stdin/stdout pipes, with every caller's
  request in flight at once (pipelined) -- the practical limit of the design.

Every peer is driven the same way: one asyncio event loop in the host runs N
caller tasks, each awaiting one call at a time. Executors are awaited through
``asyncio.wrap_future(executor.submit(echo, x))`` (what ``run_in_executor``
does); ``multiprocessing.Pool`` through ``apply_async`` with a callback that
resolves an asyncio future thread-safely.

Metrics: no-op throughput at 1/8/64 concurrent callers, sequential round-trip
p50/p99, pool start-up (snakepool, the raw workers, and bare interpreter
spawns), 1 MiB and 16 MiB ``bytes`` round-trip bandwidth, and the host's RSS
growth over many calls (snakepool only). Nothing here asserts a number: the
targets are reported as PASS/FAIL with their ratio.

The package, by role: ``_common`` (peers' names, labels, sizes, the ``Peer``
interface), ``_raw`` (the raw framing worker and its loop), ``_peers`` (the
other contenders), ``_measure`` (each measurement), ``_run`` (a whole run and
its targets), ``_report`` (text, Markdown, plot) and ``_cli`` (the command).
Only ``snakepool bench`` imports it, when it runs (the CLI's parser needs just
``snakepool._bench_options``).
"""

from __future__ import annotations

from .._bench_options import add_arguments
from ._cli import main, run_from_args
from ._common import INTERLEAVED, LABELS, PEERS, MiB
from ._measure import run_calls
from ._peers import make_peer
from ._report import plot_throughput, render_markdown, render_text
from ._run import run_benchmark

__all__ = [
    "INTERLEAVED",
    "LABELS",
    "PEERS",
    "MiB",
    "add_arguments",
    "main",
    "make_peer",
    "plot_throughput",
    "render_markdown",
    "render_text",
    "run_benchmark",
    "run_calls",
    "run_from_args",
]
