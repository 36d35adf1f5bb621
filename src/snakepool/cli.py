"""The ``snakepool`` command: up, call, status, doctor, new-adapter, bench.

The client-side commands (``call``, ``status``) load no pool machinery: the
pool, the server and the benchmark are imported inside the commands that
run them (``up``, ``doctor``, ``bench``).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import collections
import contextlib
import importlib.metadata
import importlib.util
import json
import keyword
import logging
import os
import platform
import shutil
import signal
import sys
import tempfile
import textwrap
import threading
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from ._paths import default_socket_path, default_token_path, ensure_private_dir
from ._session_ids import check_session_id
from .errors import InvalidSessionId, RemoteError, SnakepoolError, WorkerStartError
from .server._client import connect
from .server._wire import HELLO_TIMEOUT

if TYPE_CHECKING:
    from .server._server import SocketServer

__all__ = ["main"]

_PACKAGES = ("anyio", "msgpack", "psutil", "tenacity")
_OPTIONAL = ("redis", "dspy")


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

    from ._bench_options import add_arguments as add_bench_arguments

    bench = commands.add_parser(
        "bench",
        help="benchmark snakepool against ProcessPoolExecutor, multiprocessing.Pool, loky "
        "and a raw asyncio loop",
    )
    add_bench_arguments(bench)
    return parser


def _version() -> str:
    try:
        return f"snakepool {importlib.metadata.version('snakepool')}"
    except importlib.metadata.PackageNotFoundError:
        return "snakepool (not installed)"


def _socket(args: argparse.Namespace) -> Path:
    if args.socket:
        return Path(args.socket)
    path = default_socket_path()
    if "SNAKEPOOL_SOCKET" not in os.environ:
        ensure_private_dir(path.parent)  # the per-user runtime directory
    return path


# --- up ---------------------------------------------------------------------------------


def _up(args: argparse.Namespace) -> int:
    from .pool import ConfigError, Supervisor
    from .pool._supervisor import DEFAULT_CONFIG_TOML
    from .server._server import SocketServer

    if args.print_config:
        print(Path(args.config).read_text() if args.config else DEFAULT_CONFIG_TOML)
        return 0
    tcp = None
    if args.tcp:
        host, _, port = args.tcp.rpartition(":")
        if not host or not port.isdigit():
            print(
                f"snakepool up: --tcp must look like HOST:PORT, got {args.tcp!r}", file=sys.stderr
            )
            return 2
        tcp = (host.strip("[]"), int(port))
    try:
        supervisor = Supervisor.from_file(args.config) if args.config else Supervisor.default()
        server = SocketServer(
            supervisor.pools,
            socket_path=_socket(args),
            tcp=tcp,
            allow_remote=args.allow_remote,
            hello_timeout=args.hello_timeout,
        )
    except (ConfigError, ValueError, OSError) as exc:
        print(f"snakepool up: {exc}", file=sys.stderr)
        return 2
    console = _Console(live=sys.stdout.isatty() and not args.no_live)
    held = None if args.verbose else _HeldRecords()
    handler = _ConsoleHandler(console)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    if held is not None:
        handler.addFilter(held)
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)  # (a warning written straight to stderr would tear the table)
    try:
        # uvloop when installed ('snakepool[server]'): much of a request's cost is the loop's
        uvloop = importlib.util.find_spec("uvloop") is not None
        return anyio.run(
            _serve, supervisor, server, console, held, backend_options={"use_uvloop": uvloop}
        )
    except Exception as exc:
        problem = _startup_problem(exc)
        if problem is None:  # a bug: everything there is to see
            if held is not None:
                held.release(handler)
            raise
        if args.verbose:
            traceback.print_exception(exc)
        first = str(problem).strip().splitlines()[0] if str(problem).strip() else ""
        text = f"{type(problem).__name__}: {first}" if isinstance(problem, ValueError) else first
        if isinstance(problem, WorkerStartError):
            text += _which_adapter(text, supervisor.pools)
            if not args.verbose:
                text += " (-v shows the workers' output)"
        console.message(f"snakepool up: {text or type(problem).__name__}", stream=sys.stderr)
        return 1
    finally:
        console.freeze()
        root.removeHandler(handler)


def _which_adapter(message: str, pools: Any) -> str:
    """`` (pool 'general', adapter 'x:Y')`` for the pool a start failure names,
    when the message does not name its adapter already."""
    for name, pool in pools.items():
        if f"worker {name}/" in message or f"pool {name!r}" in message:
            adapter = str(pool.config.adapter)
            return "" if adapter in message else f" (pool {name!r}, adapter {adapter!r})"
    return ""


def _startup_problem(exc: BaseException) -> BaseException | None:
    """The error to report in one line (``exc`` or the first one inside its
    exception groups), or ``None`` for an unexpected one (a bug: a traceback)."""
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _startup_problem(inner)
            if found is not None:
                return found
        return None
    if isinstance(exc, SnakepoolError | OSError | ValueError):
        return exc
    return None


def _write_private(path: Path, text: str) -> None:
    """Put ``text`` at ``path`` whole and 0600 from the moment the name exists.

    A file written in place could be read half written, and one left by an
    earlier run keeps its old mode through ``O_TRUNC``; a private temporary
    file renamed over it has neither problem.
    """
    fd, staged = tempfile.mkstemp(prefix=".token-", dir=path.parent)  # mode 0600
    try:
        with os.fdopen(fd, "w") as staged_file:
            staged_file.write(text)
        os.replace(staged, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(staged)
        raise


#: After the pools have drained, how long the server may take to send the last answers.
_ANSWER_GRACE = 5.0


async def _serve(
    supervisor: Any, server: SocketServer, console: _Console, held: _HeldRecords | None
) -> int:
    """Bind, start the pools, serve until SIGINT/SIGTERM, then drain and stop.

    The socket (and TCP port) is taken before any worker starts, so a socket
    another server holds fails at once, and clients that connect while the
    pools start wait for them.
    """
    signalled: list[str] = []
    stop = anyio.Event()

    async def watch(signals: AsyncIterator[int]) -> None:
        async for received in signals:
            signalled.append(signal.Signals(received).name)
            if not stop.is_set():
                stop.set()
            else:
                console.message(f"snakepool: {signalled[-1]}: already stopping, please wait")

    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with anyio.create_task_group() as tg:
            tg.start_soon(watch, signals)
            try:
                await server.bind()
                console.message(f"snakepool: starting {', '.join(supervisor.pools)}")
                started = await _unless(stop, supervisor.start)
                if held is not None:
                    held.release(console.handler)
                if started:
                    await _run(supervisor, server, console, stop, signalled)
                else:
                    console.message(f"snakepool: {signalled[0]}: stopping")
            finally:
                with anyio.CancelScope(shield=True):
                    await supervisor.aclose()
                    await server.aclose()
            tg.cancel_scope.cancel()
    console.freeze()
    console.message("snakepool: stopped")
    return 0


async def _unless(stop: anyio.Event, start: Callable[[], Awaitable[None]]) -> bool:
    """``await start()``, cancelled if ``stop`` is set first; whether it finished."""
    async with anyio.create_task_group() as tg:

        async def stopper() -> None:
            await stop.wait()
            tg.cancel_scope.cancel()

        tg.start_soon(stopper)
        await start()
        tg.cancel_scope.cancel()
    return not stop.is_set()


async def _run(
    supervisor: Any,
    server: SocketServer,
    console: _Console,
    stop: anyio.Event,
    signalled: list[str],
) -> None:
    async with anyio.create_task_group() as tg:
        await tg.start(server.serve)
        if server.tcp is not None and server.token is not None:
            token_path = default_token_path()
            ensure_private_dir(token_path.parent)
            _write_private(token_path, server.token)
            console.message(
                f"snakepool: TCP on {server.tcp[0]}:{server.tcp_port}; token in {token_path}"
            )
        console.message(
            f"snakepool: serving {', '.join(supervisor.pools)} on {server.socket_path} "
            "(Ctrl-C drains and stops)"
        )
        tg.start_soon(_show_status, supervisor, server, console)
        await stop.wait()
        # Graceful: new calls get PoolClosed; running calls and streams finish
        # (each pool waits up to its drain_grace), their answers go out; then close.
        server.drain()
        grace = max((pool.drain_grace for pool in supervisor.pools.values()), default=0.0)
        console.message(
            f"snakepool: {signalled[0]}: draining: {server.requests_in_flight} request(s) "
            f"in flight may finish (up to {grace:g}s), new calls get PoolClosed; "
            "then stopping"
        )
        await supervisor.aclose()
        with anyio.move_on_after(_ANSWER_GRACE):
            await server.wait_idle()
        tg.cancel_scope.cancel()


async def _show_status(supervisor: Any, server: SocketServer, console: _Console) -> None:
    """A live table under the log lines on a terminal; otherwise a status line
    when something changed, at most every 30 s."""
    last = ""
    while True:
        rows = {name: _plain(pool.statistics()) for name, pool in supervisor.pools.items()}
        connections = _connections_line(server)
        if console.live:
            console.show(_table(rows) + "\n" + connections)
            await anyio.sleep(1.0)
            continue
        summary = "; ".join(
            f"{name}: {row['ready']}/{row['size']} ready, {row['completed']} done"
            for name, row in rows.items()
        )
        summary = f"{summary}; {connections}"
        if summary != last:
            console.message(f"snakepool status: {summary}")
            last = summary
        await anyio.sleep(30.0)


def _connections_line(server: SocketServer) -> str:
    stats = server.statistics()
    text = (
        f"{stats.clients} client(s) connected, {stats.dropped} dropped, "
        f"{stats.connection_errors} connection error(s)"
    )
    if stats.accept_errors:
        text += f", {stats.accept_errors} failed accept(s)"
    return text


class _Console:
    """What ``snakepool up`` writes: messages and log lines, and on a terminal
    a live status table kept below them.

    The table is never drawn by clearing the screen: to print a line, the
    table's own lines are erased (cursor up over them, erase to the end of the
    screen), the line is printed, and the table is drawn again under it. So
    log lines scroll above the table and stay. Off the terminal (``live``
    false) there is no table and no escape sequence at all.
    """

    def __init__(self, *, live: bool) -> None:
        self.live = live
        self.lock = threading.RLock()
        self.handler: logging.Handler | None = None
        self._table = ""  # the text of the table
        self._drawn = 0  # how many lines of it are on the screen, right above the cursor

    def message(self, text: str, *, stream: Any = None) -> None:
        """One line above the table (stdout unless ``stream``)."""
        stream = sys.stdout if stream is None else stream
        with self.lock:
            self._erase()
            with contextlib.suppress(Exception):
                stream.write(text + "\n")
                stream.flush()
            self._draw()

    def show(self, table: str) -> None:
        """Draw ``table`` (live only), in place of the one drawn before."""
        if not self.live:
            return
        with self.lock:
            if table == self._table and self._drawn:
                return
            self._erase()
            self._table = table
            self._draw()

    def freeze(self) -> None:
        """Leave the table on the screen as it is, and draw no more."""
        with self.lock:
            self._drawn = 0
            self._table = ""
            self.live = False

    def _erase(self) -> None:
        if not self._drawn:
            return
        with contextlib.suppress(Exception):
            # to the first column, up over the table's lines, erase to the end of the screen
            sys.stdout.write(f"\r\x1b[{self._drawn}F\x1b[0J")
            sys.stdout.flush()
        self._drawn = 0

    def _draw(self) -> None:
        if not self.live or not self._table:
            return
        width, height = shutil.get_terminal_size((100, 24))
        # Lines that wrap, or more lines than the screen, would break the erasing.
        lines = [line[: max(width - 1, 1)] for line in self._table.splitlines()]
        lines = lines[: max(height - 2, 1)]
        with contextlib.suppress(Exception):
            sys.stdout.write("\n".join(lines) + "\n")
            sys.stdout.flush()
            self._drawn = len(lines)


class _ConsoleHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Log records to stderr, above the console's live table."""

    def __init__(self, console: _Console) -> None:
        super().__init__(sys.stderr)
        self.console = console
        console.handler = self

    def emit(self, record: logging.LogRecord) -> None:
        with self.console.lock:
            if self.console.live and self.console._drawn:
                self.console._erase()
                super().emit(record)
                self.console._draw()
            else:
                super().emit(record)


class _HeldRecords(logging.Filter):
    """Holds log records back while the pools start (see ``-v``).

    A worker that cannot start is tried again, and every worker of the pool
    fails alike: their output would be a wall of the same traceback. Held
    records are replayed once the pools are up, or dropped when the start
    failed (its one-line reason is printed instead).
    """

    def __init__(self, limit: int = 10_000) -> None:
        super().__init__()
        self.holding = True
        self.records: collections.deque[logging.LogRecord] = collections.deque(maxlen=limit)

    def filter(self, record: logging.LogRecord) -> bool:
        if self.holding:
            self.records.append(record)
            return False
        return True

    def release(self, handler: logging.Handler | None) -> None:
        """Stop holding; replay what was held through ``handler``."""
        self.holding = False
        records, self.records = list(self.records), collections.deque()
        if handler is not None:
            for record in records:
                handler.handle(record)


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


def _session_id(text: str) -> str:
    """``--session``: refused here, before any connection, if it breaks the id rule."""
    try:
        return check_session_id(text)
    except InvalidSessionId as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


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

    return _run_client(run, "status")


def _run_client(run: Any, what: str) -> int:
    try:
        anyio.run(run)
    except RemoteError as exc:
        print(f"{exc.remote_type}: {exc.remote_message}", file=sys.stderr)
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


# --- doctor -------------------------------------------------------------------------------


def _doctor(args: argparse.Namespace) -> int:
    from .pool import discover_gpus

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
    _doctor_isolation()
    socket_path = _socket(args)
    print(f"socket      {socket_path}: {anyio.run(_probe_socket, socket_path)}")
    for spec in ["generic", *args.adapter]:
        ok, detail = anyio.run(_round_trip, spec)
        problems += not ok
        print(f"adapter     {spec}: {detail}")
    print("ok" if not problems else f"{problems} problem(s) found")
    return 0 if not problems else 1


def _doctor_isolation() -> None:
    """What the pools' isolation options can have here (optional: never a problem)."""
    from .pool._isolation import describe_support

    for feature, support in describe_support().items():
        print(f"isolation   {feature}: {support}")


async def _probe_socket(path: Path) -> str:
    if not path.exists():
        return "no server running (start one with 'snakepool up')"
    try:
        async with connect(path) as client:
            return f"a server answers, pools: {', '.join(client.pools)}"
    except (ConnectionError, SnakepoolError) as exc:
        return f"a stale socket, or not a snakepool server ({exc}); remove it or run 'snakepool up'"


async def _round_trip(spec: str) -> tuple[bool, str]:
    from .pool import Pool

    try:
        async with Pool(spec, name="doctor", size=1, startup_timeout=60) as pool:
            answer = await pool.call("ping", timeout=30)
            pid = pool.statistics().workers[0].pid
    except Exception as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return False, f"FAILED: {first_line}"
    return answer == "pong", f"worker pid {pid} answered {answer!r}"


# --- bench --------------------------------------------------------------------------------


def _bench(args: argparse.Namespace) -> int:
    from ._bench import run_from_args

    return run_from_args(args, prog="snakepool bench")


# --- new-adapter --------------------------------------------------------------------------


#: The longest package name ``new-adapter`` writes.
ADAPTER_NAME_MAX_LENGTH = 64
#: Taken even where no module of that name is installed.
_RESERVED_ADAPTER_NAMES = {
    "test": "the standard library's regression tests ('test', absent from some builds)",
    "tests": "the generated package's own tests directory",
}


def _adapter_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a Python package name at all, or ``None``."""
    if len(name) > ADAPTER_NAME_MAX_LENGTH:
        return f"{name[:20]!r}... is {len(name)} characters long; at most {ADAPTER_NAME_MAX_LENGTH}"
    if not name.isascii() or not name.isidentifier() or name != name.lower():
        return f"{name!r} must be a lower-case ASCII Python identifier (a-z, 0-9, _)"
    if keyword.iskeyword(name):
        return f"{name!r} is a Python keyword"
    return None


def _adapter_name_shadows(name: str) -> str | None:
    """What an adapter package called ``name`` would shadow, or ``None``.

    A package named like a module that already exists (``json``, ``os``, ``site``,
    ``test``, ``snakepool``, anything installed or on the path, a built-in adapter's
    entry point) would hide it from every program run next to it: the generated
    package's own test would import the wrong module, or hang.
    """
    if name in sys.stdlib_module_names or name in sys.builtin_module_names:
        return f"{name!r} would shadow the standard library module {name!r}"
    if name == "snakepool":
        return "'snakepool' would shadow snakepool itself"
    if name in _RESERVED_ADAPTER_NAMES:
        return f"{name!r} would shadow {_RESERVED_ADAPTER_NAMES[name]}"
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError) as exc:  # a broken module of that name: still taken
        return f"{name!r} would shadow an importable module of that name ({exc})"
    if spec is not None:
        where = spec.origin or ", ".join(spec.submodule_search_locations or ()) or "?"
        return f"{name!r} would shadow the importable module {name!r} ({where})"
    if any(ep.name == name for ep in importlib.metadata.entry_points(group="snakepool.adapters")):
        return f"{name!r} is already an adapter's name (entry point group snakepool.adapters)"
    return None


def _new_adapter(args: argparse.Namespace) -> int:
    name = args.name
    problem = _adapter_name_problem(name)
    if problem is not None:
        print(f"snakepool new-adapter: {problem}; choose another name", file=sys.stderr)
        return 2
    root = Path(args.directory) / name
    if root.exists():
        print(f"snakepool new-adapter: {root} already exists; nothing was written", file=sys.stderr)
        return 1
    problem = _adapter_name_shadows(name)
    if problem is not None:
        print(f"snakepool new-adapter: {problem}; choose another name", file=sys.stderr)
        return 2
    class_name = "".join(part.capitalize() for part in name.split("_")) + "Adapter"
    for relative, text in _scaffold(name, class_name).items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    print(f"created {root}: cd {root} && pip install -e . && python -m pytest")
    return 0


def _scaffold(name: str, class_name: str) -> dict[str, str]:
    return {
        "pyproject.toml": textwrap.dedent(f"""\
            [build-system]
            requires = ["setuptools>=77"]
            build-backend = "setuptools.build_meta"

            [project]
            name = "{name}"
            version = "0.1.0"
            requires-python = ">=3.11"
            dependencies = ["snakepool"]

            [project.optional-dependencies]
            test = ["pytest"]

            [project.entry-points."snakepool.adapters"]
            {name} = "{name}.adapter:{class_name}"

            [tool.setuptools.packages.find]
            include = ["{name}*"]
            """),
        f"{name}/__init__.py": f'"""The {name} snakepool adapter."""\n\nfrom .adapter import {class_name} as {class_name}\n\n__all__ = ["{class_name}"]\n',
        f"{name}/adapter.py": textwrap.dedent(f'''\
            """Worker-side code: one instance of {class_name} lives in each worker process."""

            from __future__ import annotations

            from collections.abc import Iterator
            from typing import Any

            from snakepool.adapters import Adapter, CallContext, command


            class {class_name}(Adapter):
                def setup(self, config: dict[str, Any]) -> None:
                    """Once per worker; ``config`` is the pool's adapter_config."""
                    self.greeting = config.get("greeting", "hello")

                @command
                def greet(self, name: str) -> str:
                    """Greet ``name``."""
                    return f"{{self.greeting}}, {{name}}"

                @command
                def count(self, n: int) -> Iterator[int]:
                    """Stream 0..n-1."""
                    yield from range(n)

                @command
                def remember(self, key: str, value: Any, ctx: CallContext) -> None:
                    """Keep ``value`` in the session (it survives this worker)."""
                    ctx.session_state[key] = value
                    ctx.save_state(key, value)

                @command
                def recall(self, key: str, ctx: CallContext) -> Any:
                    return ctx.session_state.get(key)

                def restore_session(self, ctx: CallContext, state: dict[str, Any]) -> None:
                    ctx.session_state.update(state)
            '''),
        "tests/test_adapter.py": textwrap.dedent(f'''\
            """Runs the adapter in real worker processes."""

            import anyio

            import snakepool


            def test_greet_count_and_session() -> None:
                async def main() -> None:
                    async with snakepool.Pool("{name}", size=1, adapter_config={{"greeting": "hi"}}) as pool:
                        assert await pool.call("greet", {{"name": "Ada"}}) == "hi, Ada"
                        assert [i async for i in pool.stream("count", {{"n": 3}})] == [0, 1, 2]
                        async with pool.session() as session:
                            await session.call("remember", {{"key": "k", "value": 42}})
                            assert await session.call("recall", {{"key": "k"}}) == 42

                anyio.run(main)
            '''),
        "README.md": f"# {name}\n\nA snakepool adapter. `pip install -e .` registers it as `{name}`:\n\n"
        f'```python\nasync with snakepool.Pool("{name}") as pool:\n    await pool.call("greet", {{"name": "Ada"}})\n```\n',
    }


if __name__ == "__main__":
    sys.exit(main())
