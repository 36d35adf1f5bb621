"""The ``snakepool`` command: up, call, status, doctor, new-adapter, bench."""

from __future__ import annotations

import argparse
import base64
import contextlib
import importlib.metadata
import importlib.util
import json
import keyword
import logging
import os
import platform
import signal
import sys
import tempfile
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio

from .errors import InvalidSessionId, RemoteError, SnakepoolError
from .pool import Pool, discover_gpus
from .pool._registry import ensure_private_dir
from .pool._store import check_session_id
from .server import SocketServer, connect, default_socket_path, default_token_path

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

    call = commands.add_parser("call", help="call a command on a pool of a running server")
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
        help="keyword arguments as a JSON object",
    )

    status = commands.add_parser("status", help="show the pools of a running server")
    status.add_argument("--socket", metavar="PATH", help=socket_help)
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")

    doctor = commands.add_parser(
        "doctor", help="check python, packages, GPUs, the socket and adapters"
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

    from ._bench import add_arguments as add_bench_arguments

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
            supervisor.pools, socket_path=_socket(args), tcp=tcp, allow_remote=args.allow_remote
        )
    except (ConfigError, ValueError, OSError) as exc:
        print(f"snakepool up: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return anyio.run(_serve, supervisor, server)
    except (SnakepoolError, OSError) as exc:
        print(f"snakepool up: {exc}", file=sys.stderr)
        return 1


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


async def _serve(supervisor: Any, server: SocketServer) -> int:
    async with supervisor, anyio.create_task_group() as tg:
        await tg.start(server.serve)
        if server.tcp is not None and server.token is not None:
            token_path = default_token_path()
            ensure_private_dir(token_path.parent)
            _write_private(token_path, server.token)
            print(
                f"snakepool: TCP on {server.tcp[0]}:{server.tcp_port}; token in {token_path}",
                flush=True,
            )
        names = ", ".join(supervisor.pools)
        print(
            f"snakepool: serving {names} on {server.socket_path} (Ctrl-C drains and stops)",
            flush=True,
        )
        tg.start_soon(_show_status, supervisor, server)
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for received in signals:
                print(
                    f"snakepool: {signal.Signals(received).name}: draining and stopping", flush=True
                )
                break
        tg.cancel_scope.cancel()
    print("snakepool: stopped", flush=True)
    return 0


async def _show_status(supervisor: Any, server: SocketServer) -> None:
    """A live table on a terminal; a summary line every 30 s otherwise."""
    tty = sys.stdout.isatty()
    while True:
        await anyio.sleep(1.0 if tty else 30.0)
        rows = {name: _plain(pool.statistics()) for name, pool in supervisor.pools.items()}
        if tty:
            sys.stdout.write(
                "\x1b[H\x1b[2J" + _table(rows) + f"\n{server.clients} client(s) connected\n"
            )
            sys.stdout.flush()
        else:
            summary = "; ".join(
                f"{name}: {row['ready']}/{row['size']} ready, {row['completed']} done"
                for name, row in rows.items()
            )
            print(f"snakepool status: {summary}", flush=True)


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
    }


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
        call_args = json.loads(args.json_args)
    except json.JSONDecodeError as exc:
        print(f"snakepool call: JSON arguments are not valid JSON: {exc}", file=sys.stderr)
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
        if args.json:
            print(json.dumps(stats, indent=2, default=_json_default))
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
    if isinstance(value, bytes | bytearray):
        return {"$bytes": base64.b64encode(bytes(value)).decode("ascii")}
    return repr(value)


# --- doctor -------------------------------------------------------------------------------


def _doctor(args: argparse.Namespace) -> int:
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
    socket_path = _socket(args)
    print(f"socket      {socket_path}: {anyio.run(_probe_socket, socket_path)}")
    for spec in ["generic", *args.adapter]:
        ok, detail = anyio.run(_round_trip, spec)
        problems += not ok
        print(f"adapter     {spec}: {detail}")
    print("ok" if not problems else f"{problems} problem(s) found")
    return 0 if not problems else 1


async def _probe_socket(path: Path) -> str:
    if not path.exists():
        return "no server running (start one with 'snakepool up')"
    try:
        async with connect(path) as client:
            return f"a server answers, pools: {', '.join(client.pools)}"
    except (ConnectionError, SnakepoolError) as exc:
        return f"a stale socket, or not a snakepool server ({exc}); remove it or run 'snakepool up'"


async def _round_trip(spec: str) -> tuple[bool, str]:
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
