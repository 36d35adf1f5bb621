"""The options of ``snakepool bench`` (and ``stress/bench.py``).

Apart from the benchmark itself (``_bench``), which only the ``bench``
command imports, when it runs: the CLI's parser needs just these.
"""

from __future__ import annotations

import argparse

__all__ = ["add_arguments"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark's options (shared by ``snakepool bench`` and ``stress/bench.py``)."""
    parser.add_argument("--workers", type=int, default=2, help="workers per peer (default 2)")
    parser.add_argument(
        "--calls", type=int, help="calls per throughput point (default 20000; --quick: 2000)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="fewer calls and repeats (about two minutes)"
    )
    parser.add_argument(
        "--rss-calls",
        type=int,
        help="calls of the host-RSS run (default 1000000; --quick: 50000)",
    )
    parser.add_argument("--json", metavar="OUT", help="also write the results as JSON")
    parser.add_argument(
        "--plot", metavar="PNG", help="also plot throughput vs callers (needs matplotlib)"
    )
    parser.add_argument(
        "--markdown", metavar="OUT", help="also write the results as a Markdown section"
    )
    parser.add_argument(
        "--uvloop",
        action="store_true",
        help="run everything (every peer's host side) on uvloop (pip install uvloop)",
    )
