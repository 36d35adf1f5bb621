"""Adapters the integration tests run in real worker processes."""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

from snakepool import protocol as p
from snakepool.adapters import Adapter, CallContext, command
from snakepool.workers import _runtime

FAILURES = ("exit_code", "sigkill", "segfault", "exception", "garbage", "wrong_message")


class Boom(Exception):
    """What the 'exception' failure raises."""


class Unprintable(Exception):
    """An exception whose ``str()`` itself raises."""

    def __str__(self) -> str:
        raise RuntimeError("no str for you")


def fail(how: str) -> None:
    """Fail the way the crash matrix asks."""
    if how == "exit_code":
        sys.stderr.write("about to exit with code 7\n")
        sys.stderr.flush()
        os._exit(7)
    if how == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    if how == "segfault":
        ctypes.string_at(0)
    if how == "exception":
        raise Boom("the handler blew up")
    if how in ("garbage", "wrong_message"):
        worker = _runtime.current_worker()
        assert worker is not None and worker.writer is not None
        # Bytes that are no frame, or a well-formed frame only a host may send.
        frame = (
            b"\x00\x00\x00\x08NOTMSGPK"
            if how == "garbage"
            else p.Connection(p.Role.HOST).send(p.Call(1, "echo", {}))
        )
        if threading.get_ident() == worker.bridge._loop_thread:  # in setup(): on the loop
            worker.writer.write(frame)
            return
        done = threading.Event()

        def write() -> None:
            worker.writer.write(frame)  # type: ignore[union-attr]
            done.set()

        worker.loop.call_soon_threadsafe(write)
        done.wait(5)
        time.sleep(5)  # the host kills us for breaking the protocol
        return
    raise ValueError(f"unknown failure {how!r}")


class Holding(Adapter):
    """Calls that keep a worker busy until the test releases them.

    A test that needs a worker busy while it checks something must not rely
    on a timer (a nap): on a loaded machine the nap can end before the checks
    run. ``hold`` and ``hold_sync`` run until the file ``release`` exists (the
    test creates it when it is done), and fail after ``limit`` seconds so a
    forgotten release shows instead of hanging. Each has the shape of the
    timed call it stands in for (``nap``, ``doze``).
    """

    @command
    async def hold(
        self, release: str, limit: float = 60.0, started: str | None = None
    ) -> dict[str, float]:
        """``nap`` until released: an async handler (its task awaits). ``started``:
        a folder where it leaves a file once it runs (tests count them)."""
        start = time.monotonic()
        if started is not None:
            (Path(started) / f"{os.getpid()}-{id(asyncio.current_task())}").touch()
        path = Path(release)
        while not path.exists():
            if time.monotonic() - start > limit:
                raise TimeoutError(f"hold was not released within {limit:g}s ({release})")
            await asyncio.sleep(_HOLD_POLL)
        return {"start": start, "end": time.monotonic(), "pid": os.getpid()}

    @command
    def hold_sync(self, release: str, limit: float = 60.0) -> dict[str, float]:
        """``doze`` until released: a plain sync call that blocks its thread (like
        ``doze``, it does not see a cancellation: the host kills the worker)."""
        start = time.monotonic()
        path = Path(release)
        while not path.exists():
            if time.monotonic() - start > limit:
                raise TimeoutError(f"hold_sync was not released within {limit:g}s ({release})")
            time.sleep(_HOLD_POLL)
        return {"start": start, "end": time.monotonic(), "pid": os.getpid()}


_HOLD_POLL = 0.005  # how often a hold looks for its release file


class Basic(Holding):
    """Ordinary commands plus ways to misbehave."""

    def setup(self, config: dict[str, Any]) -> None:
        self.config = config
        if config.get("fail_setup"):
            fail(config["fail_setup"])

    def teardown(self) -> None:
        marker = self.config.get("teardown_marker")
        if marker:
            Path(marker, f"teardown-{os.getpid()}").write_text("bye")

    @command
    def add(self, a: int, b: int) -> int:
        """Add two numbers."""
        return a + b

    @command
    def pid(self) -> int:
        return os.getpid()

    @command
    def count(self, n: int) -> Iterator[int]:
        yield from range(n)

    @command
    def endless(self, ctx: CallContext) -> Iterator[int]:
        i = 0
        while not ctx.cancelled:
            yield i
            i += 1
            time.sleep(0.001)

    @command
    def fail(self, how: str) -> None:
        fail(how)

    @command
    def fail_in_stream(self, how: str, after: int = 2) -> Iterator[int]:
        yield from range(after)
        fail(how)

    @command
    def fail_once(self, marker: str) -> int:
        """Crash the first time (no marker file yet), succeed after."""
        path = Path(marker)
        if not path.exists():
            path.write_text("crashed once")
            os._exit(9)
        return os.getpid()

    @command
    def hang(self) -> None:
        """Ignore cancellation entirely."""
        time.sleep(3600)

    @command
    def cooperative(self, ctx: CallContext) -> str:
        while not ctx.wait_cancelled(0.01):
            pass
        return "stopped"

    @command
    async def nap(self, seconds: float) -> dict[str, float]:
        start = time.monotonic()
        await asyncio.sleep(seconds)
        return {"start": start, "end": time.monotonic(), "pid": os.getpid()}

    @command
    def raise_unprintable(self) -> None:
        raise Unprintable()

    @command
    def raise_long(self, length: int) -> None:
        raise ValueError("x" * length)

    @command
    def doze(self, seconds: float) -> dict[str, float]:
        """``nap`` as a sync handler (it blocks its thread)."""
        start = time.monotonic()
        time.sleep(seconds)
        return {"start": start, "end": time.monotonic(), "pid": os.getpid()}

    @command
    async def ticks(self, n: int) -> AsyncIterator[int]:
        for i in range(n):
            await asyncio.sleep(0)
            yield i

    @command
    def blob(self, size: int) -> bytes:
        return os.urandom(size)

    @command
    def echo(self, value: Any = None) -> Any:
        return value

    @command
    def digest(self, data: bytes) -> dict[str, Any]:
        import hashlib

        return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}

    @command
    def unserializable(self) -> Any:
        return {1, 2, 3}

    @command
    def noisy(self, text: str) -> str:
        print(text)  # must not corrupt the protocol
        os.write(1, f"raw-fd1:{text}\n".encode())
        return "quiet"

    @command
    def spawn_grandchild(self) -> int:
        import subprocess

        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
        return child.pid

    @command
    def log_something(self, ctx: CallContext, text: str) -> None:
        ctx.log.warning("from the worker: %s", text)


class Resilience(Basic):
    """Commands for health, recycling and orphan tests."""

    def setup(self, config: dict[str, Any]) -> None:
        super().setup(config)
        self.hoard: list[bytes] = []

    @command
    async def block_loop(self, seconds: float) -> None:
        """Block the worker's event loop (a bad async handler): pings go unanswered."""
        time.sleep(seconds)  # noqa: ASYNC251 - blocking the loop is the point

    @command
    def leak(self, mb: int) -> int:
        """Keep ``mb`` MiB alive in this worker."""
        chunk = bytearray(mb * 2**20)
        for i in range(0, len(chunk), 4096):
            chunk[i] = 1  # touch every page so it counts in RSS
        self.hoard.append(bytes(chunk))
        return os.getpid()

    @command
    def spawn_and_hang(self, pid_file: str) -> None:
        """Start a grandchild, note its pid, then hang ignoring cancellation."""
        import subprocess

        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
        Path(pid_file).write_text(str(child.pid))
        time.sleep(3600)

    @command
    def leak_and_wait(self, mb: int, seconds: float) -> int:
        """Grow past a memory limit, then stay busy."""
        pid = self.leak(mb)
        time.sleep(seconds)
        return pid


class DiesSoon(Adapter):
    """Starts fine, then dies 50 ms later: a crash loop."""

    def setup(self, config: dict[str, Any]) -> None:
        threading.Timer(0.05, lambda: os._exit(1)).start()

    @command
    def pid(self) -> int:
        return os.getpid()


class Stateful(Holding):
    """Session state, variables and host tools, as an adapter uses them."""

    @command
    def remember(self, key: str, value: Any, ctx: CallContext) -> int:
        ctx.session_state[key] = value
        ctx.save_state(key, value)  # survives this worker
        return os.getpid()

    @command
    def recall(self, key: str, ctx: CallContext) -> dict[str, Any]:
        return {
            "value": ctx.session_state.get(key),
            "restored_on": ctx.session_state.get("restored_on"),
            "pid": os.getpid(),
        }

    def restore_session(self, ctx: CallContext, state: dict[str, Any]) -> None:
        ctx.session_state.update(state)
        ctx.session_state["restored_on"] = os.getpid()

    @command
    def whoami(self, ctx: CallContext) -> dict[str, Any]:
        return {"pid": os.getpid(), "session": ctx.session_id}

    @command
    def var(self, name: str, ctx: CallContext) -> Any:
        return ctx.variables.get(name)

    @command
    def all_vars(self, ctx: CallContext) -> dict[str, Any]:
        return dict(ctx.variables)

    @command
    def use_tool(self, name: str, ctx: CallContext, args: dict[str, Any] | None = None) -> Any:
        return ctx.call_host(name, args or {})

    @command
    async def ause_tool(
        self, name: str, ctx: CallContext, args: dict[str, Any] | None = None
    ) -> Any:
        return await ctx.acall_host(name, args or {})

    @command
    async def nap(self, seconds: float) -> int:
        await asyncio.sleep(seconds)
        return os.getpid()

    @command
    def die(self) -> None:
        os._exit(3)

    @command
    def count_to(self, n: int) -> Iterator[int]:
        yield from range(n)

    @command
    def echo(self, value: Any = None) -> Any:
        return value


class Kwargs(Adapter):
    @command
    def collect(self, first: int, ctx: CallContext, **rest: Any) -> dict[str, Any]:
        return {"first": first, "rest": rest, "session": ctx.session_id}
