"""The ``snakepool`` command line: the parser and ``main``."""

from __future__ import annotations

import argparse
import textwrap
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..server._wire import HELLO_TIMEOUT
from ._client import _add_logs_parser, _call, _logs, _status
from ._common import _session_id, _version
from ._tools import _bench, _doctor, _new_adapter
from ._up import _up

if TYPE_CHECKING:
    pass


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    handler = {
        "up": _up,
        "call": _call,
        "status": _status,
        "doctor": _doctor,
        "new-adapter": _new_adapter,
        "bench": _bench,
        "logs": _logs,
    }[args.command]
    try:
        return handler(args)
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="snakepool", description="Pools of long-lived Python worker processes."
    )
    parser.add_argument("--version", action="version", version=_version())
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    socket_help = (
        "the server's Unix socket (default: $SNAKEPOOL_SOCKET, else a per-user runtime path)"
    )

    up = commands.add_parser("up", help="start the pools and serve them on a local socket")
    up.add_argument("--config", metavar="FILE", help="a TOML config (default: the embedded one)")
    up.add_argument("--socket", metavar="PATH", help=socket_help)
    up.add_argument(
        "--tcp",
        metavar="HOST:PORT",
        help="also listen on TCP (loopback only unless --allow-remote)",
    )
    up.add_argument(
        "--allow-remote", action="store_true", help="allow a non-loopback --tcp address"
    )
    up.add_argument(
        "--print-config", action="store_true", help="print the effective config and exit"
    )
    up.add_argument(
        "--hello-timeout",
        type=float,
        default=HELLO_TIMEOUT,
        metavar="SECONDS",
        help=f"a new connection must say hello within this (default: {HELLO_TIMEOUT:g})",
    )
    up.add_argument(
        "--no-live",
        action="store_true",
        help="no live status table, even on a terminal (a status line now and then instead)",
    )
    up.add_argument(
        "--metrics", metavar="HOST:PORT", help="serve Prometheus metrics there (extra: metrics)"
    )
    up.add_argument(
        "--dashboard",
        metavar="HOST:PORT",
        help="serve a live web dashboard there (extra: dashboard; loopback unless --allow-remote)",
    )
    up.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="show the workers' output while the pools start, and full tracebacks of failures",
    )

    call = commands.add_parser(
        "call",
        help="call a command on a pool of a running server",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=textwrap.dedent("""\
            Bytes: {"$bytes": "BASE64"} (a JSON object with that one key, standard base64)
            stands for bytes, in the arguments and in the printed results alike:
              snakepool call general echo '{"value": {"$bytes": "aGk="}}'
            sends b"hi" and prints {"$bytes": "aGk="}.
            """),
    )
    call.add_argument("--socket", metavar="PATH", help=socket_help)
    call.add_argument(
        "--session",
        metavar="ID",
        type=_session_id,
        help="run the call in this session (1 to 128 of A-Z a-z 0-9 . _ : -, not starting with '.')",
    )
    call.add_argument("--timeout", type=float, metavar="SECONDS", help="call timeout")
    call.add_argument(
        "--stream",
        action="store_true",
        help="the command is a stream: print one JSON line per item",
    )
    call.add_argument("pool")
    call.add_argument("command_name", metavar="COMMAND")
    call.add_argument(
        "json_args",
        metavar="JSON",
        nargs="?",
        default="{}",
        help='keyword arguments as a JSON object; {"$bytes": "BASE64"} is bytes (default: {})',
    )

    status = commands.add_parser("status", help="show the pools of a running server")
    status.add_argument("--socket", metavar="PATH", help=socket_help)
    status.add_argument(
        "--json",
        action="store_true",
        help="print JSON instead of a table: the pools, and the server with its connections",
    )

    _add_logs_parser(commands, socket_help)

    doctor = commands.add_parser(
        "doctor",
        help="check python, packages, GPUs, worker isolation, the socket and adapters",
    )
    doctor.add_argument("--socket", metavar="PATH", help=socket_help)
    doctor.add_argument(
        "--adapter", action="append", default=[], metavar="SPEC",
        help="also start a worker with this adapter ('module:Class' or an entry point); repeatable",
    )  # fmt: skip

    new = commands.add_parser(
        "new-adapter", help="create a ready-to-run adapter package with a test"
    )
    new.add_argument("name", help="the package name (a Python identifier)")
    new.add_argument(
        "--directory", metavar="DIR", default=".", help="where to create it (default: here)"
    )

    from .._bench_options import add_arguments as add_bench_arguments

    bench = commands.add_parser(
        "bench",
        help="benchmark snakepool against ProcessPoolExecutor, multiprocessing.Pool, loky "
        "and a raw asyncio loop",
    )
    add_bench_arguments(bench)
    return parser
