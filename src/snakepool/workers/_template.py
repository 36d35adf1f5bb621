"""The worker template (fork server): ``python -m snakepool.workers --template``.

A pool with ``preload=[...]`` starts one of these per pool. It imports the
heavy modules once, then forks a worker each time the host asks, so a
replacement worker skips the imports (tens of milliseconds instead of
seconds). The host side is :mod:`snakepool.pool._template`.

Control channel: fd 0 is one end of a Unix stream socket carrying the
messages of :mod:`snakepool.protocol._template` (``TemplateInit``, then
``Importing``... ``Ready``/``Unsafe``/``ImportFailed``; ``Spawn``, with the
worker's stdin, stdout and stderr passed by SCM_RIGHTS, answered by
``Spawned``/``SpawnFailed``; ``Exited``), through a ``TemplateConnection``.

The template is also the *keeper* of every process its workers start: it is
a child subreaper (``PR_SET_CHILD_SUBREAPER``), and so is each worker, so a
handler's child that leaves the worker's process group (``setsid()``) or is
double-forked stays in the worker's subtree while the worker lives and comes
to the template when the worker dies. The template then kills it, with
everything below it. When the host dies (even by SIGKILL: the template
watches the host's pidfd, has ``PR_SET_PDEATHSIG`` send it SIGTERM, and sees
EOF on the control socket) or closes the control socket, the template kills
every process below it, reaps them and exits. So no descendant of a worker
outlives its worker, its pool or its host.

Why it is written the way it is:

* Forking is only safe while the process has exactly one thread (a lock
  held by another thread at fork time stays held forever in the child).
  So the template uses no threads and no asyncio: a blocking ``poll`` loop,
  SIGCHLD through ``signal.set_wakeup_fd``. After the preload imports it
  counts threads (Python's and native ones, via ``/proc/self/task``) and
  refuses, naming them, if an import started any.
* Its stdio is moved off fds 0/1 at start, so a forked worker gets exactly
  the three fds the host sent it on 0/1/2 plus what the preloaded libraries
  themselves opened (kept, as any fork keeps them: closing them under the
  libraries would leave their file objects pointing at recycled fd numbers).

Caveats, inherent to forking from a warm template:

* Whatever a library reads from the environment *at import time* (thread
  counts such as ``OMP_NUM_THREADS``, ``CUDA_VISIBLE_DEVICES`` for a CUDA
  library that initialises on import, ...) comes from the template's
  environment, not the worker's. ``os.environ`` itself is the worker's.
* The workers share the template's ``PYTHONHASHSEED`` (hash randomisation
  happens once per interpreter). ``random`` and NumPy's global generator are
  re-seeded in each worker.
* ``ps`` shows a forked worker with the template's command line.
"""

from __future__ import annotations

import collections
import contextlib
import importlib
import os
import select
import signal
import socket
import sys
import time
import traceback

from .. import protocol as p
from ..errors import ProtocolError
from ._descendants import become_subreaper, kill_descendants, reap_children
from ._stdio import (  # (already loaded: python -m snakepool.workers)
    EXIT_OK,
    EXIT_PROTOCOL_ERROR,
    die_with_parent,
    flush_and_exit,
    flush_std_streams,
)

__all__ = ["main"]

#: A forked worker whose runtime returned or raised (it must never get back here).
EXIT_WORKER_ESCAPED = 70
#: A spawned worker whose interpreter could not be executed (as a shell says it).
EXIT_CANNOT_EXEC = 127

_ALWAYS_IMPORTED = ("snakepool.workers._runtime", "snakepool.adapters")
_MAX_FDS_PER_RECV = 16
_RECV_BYTES = 1 << 16


def main() -> None:
    """Entry point of ``python -m snakepool.workers --template``."""
    become_subreaper()
    host = _watch_host()
    control = _claim_control_socket()
    try:
        code = Template(control, host).run()
    except KeyboardInterrupt:
        code = EXIT_OK
    flush_and_exit(code)


def _watch_host() -> int | None:
    """A pidfd that turns readable when the host exits (None: we watch getppid()).

    Not ``PR_SET_PDEATHSIG`` with SIGKILL as a worker has it: the template
    must outlive the host for long enough to kill what the workers started.
    PDEATHSIG sends SIGTERM (whose handler only wakes the loop), the loop then
    checks the parent itself: PDEATHSIG also fires when only the host's
    *thread* that started us ends (a ``BlockingPool``'s loop thread).
    """
    host_pid = int(os.environ.get("SNAKEPOOL_HOST_PID") or os.getppid())
    die_with_parent(signal.SIGTERM)
    pidfd: int | None = None
    with contextlib.suppress(OSError, AttributeError):
        pidfd = os.pidfd_open(host_pid)
    if os.getppid() != host_pid:
        os._exit(EXIT_OK)  # the host died before we watched it
    return pidfd


def _claim_control_socket() -> socket.socket:
    """Take the socket off fd 0 (a worker's fd 0 is its own stdin) and leave /dev/null there."""
    control = socket.socket(fileno=os.dup(0))  # os.dup: not inherited by anything we exec
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    control.setblocking(True)
    return control


class Template:
    """The template's state and its single-threaded event loop."""

    def __init__(self, control: socket.socket, host: int | None = None) -> None:
        self.control = control
        self.host = host  # the host's pidfd, if the kernel has them
        self.host_pid = os.getppid()
        self.control_fd = control.fileno()
        self.conn = p.TemplateConnection(p.Role.WORKER)
        self.inbox: collections.deque[p.Message] = collections.deque()
        self.broken = False  # the host's stream broke the protocol
        self.fds: list[int] = []  # received by SCM_RIGHTS, not yet claimed by a spawn
        self.children: set[int] = set()
        self.wakeup_r, self.wakeup_w = os.pipe()
        self.eof = False

    # --- the loop ------------------------------------------------------------------

    def run(self) -> int:
        init = self._next_message()
        if init is None:
            return EXIT_PROTOCOL_ERROR if self.broken else EXIT_OK
        if not isinstance(init, p.TemplateInit):
            return EXIT_PROTOCOL_ERROR
        if not self._initialise(init):
            return EXIT_OK
        self._watch_children()
        return self._serve()

    def _serve(self) -> int:
        # poll, not selectors/epoll: it holds no fd a forked child could inherit.
        poller = select.poll()
        poller.register(self.control.fileno(), select.POLLIN)
        poller.register(self.wakeup_r, select.POLLIN)
        if self.host is not None:
            poller.register(self.host, select.POLLIN)
        while True:
            for fd, _ in poller.poll():
                if fd == self.wakeup_r:
                    self._drain_wakeup()
                    self._reap()
                    host_gone = os.getppid() != self.host_pid  # (SIGTERM from PDEATHSIG)
                elif fd == self.control_fd:
                    host_gone = not self._handle_control()
                else:  # the host's pidfd: it exited
                    host_gone = True
                if host_gone:
                    self._kill_children()
                    return EXIT_OK

    def _handle_control(self) -> bool:
        """Read what the host sent and act on every whole message; False at EOF
        (or when our own host broke the protocol: nothing sane is left to do)."""
        self._receive()
        while self.inbox:
            message = self.inbox.popleft()
            if isinstance(message, p.Spawn):
                self._spawn(message)
        return not (self.eof or self.broken)

    def _receive(self) -> None:
        try:
            data, fds, _flags, _addr = socket.recv_fds(self.control, _RECV_BYTES, _MAX_FDS_PER_RECV)
        except OSError:
            data, fds = b"", []
        # The fds ride on the first byte of their spawn frame, so by the time a
        # spawn frame is whole its fds are here: a FIFO pairs them up.
        self.fds.extend(fds)
        if not data:
            self.eof = True
        try:
            self.inbox.extend(self.conn.receive_data(data))
        except ProtocolError as exc:
            print(f"snakepool template: protocol error from host: {exc}", file=sys.stderr)
            self.broken = True

    def _next_message(self) -> p.Message | None:
        """Block until one whole message arrives (used for init)."""
        while not self.inbox:
            if self.eof or self.broken:
                return None
            self._receive()
        return self.inbox.popleft()

    def _send(self, message: p.Message) -> None:
        # OSError: the host is gone; EOF on the next read ends us.
        with contextlib.suppress(OSError):
            self.control.sendall(self.conn.send(message))

    # --- init ------------------------------------------------------------------------

    def _initialise(self, init: p.TemplateInit) -> bool:
        """Apply the host's paths, import, check fork safety; tell the host."""
        if not sys.platform.startswith("linux"):
            self._send(p.Unsafe(reason=f"fork server needs Linux; this is {sys.platform}"))
            return False
        for entry in reversed(init.sys_path):
            if entry not in sys.path:
                sys.path.insert(0, str(entry))
        if init.cwd:
            os.chdir(init.cwd)
        preload = [str(name) for name in init.preload]
        started = time.perf_counter()
        # Every worker imports the runtime and the adapters base: most of the
        # saving when nothing is preloaded. (The pool adds importlib.metadata
        # for an adapter found by entry point: ~45 ms to import.)
        for name in [*_ALWAYS_IMPORTED, *preload]:
            if not self._import(name):
                return False
        self._send(
            p.Ready(pid=os.getpid(), modules=preload, import_seconds=time.perf_counter() - started)
        )
        return True

    def _import(self, name: str) -> bool:
        self._send(p.Importing(module=name))
        try:
            importlib.import_module(name)
        except BaseException as exc:
            self._send(
                p.ImportFailed(
                    module=name,
                    type=type(exc).__name__,
                    message=str(exc),
                    traceback=traceback.format_exc(),
                )
            )
            return False
        threads = _other_threads()
        if threads:
            self._send(
                p.Unsafe(
                    reason=f"threads were started while importing {name}: {threads}; "
                    "forking a process with threads can deadlock the workers"
                )
            )
            return False
        return True

    # --- children --------------------------------------------------------------------

    def _watch_children(self) -> None:
        os.set_blocking(self.wakeup_w, False)  # set_wakeup_fd insists on it
        os.set_blocking(self.wakeup_r, False)
        # A Python-level handler is needed for the wakeup fd to be written to;
        # the loop does the work when it sees the byte.
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)
        signal.signal(signal.SIGTERM, lambda signum, frame: None)  # PDEATHSIG: see _watch_host
        signal.set_wakeup_fd(self.wakeup_w)

    def _drain_wakeup(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self.wakeup_r, 4096):
                pass

    def _reap(self) -> None:
        """Reap every child that ended: a worker (tell the host) or an orphan."""
        while exited := reap_children():
            workers = [(pid, code) for pid, code in exited if pid in self.children]
            for pid, code in workers:
                self.children.discard(pid)
                self._send(p.Exited(pid=pid, code=code))
            if workers:
                # What the dead workers started came to us (we are their
                # subreaper): all below us that no living worker leads goes.
                kill_descendants(spare=self.children)

    def _kill_children(self) -> None:
        """The host is gone or done with us: nothing below the template outlives it."""
        for pid in self.children:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
        kill_descendants(spare=())
        for pid, code in reap_children(block_for=self.children):
            if pid in self.children:
                # The host may only have shut down its sending side: tell it.
                self._send(p.Exited(pid=pid, code=code))
        self.children.clear()

    def _spawn(self, message: p.Spawn) -> None:
        spawn_id = message.id
        if len(self.fds) < 3:
            self._send(p.SpawnFailed(id=spawn_id, message="no fds came with spawn"))
            return
        stdio, self.fds = self.fds[:3], self.fds[3:]
        env = {str(k): str(v) for k, v in message.env.items()}
        flush_std_streams()  # or the child would write our buffered output again
        try:
            pid = os.fork()
        except OSError as exc:
            self._send(p.SpawnFailed(id=spawn_id, message=f"fork failed: {exc}"))
        else:
            if pid == 0:
                if message.argv:
                    self._exec_worker(stdio, env, [str(a) for a in message.argv], message.cwd)
                self._become_worker(stdio, env)  # never returns
            self.children.add(pid)
            self._send(p.Spawned(id=spawn_id, pid=pid))
        finally:
            for fd in stdio:
                with contextlib.suppress(OSError):
                    os.close(fd)

    # --- in the forked child ------------------------------------------------------------

    def _become_worker(self, stdio: list[int], env: dict[str, str]) -> None:
        """Turn this forked child into a worker; ends in ``os._exit``, always."""
        code = EXIT_WORKER_ESCAPED
        try:
            os.setsid()  # its own process group: the host kills it with killpg
            self._reset_signals()
            self._adopt_stdio(stdio)
            _become_environment(env, template_pid=os.getppid())
            if env.get("PYTHONUNBUFFERED"):  # as a spawned worker's stdio would be
                for stream in (sys.stdout, sys.stderr):
                    with contextlib.suppress(AttributeError, ValueError):
                        stream.reconfigure(write_through=True)  # type: ignore[union-attr]
            _reseed()
            sys.argv = sys.argv[:1]  # drop --template
            from . import _runtime

            _runtime.main()  # exits the process itself
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            flush_and_exit(code)

    def _exec_worker(
        self, stdio: list[int], env: dict[str, str], argv: list[str], cwd: object
    ) -> None:
        """Turn this forked child into a fresh interpreter (``start_method="spawn"``)."""
        try:
            os.setsid()
            self._reset_signals()
            self._adopt_stdio(stdio)
            env["SNAKEPOOL_HOST_PID"] = str(os.getppid())  # its parent is us, not the host
            if isinstance(cwd, str) and cwd:
                os.chdir(cwd)
            os.execvpe(argv[0], argv, env)  # (PATH searched as subprocess does)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                os.write(2, f"snakepool: cannot start {argv[0]!r}: {exc}\n".encode())
        os._exit(EXIT_CANNOT_EXEC)

    def _reset_signals(self) -> None:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # as Python starts
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # as Python starts

    def _adopt_stdio(self, stdio: list[int]) -> None:
        for target, fd in enumerate(stdio):
            os.dup2(fd, target)  # inheritable, like a spawned worker's stdio
        # Everything the template itself holds: the worker must not keep the
        # control socket open (the host would never see the template's EOF).
        self.control.detach()  # closed below; no object may close its number later
        ours = [*stdio, *self.fds, self.wakeup_r, self.wakeup_w, self.control_fd]
        if self.host is not None:
            ours.append(self.host)
        for fd in ours:
            with contextlib.suppress(OSError):
                os.close(fd)


def _become_environment(env: dict[str, str], *, template_pid: int) -> None:
    os.environ.clear()
    os.environ.update(env)
    # The worker checks its parent against this after PR_SET_PDEATHSIG; its
    # parent is the template, which dies with the host.
    os.environ["SNAKEPOOL_HOST_PID"] = str(template_pid)


def _reseed() -> None:
    """Forked workers must not draw the same random numbers."""
    random = sys.modules.get("random")
    if random is not None:
        random.seed()
    numpy_random = sys.modules.get("numpy.random")
    if numpy_random is not None:
        with contextlib.suppress(Exception):
            numpy_random.seed()


def _other_threads() -> list[str]:
    """Names of the threads besides this one, Python's and native ones."""
    import threading

    names = [t.name for t in threading.enumerate() if t is not threading.current_thread()]
    native = _native_thread_names()  # Python's threads are in there too
    if len(native) > len(names):
        names.append(f"{len(native) - len(names)} native thread(s) among {native}")
    return names


def _native_thread_names() -> list[str]:
    """Threads other than the main one per ``/proc/self/task`` (C extensions' included)."""
    me = os.getpid()
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task") if int(t) != me]
    except OSError:
        return []
    names = []
    for tid in sorted(tids):
        try:
            with open(f"/proc/self/task/{tid}/comm") as comm:
                names.append(f"{comm.read().strip()} (native, tid {tid})")
        except OSError:
            names.append(f"tid {tid}")
    return names
