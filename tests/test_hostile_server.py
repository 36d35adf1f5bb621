"""Hardening (issue 14): nothing a client sends ends the server or another
connection; frames are measured before they are decoded; a connection has
``hello_timeout`` to say hello; the handshake is strict; extension types are
refused; ``--socket`` never replaces anything but a stale socket.

Real worker processes, a real ``SocketServer`` (and the real ``snakepool up``
where the report was about it), raw sockets for the hostile side.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import msgpack
import pytest

import snakepool
from conftest import TESTS_DIR
from server_wire import serving
from snakepool.protocol import NEED_DATA, FrameDecoder, Sentinel
from snakepool.server import SocketServer
from snakepool.server import _connection as connection_module
from waiting import wait_until

pytestmark = pytest.mark.anyio

ADAPTER = "sp_adapters:Stateful"
SNAKEPOOL = [sys.executable, "-m", "snakepool.cli"]


@pytest.fixture
def socket_path(workdir: Path) -> Path:
    return workdir / "s.sock"


def pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def frame(value: Any) -> bytes:
    body = value if isinstance(value, bytes) else pack(value)
    return len(body).to_bytes(4, "big") + body


class Raw:
    """One hostile (or just hand-driven) connection: bytes out, frames in."""

    def __init__(self, stream: anyio.abc.SocketStream) -> None:
        self.stream = stream
        self.decoder = FrameDecoder(2**31)

    @classmethod
    async def unix(cls, path: Path) -> Raw:
        return cls(await anyio.connect_unix(path))

    @classmethod
    async def tcp(cls, port: int) -> Raw:
        return cls(await anyio.connect_tcp("127.0.0.1", port))

    async def send(self, data: bytes) -> None:
        await self.stream.send(data)

    async def hello(self) -> None:
        await self.send(frame({"t": "hello", "v": 1}))
        assert (await self.next())["t"] == "welcome"

    async def next(self, timeout: float = 15.0) -> dict[str, Any]:
        """The next frame; fails if the server closes first or nothing comes in time."""
        got = await self.next_or_end(timeout)
        assert got is not None, "the server closed the connection"
        return got

    async def next_or_end(self, timeout: float = 15.0) -> dict[str, Any] | None:
        with anyio.fail_after(timeout):
            while True:
                got = self.decoder.next_frame()
                if isinstance(got, dict):
                    return got
                if isinstance(got, Sentinel) and got is not NEED_DATA:
                    return None
                try:
                    data = await self.stream.receive(1 << 20)
                except (anyio.EndOfStream, anyio.BrokenResourceError, ConnectionError):
                    data = b""
                self.decoder.feed(data)

    async def error_then_closed(self, timeout: float = 15.0) -> str:
        """The ``error`` frame the server sends before it closes; checks that it closes."""
        error = await self.next(timeout)
        assert error["t"] == "error", error
        assert await self.next_or_end(timeout) is None, "the server did not close"
        return str(error["e"])

    async def aclose(self) -> None:
        await self.stream.aclose()


# --- 1. one frame must not end the server --------------------------------------------------


def _start_up(workdir: Path, *args: str) -> tuple[subprocess.Popen[str], queue.Queue[str]]:
    """``snakepool up`` with one small pool; its stdout lines arrive on the queue."""
    config = workdir / "pools.toml"
    config.write_text('[pools.general]\nadapter = "sp_adapters:Stateful"\nsize = 1\n')
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS_DIR), *sys.path])
    env["SNAKEPOOL_RUNTIME_DIR"] = str(workdir / "run")
    env.pop("SNAKEPOOL_SOCKET", None)
    up = subprocess.Popen(
        [*SNAKEPOOL, "up", "--config", str(config), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert up.stdout is not None
        for line in up.stdout:
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    return up, lines


def _wait_for_line(
    lines: queue.Queue[str], pattern: str, up: subprocess.Popen[str]
) -> re.Match[str]:
    seen: list[str] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.1)
        except queue.Empty:
            assert up.poll() is None, f"snakepool up exited: {''.join(seen)}"
            continue
        seen.append(line)
        found = re.search(pattern, line)
        if found:
            return found
    raise AssertionError(f"no line matching {pattern!r} within 60s: {''.join(seen)}")


def _stop(up: subprocess.Popen[str]) -> int:
    if up.poll() is None:
        up.send_signal(signal.SIGTERM)
        try:
            return up.wait(timeout=60)
        except subprocess.TimeoutExpired:
            up.kill()
            up.wait()
    return up.returncode


def _raw_tcp_exchange(port: int, hello: dict[str, Any]) -> list[dict[str, Any]]:
    """Send ``hello`` on a fresh TCP connection; every frame until the server closes or 10 s."""
    got: list[dict[str, Any]] = []
    decoder = FrameDecoder(2**31)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(frame(hello))
        while True:
            try:
                data = sock.recv(65536)
            except TimeoutError:
                return got
            decoder.feed(data)
            while isinstance(item := decoder.next_frame(), dict):
                got.append(item)
            if not data:
                return got
            if got and got[-1]["t"] == "welcome":
                return got


def test_a_non_ascii_token_over_tcp_does_not_end_snakepool_up(workdir: Path) -> None:
    # The report: hmac.compare_digest raised on a str that is not ASCII, uncaught,
    # and `snakepool up` exited with every pool.
    sock = workdir / "s.sock"
    up, lines = _start_up(workdir, "--socket", str(sock), "--tcp", "127.0.0.1:0")
    try:
        found = _wait_for_line(lines, r"TCP on 127\.0\.0\.1:(\d+); token in (\S+)", up)
        port, token = int(found[1]), Path(found[2]).read_text().strip()
        for bad in ("tøken", "🙂" * 50, token[:-1] + "é"):
            answers = _raw_tcp_exchange(port, {"t": "hello", "v": 1, "k": bad})
            assert answers == [{"t": "error", "e": "a valid token is required on TCP"}]
        assert up.poll() is None, "snakepool up died"
        welcome = _raw_tcp_exchange(port, {"t": "hello", "v": 1, "k": token})
        assert welcome[-1]["t"] == "welcome" and welcome[-1]["pools"] == ["general"]
        assert _stop(up) == 0
    finally:
        _stop(up)


async def test_a_non_ascii_token_is_a_refusal_not_an_error(socket_path: Path) -> None:
    async with (
        snakepool.Pool(ADAPTER, size=1, name="general") as pool,
        serving(pool, socket_path=socket_path, tcp=("127.0.0.1", 0)) as server,
    ):
        assert server.tcp_port is not None
        for bad in ("tøken", "\u0000" + "é" * 1000, 42):
            raw = await Raw.tcp(server.tcp_port)
            await raw.send(frame({"t": "hello", "v": 1, "k": bad}))
            assert await raw.error_then_closed() == "a valid token is required on TCP"
            await raw.aclose()
        stats = server.statistics()
        assert (stats.dropped, stats.connection_errors) == (3, 0)
        async with snakepool.connect(
            tcp=("127.0.0.1", server.tcp_port), token=server.token
        ) as client:
            assert await client["general"].call("echo", {"value": "ok"}) == "ok"


async def test_an_unexpected_error_closes_that_connection_alone(
    socket_path: Path,
    workdir: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A bug in serving one connection (forced here) closes it, is logged with its
    traceback and counted; another client's call in flight carries on."""
    greet = connection_module.Connection._greet

    def greet_or_fail(self: Any, message: dict[str, Any]) -> None:
        if "boom" in message:
            raise RuntimeError("a bug while greeting (forced by the test)")
        greet(self, message)

    monkeypatch.setattr(connection_module.Connection, "_greet", greet_or_fail)
    release = workdir / "release"
    async with (
        snakepool.Pool(ADAPTER, size=2, name="general") as pool,
        serving(pool, socket_path=socket_path) as server,
        snakepool.connect(socket_path) as good,
        anyio.create_task_group() as tg,
    ):
        held: list[Any] = []

        async def hold() -> None:
            held.append(await good["general"].call("hold", {"release": str(release)}))

        tg.start_soon(hold)
        await wait_until(lambda: sum(w.inflight for w in pool.statistics().workers) == 1)
        with caplog.at_level(logging.ERROR, logger="snakepool.server"):
            poisoned = await Raw.unix(socket_path)
            await poisoned.send(frame({"t": "hello", "v": 1, "boom": True}))
            assert "internal server error" in await poisoned.error_then_closed()
            await poisoned.aclose()
        await wait_until(lambda: server.statistics().connection_errors == 1)
        [record] = [r for r in caplog.records if r.name == "snakepool.server"]
        assert record.levelno == logging.ERROR and record.exc_info is not None
        assert "a bug while greeting" in caplog.text  # the traceback is in the log
        # The other connection and its call in flight never noticed.
        release.touch()
        await wait_until(lambda: len(held) == 1)
        assert held[0]["end"] >= held[0]["start"]
        assert await good["general"].call("echo", {"value": 1}) == 1
        async with snakepool.connect(socket_path) as later:
            assert await later["general"].call("echo", {"value": 2}) == 2
        assert server.statistics().connection_errors == 1
        assert server.statistics().accepted == 3


async def test_a_failed_accept_is_not_the_end_of_the_server(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Out of file descriptors (EMFILE), accept fails: logged, counted, retried."""
    accepted: list[object] = []

    class Listener:
        def __init__(self) -> None:
            self.outcomes: list[object] = [
                OSError(24, "Too many open files"),
                "a connection",
                anyio.ClosedResourceError(),
            ]

        async def accept(self) -> object:
            outcome = self.outcomes.pop(0)
            if isinstance(outcome, BaseException):
                raise outcome
            return outcome

    async def handler(stream: object) -> None:
        accepted.append(stream)

    server = SocketServer({}, socket_path="unused.sock")
    with caplog.at_level(logging.WARNING, logger="snakepool.server"):
        async with anyio.create_task_group() as tg:
            await server._accept_loop(Listener(), handler, tg)  # type: ignore[arg-type]
    assert accepted == ["a connection"]
    assert (server.statistics().accept_errors, server.statistics().accepted) == (1, 1)
    assert "Too many open files" in caplog.text


# --- 4. frames are measured before they are decoded ------------------------------------------


async def test_a_frame_of_empty_maps_is_refused_without_blowing_up_memory(
    socket_path: Path,
) -> None:
    async with (
        snakepool.Pool(ADAPTER, size=1, name="general") as pool,
        serving(pool, socket_path=socket_path) as server,
        snakepool.connect(socket_path) as good,
    ):
        bombs = {
            "in a call": frame(
                {"t": "call", "i": 1, "p": "general", "c": "echo", "a": {"value": [{}] * 1_000_000}}
            ),
            "a top-level list (the report)": frame([{}] * 1_000_000),
        }
        expected = {
            "in a call": "would decode into more than",
            "a top-level list (the report)": "frame holds a list, not a map",
        }
        for name, bomb in bombs.items():
            raw = await Raw.unix(socket_path)
            await raw.hello()
            tracemalloc.start()
            try:
                await raw.send(bomb)
                error = await raw.error_then_closed()
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            await raw.aclose()
            assert expected[name] in error, (name, error)
            # Decoding it would have taken ~73 MB; buffered and measured, a few MB.
            assert peak < 8 * len(bomb), (name, peak)
        assert server.statistics().dropped == 2
        # Ordinary large data still goes through, and the pool never noticed.
        records = [{"id": 1000 + i, "v": i / 3, "name": f"name {i}"} for i in range(30_000)]
        assert await good["general"].call("echo", {"value": records}) == records
        assert pool.statistics().ready_workers == 1


# --- 5. hello within hello_timeout ------------------------------------------------------------


async def test_connections_that_never_finish_hello_are_closed(socket_path: Path) -> None:
    async with (
        snakepool.Pool(ADAPTER, size=1, name="general") as pool,
        serving(pool, socket_path=socket_path, hello_timeout=0.5) as server,
    ):
        idle = await Raw.unix(socket_path)
        mid_header = await Raw.unix(socket_path)
        await mid_header.send(b"\x00\x00")
        mid_body = await Raw.unix(socket_path)
        hello = frame({"t": "hello", "v": 1})
        await mid_body.send(hello[: len(hello) - 3])
        greeted = await Raw.unix(socket_path)
        await greeted.hello()
        for raw in (idle, mid_header, mid_body):
            assert await raw.error_then_closed() == "no hello within 0.5s"
            await raw.aclose()
        # Its deadline passed too, unnoticed: it had said hello.
        await greeted.send(frame({"t": "status", "i": 1}))
        answer = await greeted.next()
        assert answer["t"] == "result" and answer["r"]["general"]["size"] == 1
        await greeted.aclose()
        await wait_until(lambda: server.statistics().clients == 0)
        assert server.statistics().dropped == 3


def test_hello_timeout_has_a_default_and_is_checked() -> None:
    server = SocketServer({}, socket_path="/nonexistent/s.sock")
    assert server.hello_timeout == 5.0
    assert SocketServer({}, socket_path="x", hello_timeout=None).hello_timeout is None
    with pytest.raises(ValueError, match="hello_timeout must be positive"):
        SocketServer({}, socket_path="x", hello_timeout=0)


# --- 10. a strict handshake; no extension types -----------------------------------------------


@pytest.mark.parametrize(
    ("version", "shown"),
    [
        (True, "True (bool)"),
        (1.0, "1.0 (float)"),
        ("1", "'1' (str)"),
        (None, "None (NoneType)"),
        (3, "3 (int)"),
        ([1], "[1] (list)"),
    ],
)
async def test_hello_needs_the_integer_version(socket_path: Path, version: Any, shown: str) -> None:
    async with (
        snakepool.Pool(ADAPTER, size=1, name="general") as pool,
        serving(pool, socket_path=socket_path),
    ):
        raw = await Raw.unix(socket_path)
        await raw.send(frame({"t": "hello", "v": version}))
        error = await raw.error_then_closed()
        await raw.aclose()
        assert (
            error == f"hello 'v' must be an integer client protocol version (1 or 2); got {shown}"
        )
        async with snakepool.connect(socket_path) as client:  # (v: 2)
            assert await client["general"].call("echo", {"value": 1}) == 1


async def test_a_second_hello_is_named_as_such(socket_path: Path) -> None:
    async with (
        snakepool.Pool(ADAPTER, size=1, name="general") as pool,
        serving(pool, socket_path=socket_path),
    ):
        raw = await Raw.unix(socket_path)
        await raw.send(frame({"t": "hello", "v": 2}))
        assert (await raw.next())["t"] == "welcome"
        await raw.send(frame({"t": "hello", "v": 2}))
        error = await raw.error_then_closed()
        await raw.aclose()
        assert error == "'hello' comes once, first; this connection was welcomed already"


@pytest.mark.parametrize(
    ("value", "code"),
    [
        (msgpack.ExtType(42, b"payload"), "42"),
        (msgpack.Timestamp(1_700_000_000, 0), r"-1 \(timestamp\)"),
        ([b"x" * 20_000, msgpack.ExtType(7, b"")], "7"),  # a frame big enough to be measured
    ],
    ids=["ext-42", "timestamp", "ext-7-in-a-large-frame"],
)
async def test_a_client_frame_with_an_extension_type_is_refused(
    socket_path: Path, value: Any, code: str
) -> None:
    async with (
        snakepool.Pool(ADAPTER, size=1, name="general") as pool,
        serving(pool, socket_path=socket_path),
        snakepool.connect(socket_path) as good,
    ):
        raw = await Raw.unix(socket_path)
        await raw.hello()
        call = {"t": "call", "i": 1, "p": "general", "c": "echo", "a": {"value": value}}
        await raw.send(frame(call))
        error = await raw.error_then_closed()
        await raw.aclose()
        assert re.search(rf"MessagePack extension type {code} is not supported", error), error
        assert await good["general"].call("echo", {"value": "still here"}) == "still here"


# --- 6. the socket path: only a stale socket is ever replaced -----------------------------------


async def _refused(path: Path) -> None:
    """Try to serve on ``path``: this raises what refused it."""
    await SocketServer({}, socket_path=path).serve()
    raise AssertionError("served")  # (serve returns only when cancelled)


async def _serve_once(path: Path) -> None:
    """Start a server on ``path`` (no pools needed to bind), connect once, stop it again."""
    server = SocketServer({}, socket_path=path)
    async with anyio.create_task_group() as tg:
        await tg.start(server.serve)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        async with await anyio.connect_unix(path):
            pass
        # (cancelled while accepting the next one, anyio's asyncio backend can set a
        # cancelled future: wait until the server is back to waiting)
        await wait_until(lambda: server.accepted == 1 and server.clients == 0)
        tg.cancel_scope.cancel()


async def test_a_regular_file_at_the_socket_path_is_never_replaced(workdir: Path) -> None:
    notes = workdir / "notes.txt"
    notes.write_text("my notes, not a socket")
    with pytest.raises(FileExistsError) as refused:
        await _refused(notes)
    message = str(refused.value)
    assert str(notes) in message and "a regular file is there, not a socket" in message
    assert notes.read_text() == "my notes, not a socket"
    assert sorted(p.name for p in workdir.iterdir()) == ["notes.txt"]  # no staging left


async def test_other_things_at_the_socket_path_are_refused_naming_them(workdir: Path) -> None:
    directory = workdir / "a-dir"
    directory.mkdir()
    (directory / "inside").write_text("kept")
    target = workdir / "target.txt"
    target.write_text("the link's target")
    link = workdir / "link"
    link.symlink_to(target)
    dangling = workdir / "dangling"
    dangling.symlink_to(workdir / "nowhere.sock")
    fifo = workdir / "fifo"
    os.mkfifo(fifo)
    for path, what in [
        (directory, "a directory"),
        (link, "a symbolic link"),
        (dangling, "a symbolic link"),
        (fifo, "a FIFO"),
    ]:
        with pytest.raises(FileExistsError, match=rf"{re.escape(str(path))}: {what}"):
            await _refused(path)
    assert (directory / "inside").read_text() == "kept"
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert target.read_text() == "the link's target"
    assert dangling.is_symlink() and not (workdir / "nowhere.sock").exists()
    assert stat.S_ISFIFO(fifo.lstat().st_mode)


async def test_missing_parent_directories_are_created_private(workdir: Path) -> None:
    path = workdir / "new" / "deeper" / "s.sock"
    old_umask = os.umask(0o022)  # the usual umask: a plain mkdir would give 0755
    try:
        await _serve_once(path)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE((workdir / "new").stat().st_mode) == 0o700
    assert stat.S_IMODE((workdir / "new" / "deeper").stat().st_mode) == 0o700
    assert not path.exists()  # the server removed its socket when it stopped


async def test_a_stale_socket_is_replaced(workdir: Path) -> None:
    path = workdir / "s.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))  # a server that died: its socket file is left, nobody listens
    dead.close()
    assert stat.S_ISSOCK(path.lstat().st_mode)
    await _serve_once(path)
    assert not path.exists()


async def test_a_server_leaves_a_socket_that_replaced_its_own_alone(workdir: Path) -> None:
    path = workdir / "s.sock"
    server = SocketServer({}, socket_path=path)
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(server.serve)
            path.unlink()  # someone removed ours and bound their own there
            other.bind(str(path))
            tg.cancel_scope.cancel()
        assert stat.S_ISSOCK(path.lstat().st_mode), "the server removed a socket not its own"
    finally:
        other.close()


def test_snakepool_up_refuses_a_regular_file_as_its_socket(workdir: Path) -> None:
    notes = workdir / "notes.txt"
    notes.write_text("a user's notes")
    up, lines = _start_up(workdir, "--socket", str(notes))
    try:
        assert up.wait(timeout=120) == 1
    finally:
        _stop(up)
    output = ""
    while not lines.empty():
        output += lines.get()
    assert f"cannot listen on {notes}: a regular file is there" in output, output
    assert notes.read_text() == "a user's notes"


async def test_a_handlers_builtin_exception_keeps_its_public_class_on_the_wire(
    socket_path: Path,
) -> None:
    """``y`` is ``RemoteError`` (``rt`` the handler's type), and the Python client
    raises an error that ``except ValueError`` catches, as the embedded pool does."""
    pool = snakepool.Pool("generic", size=1, name="general", adapter_config={"allow": ["json"]})
    bad_json = {"target": "json:loads", "args": ["{"]}
    async with pool, serving(pool, socket_path=socket_path):
        raw = await Raw.unix(socket_path)
        await raw.hello()
        await raw.send(frame({"t": "call", "i": 1, "p": "general", "c": "call", "a": bad_json}))
        failure = await raw.next()
        await raw.aclose()
        assert (failure["t"], failure["y"], failure["g"]) == (
            "failure",
            "RemoteError",
            "application",
        )
        assert failure["rt"].endswith("JSONDecodeError")
        async with snakepool.connect(socket_path) as client:
            with pytest.raises(ValueError, match="Expecting property name") as caught:
                await client["general"].call("call", bad_json)
        assert isinstance(caught.value, snakepool.RemoteError)
