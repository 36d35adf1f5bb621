"""Host side of the worker template (fork server) behind ``Pool(preload=[...])``.

:class:`WorkerTemplate` starts ``python -m snakepool.workers --template``
(see :mod:`snakepool.workers._template` for the process and its control
protocol), has it import the ``preload`` modules once, then asks it to fork
each worker: a worker with a heavy adapter is ready in milliseconds instead
of paying its imports again.

Where forking is not possible or not safe, :meth:`WorkerTemplate.start`
raises :class:`TemplateUnavailable` saying why (not Linux, not the asyncio
backend, an import started threads, ...) and the pool spawns workers the
plain way. A preload module that fails to import raises
:class:`TemplateStartError`.

Forked workers are grandchildren of the host: their exits come as notices
from the template (:meth:`ForkedProcess.wait`). If the template dies, every
worker dies with it (``PR_SET_PDEATHSIG``; the host also SIGKILLs their
process groups) and reports ``-9``.

The template is also the *keeper* of what workers start (a subreaper: see
the worker side), so a pool that spawns fresh interpreters
(``start_method="spawn"``, GPU pools, or where forking warm is unsafe) has
one too: it imports nothing for the workers and execs each one
(:meth:`WorkerTemplate.spawn` with ``argv``; ``warm`` is False).

Caveat: environment variables that libraries read *at import time* are the
template's (``env`` given to :meth:`WorkerTemplate.start`), not each worker's.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import anyio
import anyio.abc

from .. import protocol as p
from ..errors import TemplateStartError as TemplateStartError
from ..errors import TemplateUnavailable as TemplateUnavailable
from ._backend import running_on_asyncio
from ._lines import LineSplitter

__all__ = ["ForkedProcess", "TemplateStartError", "TemplateUnavailable", "WorkerTemplate"]

_log = logging.getLogger("snakepool.template")

_STDERR_TAIL_LINES = 20
_EXIT_GRACE = 5.0  # seconds the template gets to kill and reap its workers at close
_ORPHAN_GRACE = 2.0  # seconds orphaned workers get to vanish after the template died
_RECV_BYTES = 1 << 16


class ForkedProcess:
    """A worker forked by the template: a child of the template, not of us."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None  # None while running; < 0: killed by that signal
        self._exited = anyio.Event()

    def __repr__(self) -> str:
        return f"<ForkedProcess pid={self.pid} returncode={self.returncode}>"

    async def wait(self) -> int:
        """The exit code, once the template reported it (``-9`` if the template died)."""
        await self._exited.wait()
        assert self.returncode is not None
        return self.returncode

    def kill(self) -> None:
        """SIGKILL the worker's process group (it leads its own; its children die too)."""
        if self.returncode is not None:  # its pid (and group id) may belong to another now
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)

    async def aclose(self) -> None:
        """Nothing to release: the template reaps the process."""

    def _set_exited(self, code: int) -> None:
        if self.returncode is None:
            self.returncode = code
            self._exited.set()


@dataclass
class _PendingSpawn:
    done: anyio.Event = field(default_factory=anyio.Event)
    process: ForkedProcess | None = None
    error: str | None = None
    abandoned: bool = False  # the caller was cancelled: kill whatever gets forked


class WorkerTemplate:
    """A running template process and the workers it forked."""

    def __init__(self, process: anyio.abc.Process, control: socket.socket) -> None:
        self._process = process
        self._control = control
        self.pid: int = process.pid
        self.modules: list[str] = []
        self.import_seconds: float = 0.0
        self.warm = True  # workers fork from it; False: it execs them (a keeper only)
        self._conn = p.TemplateConnection(p.Role.HOST)
        self._send_lock = anyio.Lock()
        self._ids = itertools.count(1)
        self._pending: dict[int, _PendingSpawn] = {}
        self._children: dict[int, ForkedProcess] = {}
        self._init_reply: p.Ready | p.Unsafe | p.ImportFailed | None = None
        self._init_done = anyio.Event()
        self._importing: str | None = None
        self._stderr_tail: collections.deque[str] = collections.deque(maxlen=_STDERR_TAIL_LINES)
        self._dead_reason: str | None = None
        self._reader_done = anyio.Event()
        self._reader: asyncio.Task[None] | None = None
        self._closing = False
        self._closed = anyio.Event()

    def __repr__(self) -> str:
        return f"<WorkerTemplate pid={self.pid} modules={self.modules} alive={self.alive}>"

    # --- start -------------------------------------------------------------------------

    @classmethod
    async def start(
        cls,
        *,
        python: str,
        env: Mapping[str, str],
        cwd: str | None,
        preload: Sequence[str],
        sys_path: Sequence[str],
        timeout: float,
    ) -> WorkerTemplate:
        """Start a template and have it import ``preload``.

        Raises :class:`TemplateUnavailable` (fall back to plain spawning) or
        :class:`TemplateStartError` (a preload import failed); the template
        process is gone by then.
        """
        _check_platform()
        template = await cls._launch(python, env, cwd)
        try:
            with anyio.fail_after(timeout):
                reply = await template._initialise(preload, sys_path, cwd)
        except TimeoutError:
            await template._abort()
            where = f" (importing {template._importing})" if template._importing else ""
            raise TemplateUnavailable(
                f"the template did not get ready within {timeout}s{where}"
            ) from None
        except BaseException:
            await template._abort()
            raise
        if not isinstance(reply, p.Ready):
            await template._abort()
            raise template._init_error(reply)
        template.modules = [str(m) for m in reply.modules]
        template.import_seconds = float(reply.import_seconds)
        return template

    @classmethod
    async def _launch(cls, python: str, env: Mapping[str, str], cwd: str | None) -> WorkerTemplate:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with anyio.CancelScope(shield=True):  # a half-started template would be an orphan
                process = await anyio.open_process(
                    [python, "-m", "snakepool.workers", "--template"],
                    stdin=theirs.fileno(),
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    env={**env, "SNAKEPOOL_HOST_PID": str(os.getpid())},
                    cwd=cwd,
                    start_new_session=True,
                )
        except OSError as exc:
            ours.close()
            raise TemplateUnavailable(f"cannot start the template with {python!r}: {exc}") from exc
        finally:
            theirs.close()
        ours.setblocking(False)
        template = cls(process, ours)
        template._reader = asyncio.get_running_loop().create_task(template._read_all())
        return template

    async def _initialise(
        self, preload: Sequence[str], sys_path: Sequence[str], cwd: str | None
    ) -> p.Ready | p.Unsafe | p.ImportFailed | None:
        """The template's answer to init (None: it died before answering)."""
        init = p.TemplateInit(preload=list(preload), sys_path=list(sys_path), cwd=cwd)
        await self._send(self._conn.send(init), fds=())
        await self._init_done.wait()
        return self._init_reply

    def _init_error(self, reply: p.Unsafe | p.ImportFailed | None) -> Exception:
        if isinstance(reply, p.Unsafe):
            return TemplateUnavailable(reply.reason)
        if isinstance(reply, p.ImportFailed):
            return TemplateStartError(
                f"preload module {reply.module!r} failed to import: {reply.type}: {reply.message}",
                module=reply.module,
                traceback=reply.traceback,
            )
        reason = self._dead_reason or "it exited"
        if self._importing is not None:
            return TemplateStartError(
                f"the template died while importing {self._importing!r} ({reason})"
                + self._stderr_note(),
                module=self._importing,
            )
        return TemplateUnavailable(f"the template died before it was ready ({reason})")

    # --- state -------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        return self._dead_reason is None and not self._closing

    def _stderr_note(self) -> str:
        if not self._stderr_tail:
            return ""
        return "; its stderr ended with:\n" + "\n".join(self._stderr_tail)

    # --- spawning ----------------------------------------------------------------------

    async def spawn(
        self,
        env: Mapping[str, str],
        stdin: int,
        stdout: int,
        stderr: int,
        *,
        argv: Sequence[str] | None = None,
        cwd: str | None = None,
    ) -> ForkedProcess:
        """Fork a worker with these fds as its 0/1/2 (the child ends; close yours after).

        With ``argv`` the child execs it in ``cwd`` (a fresh interpreter),
        else it becomes a worker with what the template imported.
        """
        if not self.alive:
            raise TemplateUnavailable(f"the template is gone ({self._dead_reason or 'closed'})")
        spawn_id = next(self._ids)
        pending = self._pending[spawn_id] = _PendingSpawn()
        request = p.Spawn(id=spawn_id, env=dict(env))
        if argv is not None:
            request.argv, request.cwd = list(argv), cwd
        frame = self._conn.send(request)
        try:
            # Shielded: a frame cut off half-way would garble every later one.
            with anyio.CancelScope(shield=True):
                await self._send(frame, fds=(stdin, stdout, stderr))
        except BaseException:
            self._pending.pop(spawn_id, None)
            raise
        try:
            await pending.done.wait()
        except BaseException:
            # Cancelled after the request went out: whatever the template forks
            # for it is killed on arrival (see _on_spawned).
            pending.abandoned = True
            if pending.process is not None:
                pending.process.kill()
            raise
        if pending.process is None:
            raise TemplateUnavailable(pending.error or "the template did not fork")
        return pending.process

    async def _send(self, frame: bytes, fds: Sequence[int]) -> None:
        """Write one frame; the fds ride on its first byte (one sendmsg)."""
        async with self._send_lock:
            view = memoryview(frame)
            while view:
                try:
                    if fds:
                        sent = socket.send_fds(self._control, [view], list(fds))
                        fds = ()  # delivered with the first chunk
                    else:
                        sent = self._control.send(view)
                except BlockingIOError:
                    await anyio.wait_socket_writable(self._control)
                    continue
                except OSError as exc:
                    raise TemplateUnavailable(f"the template is gone ({exc})") from exc
                view = view[sent:]

    # --- reading the template ----------------------------------------------------------

    async def _read_all(self) -> None:
        """The reader task: control messages and stderr until the template ends."""
        try:
            stderr_done = anyio.Event()
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._pump_stderr, stderr_done)
                await self._read_control()
                reason = await self._wait_exit()
                # Its last words, unless something it started still holds the pipe.
                with anyio.move_on_after(1.0):
                    await stderr_done.wait()
                tg.cancel_scope.cancel()
            orphans = self._died(reason)
            await _wait_gone([child.pid for child in orphans], _ORPHAN_GRACE)
            _settle(orphans)
        except BaseException as exc:
            closed = isinstance(exc, asyncio.CancelledError) or self._closing
            _settle(self._died("closed" if closed else f"lost track of it: {exc!r}"))
            if not isinstance(exc, Exception):
                raise
            _log.exception("template %d: reader failed", self.pid)
        finally:
            self._reader_done.set()

    async def _read_control(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                data = await loop.sock_recv(self._control, _RECV_BYTES)
            except OSError:
                data = b""
            try:
                messages = self._conn.receive_data(data)
            except p.ReceiveError as exc:
                for message in exc.received:
                    self._dispatch(message)
                _log.error("template %d sent garbage (%s); killing it", self.pid, exc)
                self._kill_template()
                return
            for message in messages:
                self._dispatch(message)
            if not data:
                return

    def _dispatch(self, message: p.Message) -> None:
        if isinstance(message, p.Importing):
            self._importing = message.module
        elif isinstance(message, p.Ready | p.Unsafe | p.ImportFailed):
            self._init_reply = message
            self._init_done.set()
        elif isinstance(message, p.Spawned):
            self._on_spawned(message.id, message.pid)
        elif isinstance(message, p.SpawnFailed):
            pending = self._pending.pop(message.id, None)
            if pending is not None:
                pending.error = f"the template could not fork: {message.message}"
                pending.done.set()
        elif isinstance(message, p.Exited):
            child = self._children.pop(message.pid, None)
            if child is not None:
                child._set_exited(message.code)

    def _on_spawned(self, spawn_id: int, pid: int) -> None:
        child = self._children[pid] = ForkedProcess(pid)
        pending = self._pending.pop(spawn_id, None)
        if pending is None or pending.abandoned:
            child.kill()  # nobody will ever drive it
            return
        pending.process = child
        pending.done.set()

    async def _pump_stderr(self, done: anyio.Event) -> None:
        stream = self._process.stderr
        assert stream is not None
        lines = LineSplitter(self._stderr_line)
        try:
            with contextlib.suppress(
                anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError
            ):
                while True:
                    lines.feed(await stream.receive())
        finally:
            lines.close()
            done.set()

    def _stderr_line(self, raw: bytes) -> None:
        line = raw.decode(errors="replace").rstrip()
        self._stderr_tail.append(line)
        _log.warning("template %d: %s", self.pid, line)

    async def _wait_exit(self) -> str:
        """After EOF on the control socket: the template is exiting; reap it."""
        with anyio.move_on_after(_EXIT_GRACE):
            await self._process.wait()
        if self._process.returncode is None:
            self._kill_template()
            await self._process.wait()
        code = self._process.returncode
        assert code is not None
        return _describe_exit(code)

    def _kill_template(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)

    # --- the end -----------------------------------------------------------------------

    def _died(self, reason: str) -> list[ForkedProcess]:
        """The template is gone: fail what waits on it; returns its orphaned workers."""
        if self._dead_reason is None:
            self._dead_reason = reason
        self._init_done.set()
        for pending in self._pending.values():
            pending.error = f"the template is gone ({reason})"
            pending.done.set()
        self._pending.clear()
        orphans = list(self._children.values())
        self._children.clear()
        for child in orphans:
            # They die by PR_SET_PDEATHSIG; kill the group too, in case one was
            # still between fork and prctl when the template died.
            child.kill()
        return orphans

    async def _abort(self) -> None:
        """Close a template that never got ready: no workers to wind down, so kill it."""
        self._kill_template()
        await self.aclose()

    async def aclose(self) -> None:
        """Stop the template and its workers (they exit with ``-9``). Idempotent."""
        if self._closing:
            await self._closed.wait()
            return
        self._closing = True
        with anyio.CancelScope(shield=True):
            try:
                await self._shut_down()
            finally:
                self._control.close()
                self._closed.set()

    async def _shut_down(self) -> None:
        # EOF tells the template to kill and reap its workers, then exit; the
        # reader sees the template's EOF in turn and settles everything.
        with contextlib.suppress(OSError):
            self._control.shutdown(socket.SHUT_WR)
        with anyio.move_on_after(_EXIT_GRACE + 1):
            await self._reader_done.wait()
        if not self._reader_done.is_set():
            self._kill_template()
            if self._reader is not None:
                self._reader.cancel()
            await self._reader_done.wait()
        if self._process.returncode is None:
            self._kill_template()
            await self._process.wait()
        with contextlib.suppress(Exception):
            await self._process.aclose()


def _check_platform() -> None:
    if not sys.platform.startswith("linux"):
        raise TemplateUnavailable(f"fork server needs Linux; this is {sys.platform}")
    if not running_on_asyncio():
        raise TemplateUnavailable(
            "fork server needs anyio's asyncio backend; plain spawning is used instead"
        )


def _describe_exit(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


def _settle(orphans: list[ForkedProcess]) -> None:
    for child in orphans:
        child._set_exited(-signal.SIGKILL)


async def _wait_gone(pids: list[int], timeout: float) -> None:
    """Wait (bounded) until these orphaned, SIGKILLed processes have died."""
    with anyio.move_on_after(timeout):
        while any(_running(pid) for pid in pids):  # noqa: ASYNC110 - no event to wait on
            await anyio.sleep(0.005)


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie waits for init to reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            state = stat.read().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")
