"""Local pipes: the transport of a worker that is a process on this machine.

The worker is spawned by the host (``anyio.open_process``) or forked by the
pool's template (:class:`~._template.WorkerTemplate`, a ``ForkedProcess``);
either way frames go down its stdin pipe, answers come up its stdout pipe and
its stderr carries its output (``print()``, logging, tracebacks). It leads
its own process group, signalled as one.

Two implementations of the same :class:`~._transport.Transport`:

- :class:`CallbackPipes` (asyncio, uvloop too): the pipes are served by
  asyncio protocol callbacks, with no task or stream object in between;
- :class:`StreamPipes` (other backends: trio): anyio's process streams and a
  task per pipe.

The special case is worth it: with :class:`StreamPipes` on asyncio as well,
``stress/ab.py`` measured the CPU per plain call (host and workers, 64
callers) at +45% (median of 5 alternating rounds, every round +26% to +84%),
calls/s at -46% and the sequential p50 at 3.3 times as long.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import fcntl
import math
import os
import signal
import subprocess
from collections.abc import AsyncIterator

import anyio
import anyio.abc
import psutil

from ._backend import running_on_asyncio
from ._launch import WorkerLaunch
from ._lines import LineSplitter
from ._template import ForkedProcess, TemplateUnavailable, WorkerTemplate
from ._transport import Receiver, Transport

__all__ = ["CallbackPipes", "StreamPipes", "local_pipes", "spawn"]

_READ_CHUNK = 256 * 1024
_STDERR_SETTLE = 1.0  # seconds to let stderr finish after the worker died
_STDOUT_AFTER_EXIT = 1.0  # a worker that exited while a child holds its stdout: then EOF is ours
#: Protocol pipes get this much kernel buffer (Linux; the default is 64 KiB):
#: a 1 MiB frame then crosses in one write instead of sixteen hand-offs.
_PIPE_BYTES = 1 << 20
#: Reads of small answers take up to this much. Not asyncio's 256 KiB: a
#: buffer over glibc's 128 KiB mmap threshold can be mapped and unmapped on
#: every read (until glibc raises its threshold), about 15 us each on this
#: kind of machine, more than a call costs.
_SMALL_READ = 64 * 1024


def local_pipes(receiver: Receiver, template: WorkerTemplate | None) -> Transport:
    """The local transport for this event loop (forking from ``template`` where it can)."""
    if running_on_asyncio():
        return CallbackPipes(receiver, template)
    return StreamPipes(receiver)  # (a template runs on asyncio only)


async def spawn(launch: WorkerLaunch, stdin: int, stdout: int, stderr: int) -> anyio.abc.Process:
    """A fresh interpreter for the worker (not forked from a template)."""
    return await anyio.open_process(
        list(launch.argv),
        stdin=stdin,
        stdout=stdout,
        stderr=stderr,
        env=launch.env,
        cwd=launch.cwd,
        start_new_session=True,  # its own process group, killed as one
    )


class _LocalProcess(Transport):
    """What both pipe transports share: the process, its group, its memory."""

    def __init__(self, receiver: Receiver) -> None:
        self._receiver = receiver
        self._process: anyio.abc.Process | ForkedProcess | None = None
        self._psutil: psutil.Process | None = None
        self._stderr_done = anyio.Event()

    def _started(self, process: anyio.abc.Process | ForkedProcess) -> None:
        self._process = process
        self.pid = process.pid
        with contextlib.suppress(psutil.Error):
            self._psutil = psutil.Process(process.pid)

    def signal(self, sig: signal.Signals) -> None:
        if self.pid is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)  # pid == pgid: the worker leads its own group

    async def wait(self) -> int:
        assert self._process is not None
        return await self._process.wait()

    def rss_bytes(self) -> int | None:
        if self._psutil is None:
            return None
        try:
            total = int(self._psutil.memory_info().rss)
            for child in self._psutil.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    total += int(child.memory_info().rss)
            return total
        except psutil.Error:
            return None

    async def receive(self) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._watch_exit)
            await self._read_stdout()
            tg.cancel_scope.cancel()

    async def _watch_exit(self) -> None:
        """End the stdout reader once the process has exited, EOF or not.

        A handler's child may hold the worker's stdout open (one forked at C
        level, which Python's at-fork hook that closes the pipes never sees):
        the pipe then never reaches EOF, and the worker's death is seen from
        the process itself. What it wrote before it exited is read first.
        (Cancelled as soon as the reader ends.)
        """
        await self.wait()
        await anyio.sleep(_STDOUT_AFTER_EXIT)
        receiver = self._receiver
        receiver.log.warning(
            "%s exited but its stdout is still open (held by a child)", receiver.describe()
        )
        await self._end_stdout()

    @abc.abstractmethod
    async def _read_stdout(self) -> None:
        """Feed the receiver until it says the stream is over."""

    @abc.abstractmethod
    async def _end_stdout(self) -> None:
        """Make the stdout reader see EOF."""

    async def _settle(self) -> None:
        """Let stderr finish (its last lines: a traceback), briefly."""
        with anyio.move_on_after(_STDERR_SETTLE):
            await self._stderr_done.wait()


class CallbackPipes(_LocalProcess):
    """asyncio: the worker's pipes are ours, served by callbacks.

    Frames go straight into the stdin pipe's transport (buffered, never
    blocking) and replies are decoded in ``data_received``: no pump task and
    no stream object in between, which saves event-loop turns per call (see
    the module's docstring for what that is worth). The worker is forked
    from the pool's template when it has one, else spawned.
    """

    def __init__(self, receiver: Receiver, template: WorkerTemplate | None) -> None:
        super().__init__(receiver)
        self._template = template  # fork from it, if it is alive
        self._stdin: asyncio.WriteTransport | None = None
        self._reader: _StdoutReader | None = None
        self._stdout_transport: asyncio.BaseTransport | None = None
        self._stderr_transport: asyncio.BaseTransport | None = None
        self._unsent: list[bytes] = []  # frames of this event-loop turn, written at its end

    @contextlib.asynccontextmanager
    async def open(self, launch: WorkerLaunch) -> AsyncIterator[None]:
        with anyio.CancelScope(shield=True):  # a half-spawned process would be an orphan
            self._started(await self._open_pipes(launch))
        try:
            yield
        finally:
            with anyio.CancelScope(shield=True):
                await self._settle()
                if self._process is not None:
                    with contextlib.suppress(Exception):
                        await self._process.aclose()
                for transport in (self._stderr_transport, self._stdout_transport, self._stdin):
                    if transport is not None:
                        transport.close()

    async def _open_pipes(self, launch: WorkerLaunch) -> anyio.abc.Process | ForkedProcess:
        loop = asyncio.get_running_loop()
        child_stdin, to_worker = os.pipe()  # os.pipe fds are not inherited (PEP 446)
        from_worker, child_stdout = os.pipe()
        from_stderr, child_stderr = os.pipe()
        for fd in (to_worker, from_worker):
            _enlarge_pipe(fd)
        ours = [to_worker, from_worker, from_stderr]
        try:
            try:
                process = await self._start_process(launch, child_stdin, child_stdout, child_stderr)
            finally:
                for fd in (child_stdin, child_stdout, child_stderr):
                    os.close(fd)
            receiver = self._receiver
            reader = self._reader = _StdoutReader(receiver)
            self._stdout_transport, _ = await loop.connect_read_pipe(
                lambda: reader, os.fdopen(from_worker, "rb", buffering=0)
            )
            ours.remove(from_worker)
            self._stderr_transport, _ = await loop.connect_read_pipe(
                lambda: _StderrReader(receiver, self._stderr_done),
                os.fdopen(from_stderr, "rb", buffering=0),
            )
            ours.remove(from_stderr)
            transport, _ = await loop.connect_write_pipe(
                asyncio.Protocol, os.fdopen(to_worker, "wb", buffering=0)
            )
            ours.remove(to_worker)
            # (no isinstance check: uvloop's pipe transports do not subclass asyncio's)
            self._stdin = transport
            return process
        finally:
            for fd in ours:
                os.close(fd)

    async def _start_process(
        self, launch: WorkerLaunch, stdin: int, stdout: int, stderr: int
    ) -> anyio.abc.Process | ForkedProcess:
        template = self._template
        if template is not None and template.alive:
            try:
                if template.warm:
                    return await template.spawn(launch.env, stdin, stdout, stderr)
                return await template.spawn(
                    launch.env, stdin, stdout, stderr, argv=launch.argv, cwd=launch.cwd
                )
            except TemplateUnavailable as exc:
                self._receiver.log.warning(
                    "the pool's template cannot fork (%s): spawning instead", exc
                )
        return await spawn(launch, stdin, stdout, stderr)

    def write(self, frame: bytes, batch: bool = False) -> None:
        """On top of ``Transport.write``: frames that are not ``batch`` are
        written at once, after any collected ones. A pipe write that wakes the
        worker costs more than the call itself, so 64 callers must not make
        64 of them: ``batch`` frames go out in one write at the end of the turn.
        """
        stdin = self._stdin
        if stdin is None:  # (not started: the handle writes nothing before open)
            return
        unsent = self._unsent
        if batch or unsent:
            unsent.append(frame)
            if len(unsent) == 1:
                asyncio.get_running_loop().call_soon(self._flush)
        elif not stdin.is_closing():
            try:  # noqa: SIM105 (not contextlib.suppress: this runs once per call)
                stdin.write(frame)
            except (RuntimeError, ConnectionError):  # the worker is gone: its reaper reports
                pass

    def _flush(self) -> None:
        """Write the frames of this turn (into the pipe transport's buffer)."""
        stdin, unsent = self._stdin, self._unsent
        if not unsent or stdin is None:
            return
        self._unsent = []
        if stdin.is_closing():
            return
        with contextlib.suppress(RuntimeError, ConnectionError):
            stdin.write(unsent[0] if len(unsent) == 1 else b"".join(unsent))

    def close_stdin(self) -> None:
        if self._stdin is not None:
            self._flush()
            with contextlib.suppress(RuntimeError, ConnectionError):
                self._stdin.close()  # flushes what is buffered, then EOF

    async def _read_stdout(self) -> None:
        assert self._reader is not None
        try:
            await self._reader.ended  # data_received does the work
        finally:
            if self._stdout_transport is not None:
                self._stdout_transport.close()

    async def _end_stdout(self) -> None:
        if self._reader is not None:
            self._reader.eof_received()


class StreamPipes(_LocalProcess):
    """Other backends (trio): anyio's process streams, a task per pipe.

    Frames queue in an unbounded memory stream; the stdin task writes what
    queued up meanwhile in one write.
    """

    def __init__(self, receiver: Receiver) -> None:
        super().__init__(receiver)
        self._outbox_in, self._outbox_out = anyio.create_memory_object_stream[bytes | None](
            math.inf
        )
        self._stdout: anyio.abc.ByteReceiveStream | None = None

    @contextlib.asynccontextmanager
    async def open(self, launch: WorkerLaunch) -> AsyncIterator[None]:
        pipe = subprocess.PIPE
        with anyio.CancelScope(shield=True):  # a half-spawned process would be an orphan
            process = await spawn(launch, pipe, pipe, pipe)
        self._started(process)
        assert process.stdin is not None and process.stdout is not None
        assert process.stderr is not None
        self._stdout = process.stdout
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._pump_stdin, process.stdin)
                tg.start_soon(self._pump_stderr, process.stderr)
                try:
                    yield
                finally:
                    with anyio.CancelScope(shield=True):
                        await self._settle()
                    tg.cancel_scope.cancel()
        finally:
            self._outbox_in.close()
            with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                await process.aclose()

    def write(self, frame: bytes, batch: bool = False) -> None:
        with contextlib.suppress(anyio.ClosedResourceError, anyio.BrokenResourceError):
            self._outbox_in.send_nowait(frame)

    def close_stdin(self) -> None:
        with contextlib.suppress(anyio.ClosedResourceError, anyio.BrokenResourceError):
            self._outbox_in.send_nowait(None)

    async def _pump_stdin(self, stdin: anyio.abc.ByteSendStream) -> None:
        try:
            async for frame in self._outbox_out:
                if frame is None:
                    break
                batch = [frame]
                while True:  # coalesce what queued up meanwhile into one write
                    try:
                        more = self._outbox_out.receive_nowait()
                    except anyio.WouldBlock:
                        break
                    if more is None:
                        await stdin.send(b"".join(batch))
                        await stdin.aclose()
                        return
                    batch.append(more)
                await stdin.send(batch[0] if len(batch) == 1 else b"".join(batch))
            await stdin.aclose()
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass  # the worker is gone; the reader reports it

    async def _pump_stderr(self, stderr: anyio.abc.ByteReceiveStream) -> None:
        lines = LineSplitter(self._receiver.stderr_line)
        try:
            async for chunk in stderr:
                lines.feed(chunk)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass
        finally:
            lines.close()
            self._stderr_done.set()

    async def _read_stdout(self) -> None:
        stdout = self._stdout
        assert stdout is not None
        feed = self._receiver.feed_stdout
        ended = False
        while not ended:
            try:
                data = await stdout.receive(_READ_CHUNK)
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                data = b""
            ended = feed(data)

    async def _end_stdout(self) -> None:
        if self._stdout is not None:
            await self._stdout.aclose()  # the reader reads EOF


def _enlarge_pipe(fd: int) -> None:
    """Best effort: the limit is /proc/sys/fs/pipe-max-size (1 MiB by default)."""
    set_size = getattr(fcntl, "F_SETPIPE_SZ", None)
    if set_size is not None:
        with contextlib.suppress(OSError):
            fcntl.fcntl(fd, set_size, _PIPE_BYTES)


class _StdoutReader(asyncio.Protocol):
    """asyncio: decodes the worker's stdout as it arrives (no task in between)."""

    def __init__(self, receiver: Receiver) -> None:
        self.receiver = receiver
        self.feed = receiver.feed_stdout
        self.ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.BaseTransport | None = None
        self._large_reads = False  # max_size was raised for a large frame

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        if hasattr(transport, "max_size"):  # (asyncio's pipe transport; uvloop has none)
            transport.max_size = _SMALL_READ

    def data_received(self, data: bytes) -> None:
        if self.ended.done():
            return
        if self.feed(data):
            self._end()
            return
        if self._large_reads or len(data) >= _SMALL_READ:  # (a full read: maybe a large frame)
            self._adapt_read_size()

    def _adapt_read_size(self) -> None:
        """asyncio reads up to max_size bytes (a fresh bytes object each time):
        large while a large frame is arriving, small otherwise, since a 1 MiB
        allocation per read costs more than a small call. (Checked only after
        a large read, or while reads are large: small replies skip it.)
        """
        size = min(max(self.receiver.missing_bytes, _SMALL_READ), _PIPE_BYTES)
        self._large_reads = size > _SMALL_READ
        if getattr(self.transport, "max_size", size) != size:
            self.transport.max_size = size  # type: ignore[union-attr]

    def eof_received(self) -> bool:
        if not self.ended.done():
            self.feed(b"")
            self._end()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._end()

    def _end(self) -> None:
        if not self.ended.done():
            self.ended.set_result(None)


class _StderrReader(asyncio.Protocol):
    """asyncio: the worker's stderr, line by line, to the receiver."""

    def __init__(self, receiver: Receiver, done: anyio.Event) -> None:
        self.lines = LineSplitter(receiver.stderr_line)
        self.done = done

    def data_received(self, data: bytes) -> None:
        self.lines.feed(data)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lines.close()
        self.done.set()
