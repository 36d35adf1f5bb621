"""The socket server's tests: a raw client (frames in, frames out), a pool
served in the test's own loop, and a real ``snakepool up`` to talk to."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import msgpack

import snakepool
from snakepool.protocol import NEED_DATA, FrameDecoder, Sentinel
from snakepool.server import SocketServer


@asynccontextmanager
async def serving(pool: snakepool.Pool, **options: Any) -> AsyncIterator[SocketServer]:
    """``pool`` served as ``general`` (``SocketServer(..., **options)``) until the block ends."""
    server = SocketServer({"general": pool}, **options)
    async with anyio.create_task_group() as tg:
        await tg.start(server.serve)
        try:
            yield server
        finally:
            tg.cancel_scope.cancel()


def frame(message: dict[str, Any]) -> bytes:
    body = msgpack.packb(message, use_bin_type=True)
    return len(body).to_bytes(4, "big") + body


class Raw:
    """One hand-driven connection: maps out, maps in."""

    def __init__(self, stream: anyio.abc.SocketStream) -> None:
        self.stream = stream
        self.decoder = FrameDecoder(2**31)
        self.received = 0  # bytes

    @classmethod
    async def unix(cls, path: Path) -> Raw:
        return cls(await anyio.connect_unix(path))

    async def send(self, *messages: dict[str, Any]) -> None:
        """Send ``messages`` in one write (back to back, without waiting)."""
        await self.stream.send(b"".join(frame(m) for m in messages))

    async def hello(self) -> dict[str, Any]:
        await self.send({"t": "hello", "v": 2})
        welcome = await self.next()
        assert welcome["t"] == "welcome", welcome
        return welcome

    async def next(self, timeout: float = 30.0, waiting_for: str = "a frame") -> dict[str, Any]:
        """The next frame; fails if the server closes first or none comes in time."""
        with anyio.fail_after(timeout, reason=f"waited {timeout:g}s for {waiting_for}"):
            while True:
                got = self.decoder.next_frame()
                if isinstance(got, dict):
                    return got
                assert not isinstance(got, Sentinel) or got is NEED_DATA, "the server closed"
                try:
                    data = await self.stream.receive(1 << 20)
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    data = b""
                self.received += len(data)
                self.decoder.feed(data)

    async def answers(self, count: int) -> dict[int, dict[str, Any]]:
        """The next ``count`` final answers (``item`` frames are skipped), by request id."""
        found: dict[int, dict[str, Any]] = {}
        while len(found) < count:
            got = await self.next()
            if got["t"] != "item":
                found[got["i"]] = got
        return found

    async def aclose(self) -> None:
        await self.stream.aclose()


@contextmanager
def never_reading(path: Path, payload: bytes) -> Iterator[None]:
    """A client that says hello, sends ``payload`` and never reads again: a
    thread on a blocking socket (its send blocks once the server stops
    reading). Leaving shuts the socket, which ends the send.

    (Not an anyio stream whose blocked send is cancelled: on asyncio, a UNIX
    stream's writability callback can then set its cancelled future and
    raise InvalidStateError in the loop, anyio issue #1267's kind.)
    """
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)

    def send() -> None:
        with contextlib.suppress(OSError):  # (shut while sending)
            client.connect(str(path))
            client.sendall(frame({"t": "hello", "v": 2}))
            welcome = b""  # (read before anything larger than a hello may be sent)
            while len(welcome) < 4 or len(welcome) < 4 + int.from_bytes(welcome[:4], "big"):
                got = client.recv(4096)
                if not got:
                    return
                welcome += got
            client.sendall(payload)

    thread = threading.Thread(target=send, name="never-reading client", daemon=True)
    thread.start()
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            client.shutdown(socket.SHUT_RDWR)
        thread.join(timeout=30)
        client.close()


@dataclass(frozen=True)
class Up:
    socket: Path
    pid: int


@contextmanager
def snakepool_up(workdir: Path, env: dict[str, str], config: str) -> Iterator[Up]:
    """A real ``snakepool up`` with ``config`` (TOML), once it serves."""
    (workdir / "pools.toml").write_text(config)
    sock = workdir / "s.sock"
    command = [sys.executable, "-m", "snakepool.cli", "up", "--config", str(workdir / "pools.toml")]
    up = subprocess.Popen(
        [*command, "--socket", str(sock), "--no-live"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
    )
    try:
        deadline = time.monotonic() + 60
        assert up.stdout is not None
        for line in up.stdout:  # (blocks until snakepool up says where it serves)
            if b"serving" in line:
                break
            assert time.monotonic() < deadline, "snakepool up did not start"
        else:
            raise AssertionError(f"snakepool up exited with {up.wait()}")
        # (its later lines must not fill the pipe and block it)
        threading.Thread(target=up.stdout.read, daemon=True).start()
        yield Up(sock, up.pid)
    finally:
        if up.poll() is None:
            up.send_signal(signal.SIGTERM)
            try:
                up.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.kill(up.pid, signal.SIGKILL)
                up.wait()
