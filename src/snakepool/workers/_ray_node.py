"""The node side of a Ray-backed worker: an actor that runs one worker subprocess.

The host's :class:`~snakepool.pool._ray.RayPipes` makes this class a Ray
actor (an async actor; Ray itself is imported only on the node, in
:meth:`WorkerNode.start`). The actor starts ``python -m snakepool.workers``
on its node, the same runtime a local pool runs, on pipes, and relays bytes
in batches. ``write`` feeds what the host sent to the worker's stdin and
returns what the worker wrote by then, waiting up to ``_WRITE_WAIT`` for
it: a quick call's answer rides back on the reply to the write that carried
it (one Ray round trip per call, like calling an actor directly). ``read``
(a long poll, always one in flight) returns what no write is waiting for.
Each batch of output is numbered, so the host reads it in order whichever
call brought it. So a hung handler is still killed (``signal``: the actor signals its
worker's process group), a crash still reports its exit code and stderr,
and ``print()`` goes to stderr, never into the protocol, exactly as locally.
The worker dies with its actor (``PR_SET_PDEATHSIG``: the actor is its
parent and ``SNAKEPOOL_HOST_PID`` names it).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["NodeOutput", "WorkerNode"]

_STDOUT_AFTER_EXIT = 1.0  # a child may hold the worker's stdout open: its exit decides then
_RSS_EVERY = 1.0  # seconds between memory readings (a walk of /proc: not once per read)
#: How long a write waits for the worker's output before it returns without
#: any (the long poll brings it then): longer than a quick call takes, so its
#: answer comes back with the write; short, so a write's reply is never long
#: held (a write waiting costs the actor only a parked coroutine).
_WRITE_WAIT = 0.05

#: What ``write`` and ``read`` return: (batch number or None when there is
#: nothing, stdout bytes, stderr bytes, exit code or None, rss bytes or None).
#: Batches are numbered 0, 1, 2, ... in the order the worker wrote them.
NodeOutput = tuple[int | None, bytes, bytes, int | None, int | None]


class WorkerNode:
    """One worker subprocess on this node, its pipes relayed to the host in batches."""

    def __init__(self) -> None:
        self._process: asyncio.subprocess.Process | None = None
        self._stdout = bytearray()
        self._stderr = bytearray()
        self._exit_code: int | None = None
        self._exit_sent = False
        self._batches = 0  # batches of output handed out so far
        #: Who waits for output: writes first (their replies go back anyway),
        #: the long poll only when no write waits.
        self._writes_waiting: collections.deque[asyncio.Future[None]] = collections.deque()
        self._reads_waiting: collections.deque[asyncio.Future[None]] = collections.deque()
        self._next_write = 0  # the sequence number of the write that goes next
        self._early: dict[int, tuple[bytes, bool]] = {}  # writes that overtook one
        self._stdin: asyncio.WriteTransport | None = None
        self._watcher: asyncio.Future[None] | None = None
        self._rss_at = 0.0
        self._last_rss: int | None = None

    async def start(
        self, argv: Sequence[str | None], env: Mapping[str, str], cwd: str | None
    ) -> dict[str, Any]:
        """Start the worker (``argv[0]`` None: this node's interpreter); where it runs."""
        import ray  # (on the node: the actor runs in a Ray worker process)

        full_env = {**os.environ, **env, "SNAKEPOOL_HOST_PID": str(os.getpid())}
        command = [sys.executable if argv[0] is None else argv[0], *map(str, argv[1:])]
        # Pipes, as a local pool's workers have (asyncio's own PIPE is a socketpair
        # for stdin, which is not what the worker runtime expects).
        child_in, to_worker = os.pipe()
        from_worker, child_out = os.pipe()
        from_stderr, child_err = os.pipe()
        try:
            self._process = await asyncio.create_subprocess_exec(
                *command,
                stdin=child_in,
                stdout=child_out,
                stderr=child_err,
                env=full_env,
                cwd=cwd if cwd is not None and os.path.isdir(cwd) else None,
                start_new_session=True,  # its own process group, signalled as one
            )
        finally:
            for fd in (child_in, child_out, child_err):
                os.close(fd)
        loop = asyncio.get_running_loop()
        stdout_done, stderr_done = loop.create_future(), loop.create_future()
        await loop.connect_read_pipe(
            lambda: _Collect(self._stdout, self._wake, stdout_done),
            os.fdopen(from_worker, "rb", buffering=0),
        )
        await loop.connect_read_pipe(
            lambda: _Collect(self._stderr, self._wake, stderr_done),
            os.fdopen(from_stderr, "rb", buffering=0),
        )
        self._stdin, _ = await loop.connect_write_pipe(
            asyncio.Protocol, os.fdopen(to_worker, "wb", buffering=0)
        )
        self._watcher = asyncio.ensure_future(self._watch(stdout_done, stderr_done))
        process = self._process
        context = ray.get_runtime_context()
        return {
            "pid": process.pid,
            "actor_id": context.get_actor_id(),
            "node_id": context.get_node_id(),
            "node_ip": ray.util.get_node_ip_address(),  # type: ignore[no-untyped-call,unused-ignore]
            "gpu_ids": [str(gpu) for gpu in context.get_accelerator_ids().get("GPU", [])],
        }

    async def _watch(self, *pipes: asyncio.Future[None]) -> None:
        assert self._process is not None
        code = await self._process.wait()
        await asyncio.wait(pipes, timeout=_STDOUT_AFTER_EXIT)  # what it wrote before
        self._exit_code = code
        for waiting in (*self._writes_waiting, *self._reads_waiting):
            _settle(waiting)

    def _wake(self) -> None:
        """Output arrived: wake one waiter (a write if one waits)."""
        waiters = self._writes_waiting or self._reads_waiting
        while waiters:
            waiting = waiters.popleft()
            if not waiting.done():
                waiting.set_result(None)
                return

    async def write(self, seq: int, data: bytes, close: bool = False) -> NodeOutput:
        """Frames for the worker, in the host's order (``seq``: Ray does not
        promise an async actor's calls run in the order they were sent);
        ``close``: then end its stdin. Returns the worker's output, waiting up
        to ``_WRITE_WAIT`` for some."""
        self._early[seq] = (data, close)
        while self._next_write in self._early:
            chunk, closing = self._early.pop(self._next_write)
            self._next_write += 1
            stdin = self._stdin
            if stdin is None or stdin.is_closing():
                continue
            with contextlib.suppress(OSError, ConnectionError, RuntimeError):
                if chunk:
                    stdin.write(chunk)
                if closing:
                    stdin.close()
        if not self._pending_output():
            await self._wait(self._writes_waiting, _WRITE_WAIT)
        return self._take()

    async def read(self) -> NodeOutput:
        """The long poll: wait for output no write took, then return all there is."""
        while not self._pending_output():
            await self._wait(self._reads_waiting, None)
        return self._take()

    def _pending_output(self) -> bool:
        return bool(self._stdout or self._stderr) or (
            self._exit_code is not None and not self._exit_sent
        )

    async def _wait(
        self, queue: collections.deque[asyncio.Future[None]], timeout: float | None
    ) -> None:
        """Wait in ``queue`` until woken (output arrived, or the worker exited) or ``timeout``."""
        loop = asyncio.get_running_loop()
        waiting: asyncio.Future[None] = loop.create_future()
        queue.append(waiting)
        timer = None if timeout is None else loop.call_later(timeout, _settle, waiting)
        try:
            await waiting
        finally:
            if timer is not None:
                timer.cancel()
            with contextlib.suppress(ValueError):
                queue.remove(waiting)

    def _take(self) -> NodeOutput:
        """All the output there is, as the next numbered batch (None: none)."""
        if not self._pending_output():
            return None, b"", b"", self._exit_code, self._rss()
        out, err = bytes(self._stdout), bytes(self._stderr)
        self._stdout.clear()  # (in place: the pipes' protocols append to these)
        self._stderr.clear()
        number = self._batches
        self._batches += 1
        if self._exit_code is not None:
            self._exit_sent = True
        return number, out, err, self._exit_code, self._rss()

    async def signal(self, sig: int) -> None:
        """Signal the worker's process group (not once it exited: its id may be reused)."""
        process = self._process
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, sig)

    def _rss(self) -> int | None:
        process = self._process
        if process is None or process.returncode is not None:
            return None
        now = time.monotonic()
        if now - self._rss_at < _RSS_EVERY:
            return self._last_rss
        self._rss_at = now
        self._last_rss = self._read_rss(process.pid)
        return self._last_rss

    @staticmethod
    def _read_rss(pid: int) -> int | None:
        import psutil

        try:
            root = psutil.Process(pid)
            total = int(root.memory_info().rss)
            for child in root.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    total += int(child.memory_info().rss)
            return total
        except psutil.Error:
            return None

    def __del__(self) -> None:  # (the actor is going: its worker goes too)
        process = getattr(self, "_process", None)
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)


def _settle(waiting: asyncio.Future[None]) -> None:
    if not waiting.done():
        waiting.set_result(None)


class _Collect(asyncio.Protocol):
    """One of the worker's output pipes, gathered for the next ``read``."""

    def __init__(
        self, into: bytearray, wake: Callable[[], None], done: asyncio.Future[None]
    ) -> None:
        self.into = into
        self.wake = wake
        self.done = done

    def data_received(self, data: bytes) -> None:
        self.into += data
        self.wake()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)
