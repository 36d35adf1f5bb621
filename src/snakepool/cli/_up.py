"""``snakepool up``: start the supervisor's pools, serve them on a socket, show
their status live, drain on SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import collections
import contextlib
import importlib.metadata
import importlib.util
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from .._paths import default_token_path, ensure_private_dir
from ..errors import SnakepoolError, WorkerStartError
from ._client import _plain, _table
from ._common import _socket

if TYPE_CHECKING:
    from ..server._server import SocketServer


def _up(args: argparse.Namespace) -> int:
    from ..pool import ConfigError, Supervisor
    from ..pool._supervisor import DEFAULT_CONFIG_TOML
    from ..server._server import SocketServer

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
        served = _observability(args, supervisor.pools, server)
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
            _serve,
            supervisor,
            server,
            console,
            held,
            served,
            backend_options={"use_uvloop": uvloop},
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
    supervisor: Any,
    server: SocketServer,
    console: _Console,
    held: _HeldRecords | None,
    served: Sequence[Any] = (),
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
                    await _run(supervisor, server, console, stop, signalled, served)
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
    served: Sequence[Any] = (),
) -> None:
    async with anyio.create_task_group() as tg:
        await tg.start(server.serve)
        for item in served:  # --metrics, --dashboard
            await tg.start(item.serve())
            console.message(f"snakepool: {item.what} on {item.url}")
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


def _observability(args: argparse.Namespace, pools: Any, server: SocketServer) -> list[Any]:
    """Bind ``--metrics`` and ``--dashboard`` (nothing imported without them); keep
    the workers' output for ``snakepool logs`` from the start."""
    from ..observability._logs import worker_logs

    worker_logs()
    if args.metrics is None and args.dashboard is None:
        return []
    from ..observability._up import prepare

    return prepare(
        metrics=args.metrics,
        dashboard=args.dashboard,
        pools=pools,
        server=server,
        allow_remote=args.allow_remote,
    )


# --- doctor -------------------------------------------------------------------------------
