"""The worker's stdio and its exits: the protocol pipes moved where user code
cannot touch them, death with the parent, the frame writer, exit codes.

The protocol owns the process's real stdout: at start-up the pipe is moved to
a private fd and fd 1 is pointed at stderr, so a ``print()`` in user code can
never corrupt a frame. stdin is replaced by /dev/null for the same reason.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

__all__ = [
    "EXIT_INTERNAL_ERROR",
    "EXIT_OK",
    "EXIT_PROTOCOL_ERROR",
    "EXIT_STARTUP_FAILED",
    "FrameWriter",
    "claim_stdio",
    "die_with_parent",
    "flush_and_exit",
    "flush_std_streams",
]

#: Exit codes a worker uses on purpose (anything else is a crash).
EXIT_OK = 0
EXIT_STARTUP_FAILED = 3
EXIT_PROTOCOL_ERROR = 4
EXIT_INTERNAL_ERROR = 5  # a bug in the runtime itself: exit loudly rather than go deaf


def claim_stdio() -> tuple[int, int]:
    """Move the protocol pipes off fds 0/1 so user code cannot touch them."""
    proto_in = os.dup(0)  # os.dup makes non-inheritable fds: children never get them
    proto_out = os.dup(1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)  # fd 1 (and so sys.stdout and C-level printf) now writes to stderr
    with contextlib.suppress(AttributeError, ValueError):
        sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]

    def close_in_child() -> None:
        # A handler's os.fork() (multiprocessing, daemons) copies every fd,
        # close-on-exec or not: a child that kept the protocol pipes open
        # would hide the worker's death from the host (it waits for EOF).
        for fd in (proto_in, proto_out):
            with contextlib.suppress(OSError):
                os.close(fd)

    os.register_at_fork(after_in_child=close_in_child)
    return proto_in, proto_out


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Ask Linux to send us ``sig`` when our parent dies, even by SIGKILL.

    The parent is the host, or the template a worker was forked from
    (``SNAKEPOOL_HOST_PID`` names it; shared with the template process).
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(pr_set_pdeathsig, sig, 0, 0, 0)
    expected = os.environ.get("SNAKEPOOL_HOST_PID")
    if expected and expected.isdigit() and os.getppid() != int(expected):
        os._exit(EXIT_OK)  # the host died before prctl took effect


def flush_std_streams() -> None:
    """Flush Python's stdout/stderr buffers (before os._exit, or a fork)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


def flush_and_exit(code: int) -> None:
    flush_std_streams()
    # os._exit: a sync handler stuck in a thread must not keep the process alive.
    os._exit(code)


#: A frame whose body is at most this long is joined and written with one
#: ``os.write``: copying a few KiB costs less than a ``writev`` vector.
_JOIN_BELOW = 4096


class FrameWriter:
    """Writes whole frames to the protocol pipe: blocking, from any thread.

    Handler threads write their results themselves instead of handing them to
    the event loop (one thread hop less per call). A write blocks only while
    the pipe is full, which is the backpressure we want: the host reads all
    the time, and a generator must not run ahead of it.
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._lock = threading.Lock()
        self._closed = False

    def write(self, *parts: bytes) -> None:
        """One frame, whole or from its parts (header, body).

        A small frame is joined and written with one ``os.write`` (cheaper than
        building a ``writev`` vector); a large one goes out with ``writev``, so
        its body is never copied.
        """
        if len(parts) == 1:
            data = parts[0]
        elif len(parts[-1]) <= _JOIN_BELOW:
            data = b"".join(parts)
        else:
            self._write_vector(parts)
            return
        with self._lock:
            if self._closed:
                return
            try:
                written = os.write(self._fd, data)
                if written < len(data):  # (a signal interrupted a large write)
                    self._write_rest([memoryview(data)[written:]])
            except OSError:  # EPIPE: the host is gone; we exit on stdin EOF
                self._closed = True

    def _write_vector(self, parts: tuple[bytes, ...]) -> None:
        with self._lock:
            if self._closed:
                return
            try:
                written = os.writev(self._fd, parts)
                if written < sum(map(len, parts)):
                    views = [memoryview(part) for part in parts]
                    while written >= len(views[0]):
                        written -= len(views.pop(0))
                    views[0] = views[0][written:]
                    self._write_rest(views)
            except OSError:
                self._closed = True

    def _write_rest(self, views: list[memoryview]) -> None:
        """Finish a partial write (the lock is held)."""
        while views:
            written = os.writev(self._fd, views)
            while views and written >= len(views[0]):
                written -= len(views.pop(0))
            if views and written:
                views[0] = views[0][written:]

    def is_closing(self) -> bool:
        return self._closed
