"""The command line of ``snakepool bench`` and ``stress/bench.py``."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.util
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .._bench_options import add_arguments
from ._report import plot_throughput, render_markdown, render_text
from ._run import run_benchmark


def _command(args: argparse.Namespace, prog: str) -> str:
    """The command line that reproduces a run with these options."""
    words = [prog, "--workers", str(args.workers)]
    if args.quick:
        words.append("--quick")
    if getattr(args, "uvloop", False):
        words.append("--uvloop")
    for option, value in (
        ("--calls", args.calls),
        ("--rss-calls", args.rss_calls),
        ("--json", args.json),
        ("--plot", args.plot),
        ("--markdown", args.markdown),
    ):
        if value is not None:
            words += [option, str(value)]
    return " ".join(words)


def run_from_args(args: argparse.Namespace, *, prog: str = "python stress/bench.py") -> int:
    """Run the benchmark from parsed options; print the table and the target checks."""
    if args.workers < 1:
        print("bench: --workers must be at least 1", file=sys.stderr)
        return 2
    if args.uvloop:
        if importlib.util.find_spec("uvloop") is None:
            print("bench: --uvloop needs uvloop, which is not installed", file=sys.stderr)
            return 2
        uvloop: Any = importlib.import_module("uvloop")
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        print(
            "bench: --plot needs matplotlib, which is not installed (pip install matplotlib)",
            file=sys.stderr,
        )
        return 2

    def progress(line: str) -> None:
        print(f"  {line}", file=sys.stderr, flush=True)

    result = asyncio.run(
        run_benchmark(
            workers=args.workers,
            calls=args.calls,
            quick=args.quick,
            rss_calls=args.rss_calls,
            progress=progress,
        )
    )
    print(render_text(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if args.plot:
        plot_throughput(result, args.plot)
    if args.markdown:
        plot = None
        if args.plot:
            try:
                plot = os.path.relpath(args.plot, Path(args.markdown).resolve().parent)
            except ValueError:
                plot = args.plot
        text = render_markdown(result, plot=plot, command=_command(args, prog))
        Path(args.markdown).write_text(text + "\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bench", description="snakepool against its peers, side by side."
    )
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))
