"""An adapter whose handlers start children that try to outlive their worker.

Used by tests/test_descendants.py (and its host script, sp_descendants_host.py).
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from typing import Any

from snakepool.adapters import Adapter, command
from snakepool.workers import _runtime

#: A grandchild that leaves the worker's group and is orphaned at once: the
#: shell prints the background job's pid and exits.
_DOUBLE_FORK = "setsid sleep 3600 </dev/null >/dev/null 2>&1 & echo $!"


#: Prints what each open fd of the process points at.
_LIST_FDS = """
import os
for name in os.listdir("/proc/self/fd"):
    try:
        print(os.readlink("/proc/self/fd/" + name))
    except OSError:
        pass  # (the listing's own fd)
"""


class Spawner(Adapter):
    @command
    def spawn_children(self) -> dict[str, int]:
        """One child of each kind that escapes a process-group kill, or tries to."""
        in_group = subprocess.Popen(["sleep", "3600"])
        own_session = subprocess.Popen(["sleep", "3600"], start_new_session=True)
        shell = subprocess.run(
            ["sh", "-c", _DOUBLE_FORK], capture_output=True, text=True, check=True
        )
        return {
            "in_group": in_group.pid,
            "own_session": own_session.pid,
            "double_forked": int(shell.stdout.strip()),
        }

    @command
    def c_fork_holder(self) -> int:
        """A child forked at C level (no Python at-fork hooks run): it keeps every fd
        the worker had, its protocol pipes included, leaves the group and waits."""
        libc = ctypes.PyDLL(None)  # (PyDLL: the GIL stays held across fork)
        pid = int(libc.fork())
        if pid == 0:
            libc.setsid()
            while True:
                libc.pause()
        return pid

    @command
    def protocol_pipes(self) -> list[str]:
        """The worker's protocol pipes, as /proc names them."""
        worker = _runtime.current_worker()
        assert worker is not None
        fds = [worker.threads.fd, worker.writer._fd]
        return [os.readlink(f"/proc/self/fd/{fd}") for fd in fds]

    @command
    def fds_of_children(self) -> dict[str, list[str]]:
        """What a subprocess and an os.fork() child of a handler have open."""
        spawned = subprocess.run(
            [sys.executable, "-c", _LIST_FDS], capture_output=True, text=True, check=True
        ).stdout.split()
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_end)
            links = []
            for name in os.listdir("/proc/self/fd"):
                try:
                    links.append(os.readlink(f"/proc/self/fd/{name}"))
                except OSError:
                    continue
            os.write(write_end, "\n".join(links).encode())
            os._exit(0)
        os.close(write_end)
        chunks = []
        while chunk := os.read(read_end, 65536):
            chunks.append(chunk)
        os.close(read_end)
        os.waitpid(pid, 0)
        return {"spawned": spawned, "forked": b"".join(chunks).decode().split()}

    @command
    def die(self) -> None:
        os._exit(3)

    @command
    def pid(self) -> int:
        return os.getpid()

    @command
    def echo(self, value: Any) -> Any:
        return value
