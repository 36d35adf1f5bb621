"""Keeping track of every process a worker starts, so none outlives it.

A handler may start children that leave the worker's process group
(``setsid()``) or are double-forked, so killing the group misses them.
Linux's *child subreaper* flag (``PR_SET_CHILD_SUBREAPER``) keeps them in
view: an orphan is re-parented to its nearest subreaper ancestor instead of
init. The worker and the template that starts it are both subreapers, so
while a worker lives all its descendants are in its subtree, and when it dies
they become children of the template, which kills them (see
:mod:`snakepool.workers._template`).

Only the standard library, and nothing here starts a thread: the template
forks after calling these.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from collections.abc import Collection

__all__ = ["become_subreaper", "kill_descendants", "reap_children"]

_PR_SET_CHILD_SUBREAPER = 36
#: How long kill_descendants keeps killing what appears (a fork in flight).
_KILL_DEADLINE = 2.0


def become_subreaper() -> bool:
    """Adopt our descendants' orphans (Linux); False where the kernel cannot."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def kill_descendants(spare: Collection[int]) -> None:
    """SIGKILL every process below us except the subtrees rooted at ``spare``.

    Repeats until nothing is left alive below us (a process can fork between
    our reading the process table and the kill), within a deadline.
    """
    deadline = time.monotonic() + _KILL_DEADLINE
    while True:
        targets = _living_below(os.getpid(), set(spare))
        if not targets or time.monotonic() > deadline:
            return
        for pid in targets:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        # (Not reaped here: the caller reaps, and learns which of its own ended.)
        time.sleep(0.001)


def reap_children(block_for: Collection[int] = ()) -> list[tuple[int, int]]:
    """Reap the children that ended: ``(pid, exit code)`` each (code < 0: a signal).

    Waits for the pids in ``block_for`` (already killed) to end too.
    """
    reaped: list[tuple[int, int]] = []
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            break
        reaped.append((pid, os.waitstatus_to_exitcode(status)))
    done = {pid for pid, _ in reaped}
    for pid in block_for:
        if pid not in done:
            with contextlib.suppress(ChildProcessError):
                _, status = os.waitpid(pid, 0)
                reaped.append((pid, os.waitstatus_to_exitcode(status)))
    return reaped


def _living_below(root: int, spare: set[int]) -> list[int]:
    """Pids of the living (not zombie) processes below ``root``, minus spared subtrees."""
    children: dict[int, list[int]] = {}
    alive: set[int] = set()
    for pid, ppid, state in _process_table():
        children.setdefault(ppid, []).append(pid)
        if state not in ("Z", "X"):
            alive.add(pid)
    found: list[int] = []
    todo = [pid for pid in children.get(root, []) if pid not in spare]
    while todo:
        pid = todo.pop()
        if pid in alive:
            found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def _process_table() -> list[tuple[int, int, str]]:
    """``(pid, ppid, state)`` of every process we can see in /proc."""
    table = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as stat:
                fields = stat.read().rpartition(b")")[2].split()
        except OSError:
            continue  # it just ended
        with contextlib.suppress(IndexError, ValueError):
            table.append((int(name), int(fields[1]), fields[0].decode()))
    return table
