"""What the isolation tests run in real, isolated workers: each function crosses
(or tries to cross) one line. The module-level functions are also the generic
adapter's ``call`` targets in the sandbox test.

A worker that runs as another user (``user=``, the sandbox) imports what its
template imported before the switch; where that user cannot read the
interpreter's standard library (a pyenv Python under a 0700 /root) nothing
else imports, so everything these need is imported here, at the top.
"""

from __future__ import annotations

import encodings.idna  # noqa: F401 - socket's name lookup needs it; imported while readable
import mmap
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

from snakepool.adapters import Adapter, command

_MIB = 2**20
_kept: list[Any] = []  # what a call keeps alive (open files, memory)


def whoami() -> dict[str, Any]:
    """Who the worker runs as, and where its scratch space is."""
    return {
        "uid": os.getuid(),
        "euid": os.geteuid(),
        "gid": os.getgid(),
        "groups": os.getgroups(),
        "tmp": tempfile.gettempdir(),
        "home": os.environ.get("HOME"),
        "pid": os.getpid(),
    }


def allocate(mb: float) -> int:
    """Allocate (and touch) ``mb`` MiB."""
    block = bytearray(int(mb * _MIB))
    block[::4096] = b"x" * len(block[::4096])
    _kept.append(block)
    return len(block)


def connect(port: int) -> str:
    """Connect to 127.0.0.1:port (a server the test runs on the host)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        return "connected"


def write(path: str, text: str = "hi") -> str:
    with open(path, "w") as file:
        file.write(text)
    return path


def environ() -> dict[str, str]:
    return dict(os.environ)


def signal_others(pids: list[int]) -> list[int]:
    """Signal 0 (a permission check) to each of ``pids`` but this worker."""
    others = [pid for pid in pids if pid != os.getpid()]
    for pid in others:
        os.kill(pid, 0)
    return others


def rlimits() -> dict[str, list[int]]:
    names = ("RLIMIT_DATA", "RLIMIT_CPU", "RLIMIT_NOFILE", "RLIMIT_NPROC", "RLIMIT_FSIZE")
    return {name: list(resource.getrlimit(getattr(resource, name))) for name in names}


class Limits(Adapter):
    """Commands that cross the line of each limit."""

    @command
    def ping_pid(self) -> int:
        return os.getpid()

    @command
    def whoami(self) -> dict[str, Any]:
        return whoami()

    @command
    def rlimits(self) -> dict[str, list[int]]:
        return rlimits()

    @command
    def allocate(self, mb: float) -> int:
        return allocate(mb)

    @command
    def spin(self, seconds: float) -> float:
        """Burn CPU for ``seconds`` of wall time."""
        end = time.monotonic() + seconds
        n = 0
        while time.monotonic() < end:
            n += 1
        return float(n)

    @command
    def open_files(self, n: int) -> int:
        """Open /dev/null ``n`` times and keep the files open."""
        for _ in range(n):
            _kept.append(open(os.devnull))  # noqa: SIM115 - kept open on purpose
        return n

    @command
    def fork(self, n: int) -> int:
        """Start ``n`` children that sleep (they die with the worker)."""
        for _ in range(n):
            pid = os.fork()
            if pid == 0:
                time.sleep(60)
                os._exit(0)
            _kept.append(pid)
        return n

    @command
    def write_mb(self, path: str, mb: float) -> int:
        """Write ``mb`` MiB to ``path``."""
        chunk = b"x" * _MIB
        with open(path, "wb") as file:
            for _ in range(int(mb)):
                file.write(chunk)
        return int(mb)

    @command
    def children_allocate(self, n: int, mb: float) -> list[int]:
        """``n`` child interpreters holding ``mb`` MiB each, all at once; their exit codes.

        ``ChildProcessError`` if one was killed (the OOM killer) on the way.
        """
        code = (
            "import sys\n"
            f"b = bytearray({int(mb * _MIB)})\n"
            "b[::4096] = b'x' * len(b[::4096])\n"
            "print('ready', flush=True)\n"
            "sys.stdin.read()\n"  # (held until the parent lets go)
        )
        pipe = subprocess.PIPE
        children = [
            subprocess.Popen([sys.executable, "-c", code], stdin=pipe, stdout=pipe)
            for _ in range(n)
        ]
        for child in children:  # all of them hold their memory at once...
            assert child.stdout is not None
            child.stdout.readline()  # ("ready", or EOF: killed)
        for child in children:  # ...then they may go
            assert child.stdin is not None
            child.stdin.close()
        codes = [child.wait(timeout=60) for child in children]
        if any(code != 0 for code in codes):
            raise ChildProcessError(f"children ended with {codes}")
        return codes

    @command
    def share(self, mb: float) -> int:
        """Touch ``mb`` MiB of shared memory: not RLIMIT_DATA's, only a memory cgroup's."""
        block = mmap.mmap(-1, int(mb * _MIB))  # (anonymous and shared: shmem)
        for offset in range(0, len(block), 4096):
            block[offset] = 1
        _kept.append(block)
        return len(block)

    @command
    def connect(self, port: int) -> str:
        return connect(port)

    @command
    def write(self, path: str, text: str = "hi") -> str:
        return write(path, text)
