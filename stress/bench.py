"""snakepool against ProcessPoolExecutor, multiprocessing.Pool, loky and a raw asyncio loop.

A thin wrapper: the benchmark lives in ``snakepool._bench`` so that the
installed package has it too (``snakepool bench`` runs the same code).

Run::

    python stress/bench.py [--workers 2] [--quick] [--calls N] [--rss-calls N]
                           [--json OUT] [--plot PNG] [--markdown OUT]

The results for one machine are in docs/benchmarks.md.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from snakepool._bench import main as _main
from snakepool._bench import run_benchmark

__all__ = ["main", "run_benchmark"]


def main(argv: Sequence[str] | None = None) -> int:
    return _main(argv)


if __name__ == "__main__":
    sys.exit(main())
