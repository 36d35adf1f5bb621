"""The ``snakepool`` command."""

from __future__ import annotations

import argparse
import importlib.metadata
import platform
import sys
from collections.abc import Sequence

import anyio

from .pool import Pool, discover_gpus

__all__ = ["main"]

_PACKAGES = ("anyio", "msgpack", "psutil", "tenacity")
_OPTIONAL = ("redis", "dspy")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="snakepool", description=__doc__)
    parser.add_argument("--version", action="version", version=_version())
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    doctor = commands.add_parser(
        "doctor", help="check this machine: python, packages, GPUs, and a real worker round trip"
    )
    doctor.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="SPEC",
        help="also start a worker with this adapter ('module:Class' or an entry point); repeatable",
    )
    args = parser.parse_args(argv)
    if args.command == "doctor":
        return _doctor(args.adapter)
    parser.error(f"unknown command {args.command!r}")
    return 2


def _version() -> str:
    try:
        return f"snakepool {importlib.metadata.version('snakepool')}"
    except importlib.metadata.PackageNotFoundError:
        return "snakepool (not installed)"


def _doctor(adapters: list[str]) -> int:
    problems = 0
    print(f"python      {platform.python_version()} ({sys.executable})")
    for name in _PACKAGES + _OPTIONAL:
        try:
            print(f"{name:<11} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            required = name in _PACKAGES
            problems += required
            hint = (
                "required: pip install snakepool"
                if required
                else f"optional: pip install 'snakepool[{name}]'"
            )
            print(f"{name:<11} missing ({hint})")
    gpus = discover_gpus()
    print(
        f"gpus        {', '.join(map(str, gpus)) if gpus else 'none (the gpu pool will be disabled)'}"
    )
    for spec in ["generic", *adapters]:
        ok, detail = anyio.run(_round_trip, spec)
        problems += not ok
        print(f"adapter     {spec}: {detail}")
    print("ok" if not problems else f"{problems} problem(s) found")
    return 0 if not problems else 1


async def _round_trip(spec: str) -> tuple[bool, str]:
    try:
        async with Pool(spec, name="doctor", size=1, startup_timeout=60) as pool:
            answer = await pool.call("ping", timeout=30)
            pid = pool.statistics().workers[0].pid
    except Exception as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return False, f"FAILED: {first_line}"
    return answer == "pong", f"worker pid {pid} answered {answer!r}"


if __name__ == "__main__":
    sys.exit(main())
