"""The client-side commands (``call``, ``status``, ``logs``): they talk to a
running ``snakepool up`` and load no pool machinery."""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import sys
from typing import TYPE_CHECKING, Any

import anyio

from ..errors import RemoteError, SnakepoolError, WrongMode
from ..server._client import connect
from ._common import _socket

if TYPE_CHECKING:
    pass


def _plain(stats: Any) -> dict[str, Any]:
    workers = stats.workers if not isinstance(stats, dict) else stats["workers"]

    def get(key: str) -> Any:
        return stats[key] if isinstance(stats, dict) else getattr(stats, key)

    failed = get("failed")
    return {
        "enabled": get("enabled"),
        "disabled_reason": get("disabled_reason"),
        "size": get("size"),
        "ready": sum(
            1
            for w in workers
            if (w["state"] if isinstance(w, dict) else w.state) in ("idle", "busy")
        ),
        "queued": get("queued"),
        "sessions": get("sessions"),
        "breaker": get("breaker_state"),
        "completed": get("completed"),
        "failed": sum(failed.values()),
        "nodes": _nodes(workers),
    }


def _nodes(workers: Any) -> list[str]:
    """Where each worker of a Ray-backed pool runs: ``0@ADDRESS/NODE8 gpu=ID``."""
    shown = []
    for w in workers:
        get = w.get if isinstance(w, dict) else lambda key, w=w: getattr(w, key, None)
        if get("node_id"):
            gpus = ",".join(get("gpu_ids") or ())
            gpu = f" gpu={gpus}" if gpus else ""
            shown.append(f"{get('id')}@{get('node_address')}/{str(get('node_id'))[:8]}{gpu}")
    return shown


def _table(rows: dict[str, dict[str, Any]]) -> str:
    header = f"{'POOL':<12} {'READY':>9} {'QUEUED':>7} {'SESSIONS':>9} {'BREAKER':>10} {'DONE':>9} {'FAILED':>7}"
    lines = [header]
    for name, row in rows.items():
        if not row["enabled"]:
            lines.append(f"{name:<12} disabled: {row['disabled_reason']}")
            continue
        ready = f"{row['ready']}/{row['size']}"
        lines.append(
            f"{name:<12} {ready:>9} {row['queued']:>7} {row['sessions']:>9} "
            f"{row['breaker']:>10} {row['completed']:>9} {row['failed']:>7}"
        )
        if row.get("nodes"):  # (a Ray-backed pool: the node and GPUs of each worker)
            lines.append(f"{'':<12} ray workers: {'  '.join(row['nodes'])}")
    return "\n".join(lines)


# --- call and status ----------------------------------------------------------------------


def _call(args: argparse.Namespace) -> int:
    try:
        call_args = json.loads(args.json_args, object_hook=_from_json_object)
    except json.JSONDecodeError as exc:
        print(f"snakepool call: JSON arguments are not valid JSON: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"snakepool call: JSON arguments: {exc}", file=sys.stderr)
        return 2
    if not isinstance(call_args, dict):
        print(
            "snakepool call: JSON arguments must be an object of keyword arguments", file=sys.stderr
        )
        return 2

    async def run() -> None:
        async with connect(_socket(args)) as client:
            pool = client[args.pool]
            if args.stream:
                async for item in pool.stream(
                    args.command_name, call_args, timeout=args.timeout, session=args.session
                ):
                    print(json.dumps(item, default=_json_default), flush=True)
            else:
                value = await pool.call(
                    args.command_name, call_args, timeout=args.timeout, session=args.session
                )
                print(json.dumps(value, default=_json_default))

    return _run_client(run, "call")


def _status(args: argparse.Namespace) -> int:
    async def run() -> None:
        async with connect(_socket(args)) as client:
            stats = await client.status()
            server = await client.server_statistics() if args.json else None
        if args.json:  # the pools, and the server with each connection's statistics
            print(json.dumps({"pools": stats, "server": server}, indent=2, default=_json_default))
        else:
            print(_table({name: _plain(s) for name, s in stats.items()}))
            print(_workers_table(stats))

    return _run_client(run, "status")


def _run_client(run: Any, what: str) -> int:
    try:
        anyio.run(run)
    except RemoteError as exc:
        print(f"{exc.remote_type}: {exc.remote_message}", file=sys.stderr)
        if isinstance(exc, WrongMode):  # (its message speaks Python: pool.stream())
            print(f"snakepool {what}: call a stream command with --stream, a plain one without",
                  file=sys.stderr)  # fmt: skip
        return 1
    except (SnakepoolError, ConnectionError, KeyError, ValueError, TypeError) as exc:
        text = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"snakepool {what}: {type(exc).__name__}: {text}", file=sys.stderr)
        return 1
    return 0


def _json_default(value: Any) -> Any:
    """Bytes print as ``{"$bytes": "BASE64"}`` (which ``call`` reads back as bytes)."""
    if isinstance(value, bytes | bytearray):
        return {_BYTES_KEY: base64.b64encode(bytes(value)).decode("ascii")}
    return repr(value)


#: The one key of the JSON object that stands for bytes: ``{"$bytes": "aGk="}`` is ``b"hi"``.
_BYTES_KEY = "$bytes"


def _from_json_object(obj: dict[str, Any]) -> Any:
    """``{"$bytes": "BASE64"}`` (that one key) in the JSON arguments: bytes."""
    if len(obj) != 1 or _BYTES_KEY not in obj:
        return obj
    text = obj[_BYTES_KEY]
    if not isinstance(text, str):
        raise ValueError(f'{{"$bytes": ...}} must hold a base64 string, not {type(text).__name__}')
    try:
        return base64.b64decode(text, validate=True)
    except binascii.Error as exc:
        raise ValueError(f'{{"$bytes": {text[:40]!r}}} is not valid base64: {exc}') from None


# --- logs, and what up serves for observability (snakepool.observability) ---------------


def _add_logs_parser(commands: Any, socket_help: str) -> None:
    logs = commands.add_parser(
        "logs", help="show the recent output of a pool's workers (-f: and follow it)"
    )
    logs.add_argument("--socket", metavar="PATH", help=socket_help)
    logs.add_argument("pool")
    logs.add_argument("worker", nargs="?", type=_worker_id, help="one worker's id (default: all)")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    logs.add_argument(
        "-n", "--lines", type=_worker_id, default=100, metavar="N", help="lines to show first (100)"
    )


def _worker_id(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text!r}")
    return int(text)


def _logs(args: argparse.Namespace) -> int:
    async def run() -> None:
        dropped = 0
        async with connect(_socket(args)) as client:
            lines = client.logs(args.pool, args.worker, last=args.lines, follow=args.follow)
            async for line in lines:
                if line["dropped"] > dropped:
                    print(f"snakepool logs: {line['dropped'] - dropped} line(s) dropped (too slow)",
                          file=sys.stderr)  # fmt: skip
                    dropped = line["dropped"]
                level = "" if line["level"] == "INFO" else f"{line['level']}: "
                print(f"[{line['pool']}/{line['worker']}] {level}{line['line']}", flush=True)

    return _run_client(run, "logs")


def _workers_table(stats: dict[str, Any]) -> str:
    """``snakepool status``: a line per worker, with its calls/s, p50/p99 and uptime."""

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value * 1000:.2f}ms"

    lines = [
        f"{'WORKER':<14} {'STATE':>8} {'PID':>8} {'INFLIGHT':>8} {'REQUESTS':>9} "
        f"{'RESTARTS':>8} {'CALLS/S':>8} {'P50':>9} {'P99':>9} {'UPTIME':>8}"
    ]
    for name, pool in stats.items():
        for w in pool["workers"]:
            uptime, where = w.get("uptime_seconds"), f"{name}/{w['id']}"
            lines.append(
                f"{where:<14} {w['state']:>8} {w['pid'] or '-':>8} "
                f"{w['inflight']:>8} {w['requests']:>9} {w['restarts']:>8} "
                f"{w.get('calls_per_s', 0.0):>8.1f} {ms(w.get('p50_seconds')):>9} "
                f"{ms(w.get('p99_seconds')):>9} {'-' if uptime is None else f'{uptime:.0f}s':>8}"
            )
    return "\n".join(lines)
