"""Isolation a worker applies to itself before its adapter loads (Linux).

The host puts what the pool asked for in ``SNAKEPOOL_ISOLATION`` (JSON, made
by :mod:`snakepool.pool._isolation`, which has already checked that this
machine can do it). :func:`apply_from_env` runs first thing in the worker's
``main()``: the process then has one thread (unsharing a namespace and
Landlock act on the calling thread only) and has not imported the adapter.
Whether the worker was forked warm from the template or exec'd fresh, this
is the one place isolation happens. In order:

1. cgroups: a leaf ``w<pid>`` under each parent the host prepared, its
   ``memory``/``pids`` limits written, then the worker moves itself in (its
   children follow it);
2. a private scratch directory (the sandbox's ``TMPDIR`` and ``HOME``);
3. a network namespace with only a loopback of its own (``network=False``),
   owned by a user namespace of its own where the host is not root;
4. Landlock: writes only beneath ``writable_paths`` (and ``/dev/null``);
5. the user: supplementary groups, gid, uid (``PR_SET_NO_NEW_PRIVS`` first);
6. ``setrlimit``: lowering a limit needs no privilege, so this comes last.

The protocol pipes are file descriptors the worker already holds: no
namespace, Landlock rule or user change touches them.

A call that crosses a limit surfaces in the worker as an exception
(``MemoryError``, ``EMFILE``, ``EFBIG``, a failed fork): :func:`exit_if_crossed`
sees it where a call's failure is reported and ends the worker with the
limit's exit code instead of answering, so the host fails the call with
``ResourceExceeded`` naming the limit and replaces the worker (whose state
a failed allocation may have left broken). ``cpu_seconds`` ends the worker by
``SIGXCPU`` itself; a cgroup's OOM kill shows in its ``memory`` events.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
from typing import Any

__all__ = [
    "ENV_VAR",
    "LIMITS",
    "LIMIT_EXIT_CODES",
    "apply_from_env",
    "cgroup_events",
    "exit_if_crossed",
]

ENV_VAR = "SNAKEPOOL_ISOLATION"
#: The keys of a pool's ``limits``.
LIMITS = ("memory_mb", "cpu_seconds", "open_files", "processes", "file_size_mb")
#: How a worker exits when a call crossed one of these (``cpu_seconds``: SIGXCPU).
LIMIT_EXIT_CODES = {"memory_mb": 81, "open_files": 82, "processes": 83, "file_size_mb": 84}
#: Exit code of a worker that could not isolate itself (as ``_stdio.EXIT_STARTUP_FAILED``).
_EXIT_STARTUP_FAILED = 3

_CLONE_NEWUSER = 0x10000000
_CLONE_NEWNET = 0x40000000
_PR_SET_NO_NEW_PRIVS = 38
_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1
_MIB = 2**20

# Landlock (linux/landlock.h); the syscall numbers are the same on every architecture.
_SYS_CREATE_RULESET, _SYS_ADD_RULE, _SYS_RESTRICT_SELF = 444, 445, 446
_CREATE_RULESET_VERSION = 1
_RULE_PATH_BENEATH = 1
_FS_WRITE_FILE = 1 << 1
_FS_REMOVE_DIR = 1 << 4
_FS_REMOVE_FILE = 1 << 5
_FS_MAKE_ALL = sum(1 << bit for bit in range(6, 13))  # char, dir, reg, sock, fifo, block, sym
_FS_REFER = 1 << 13  # ABI 2
_FS_TRUNCATE = 1 << 14  # ABI 3
_SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0  # ABI 6
_SCOPE_SIGNAL = 1 << 1  # ABI 6
#: Always writable under Landlock: what "discard this output" needs.
_ALWAYS_WRITABLE = ("/dev/null",)


class _Watch:
    """The limits this worker runs under, and how to tell that a call crossed one."""

    def __init__(self, limits: dict[str, float], leaves: dict[str, str], nproc: bool) -> None:
        self.limits = limits
        self.leaves = leaves  # controller -> this worker's cgroup directory
        self.nproc = nproc  # processes is RLIMIT_NPROC (per user), not a pids cgroup
        self.seen = self._events()

    def _events(self) -> dict[str, int]:
        return cgroup_events(self.leaves)

    def crossed(self, exc: BaseException) -> str | None:
        """The limit that ``exc`` (a call's failure) shows was crossed, or None."""
        limits = self.limits
        for error in _chain(exc):
            if isinstance(error, MemoryError) and "memory_mb" in limits:
                return "memory_mb"
            if isinstance(error, OSError):
                if error.errno == errno.EMFILE and "open_files" in limits:
                    return "open_files"
                if error.errno == errno.EFBIG and "file_size_mb" in limits:
                    return "file_size_mb"
        events = self._events()
        for limit, count in events.items():
            if count > self.seen.get(limit, 0):
                return limit
        self.seen = events  # (a kill a handler took in its stride is not the next call's)
        if (
            self.nproc
            and "processes" in limits
            and _fork_refused(exc)
            and _tasks_of(os.getuid()) >= limits["processes"]
        ):
            return "processes"
        return None


_watch: _Watch | None = None


def apply_from_env() -> None:
    """Isolate this worker as ``SNAKEPOOL_ISOLATION`` says (nothing when unset).

    Must run while the process has one thread. A failure is fatal: a worker
    less isolated than its pool asked for never runs (the host checked what
    the machine supports, so this means something changed underneath).
    """
    text = os.environ.pop(ENV_VAR, None)
    if not text:
        return
    import json

    global _watch
    try:
        _watch = _apply(json.loads(text))
    except Exception as exc:
        _say(f"cannot isolate this worker as the pool asks: {type(exc).__name__}: {exc}")
        os._exit(_EXIT_STARTUP_FAILED)


def exit_if_crossed(exc: BaseException) -> None:
    """End the worker (unanswered) when a call's failure ``exc`` crossed a limit.

    The host then fails the call with ``ResourceExceeded`` naming the limit,
    from the exit code, and starts a fresh worker.
    """
    watch = _watch
    if watch is None:
        return
    limit = watch.crossed(exc)
    if limit is None:
        return
    _say(
        f"a call crossed limits[{limit!r}]={watch.limits[limit]:g} ({type(exc).__name__}); "
        "exiting so that the pool replaces this worker"
    )
    os._exit(LIMIT_EXIT_CODES[limit])


def cgroup_events(leaves: dict[str, str]) -> dict[str, int]:
    """``{"memory_mb": OOM kills, "processes": forks refused}`` counted by these cgroups."""
    counts: dict[str, int] = {}
    memory = leaves.get("memory")
    if memory is not None:
        # v2: memory.events; v1: memory.oom_control (both have an "oom_kill N" line)
        for name in ("memory.events", "memory.oom_control"):
            found = _read_counter(os.path.join(memory, name), "oom_kill")
            if found is not None:
                counts["memory_mb"] = found
                break
    pids = leaves.get("pids")
    if pids is not None:
        found = _read_counter(os.path.join(pids, "pids.events"), "max")
        if found is not None:
            counts["processes"] = found
    return counts


# --- applying it ---------------------------------------------------------------------


def _apply(spec: dict[str, Any]) -> _Watch:
    limits = {str(k): float(v) for k, v in (spec.get("limits") or {}).items()}
    leaves = _join_cgroups(spec.get("cgroups") or {}, limits)
    writable = spec.get("writable")
    scratch = _make_scratch(spec.get("scratch"), spec.get("uid"), spec.get("gid"))
    if scratch is not None:
        writable = [*(writable or ()), scratch]
    _enter_namespaces(network=spec.get("network") is not False, own_user=bool(spec.get("userns")))
    if writable is not None:
        abi, scope = int(spec["landlock_abi"]), bool(spec.get("landlock_scope"))
        _restrict_writes([str(path) for path in writable], abi, scope=scope)
    if scratch is not None:
        import tempfile  # (now: the user may not be able to read the standard library)

        os.environ["TMPDIR"] = scratch
        tempfile.tempdir = None  # (it may have looked already, in the template)
    if spec.get("uid") is not None:
        _become_user(spec)
    if scratch is not None:
        os.environ["HOME"] = scratch
    _set_rlimits(limits, nproc=bool(spec.get("nproc")))
    return _Watch(limits, leaves, nproc=bool(spec.get("nproc")))


def _join_cgroups(parents: dict[str, str], limits: dict[str, float]) -> dict[str, str]:
    """Make this worker's leaf under each parent, set its limits, move in."""
    leaves: dict[str, str] = {}
    pid = str(os.getpid())
    for parent in dict.fromkeys(parents.values()):
        leaf = os.path.join(parent, f"w{pid}")
        with contextlib.suppress(FileNotFoundError):
            os.rmdir(leaf)  # a dead worker's, of the same pid
        os.mkdir(leaf)
        for controller, where in parents.items():
            if where == parent:
                leaves[controller] = leaf
                _write_cgroup_limit(leaf, controller, limits)
        _write(os.path.join(leaf, "cgroup.procs"), pid)
    return leaves


def _write_cgroup_limit(leaf: str, controller: str, limits: dict[str, float]) -> None:
    v2 = os.path.exists(os.path.join(leaf, "cgroup.controllers"))
    if controller == "memory" and "memory_mb" in limits:
        size = str(int(limits["memory_mb"] * _MIB))
        if v2:
            _write(os.path.join(leaf, "memory.max"), size)
            with contextlib.suppress(OSError):  # (no swap accounting: nothing to limit)
                _write(os.path.join(leaf, "memory.swap.max"), "0")
        else:
            _write(os.path.join(leaf, "memory.limit_in_bytes"), size)
            with contextlib.suppress(OSError):
                _write(os.path.join(leaf, "memory.memsw.limit_in_bytes"), size)
    elif controller == "pids" and "processes" in limits:
        _write(os.path.join(leaf, "pids.max"), str(int(limits["processes"])))


def _make_scratch(base: object, uid: object, gid: object) -> str | None:
    """This worker's private directory under ``base`` (stale ones of its pid removed)."""
    if not isinstance(base, str):
        return None
    import shutil

    path = os.path.join(base, f"w{os.getpid()}")
    shutil.rmtree(path, ignore_errors=True)
    os.mkdir(path, 0o700)
    if isinstance(uid, int):
        os.chown(path, uid, gid if isinstance(gid, int) else -1)
    return path


def _enter_namespaces(*, network: bool, own_user: bool) -> None:
    """Without ``network``: a network namespace of our own (a private loopback only).

    A host that is not root needs a user namespace to own it; ``own_user``
    asks for one anyway: ``RLIMIT_NPROC`` then counts this worker's processes,
    not every process of its user.
    """
    flags = 0 if network else _CLONE_NEWNET
    if os.geteuid() != 0 and (flags or own_user):
        flags |= _CLONE_NEWUSER
    if not flags:
        return
    uid, gid = os.geteuid(), os.getegid()
    _unshare(flags)
    if flags & _CLONE_NEWUSER:  # the same uid and gid inside as outside
        _write("/proc/self/setgroups", "deny")
        _write("/proc/self/uid_map", f"{uid} {uid} 1")
        _write("/proc/self/gid_map", f"{gid} {gid} 1")
    if flags & _CLONE_NEWNET:
        _loopback_up()


def _loopback_up() -> None:
    """Bring ``lo`` up: code that talks to itself over 127.0.0.1 keeps working."""
    import fcntl
    import socket
    import struct

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sh22x", b"lo", 0)
        flags = struct.unpack_from("h", fcntl.ioctl(sock.fileno(), _SIOCGIFFLAGS, request), 16)[0]
        fcntl.ioctl(sock.fileno(), _SIOCSIFFLAGS, struct.pack("16sh22x", b"lo", flags | _IFF_UP))


def _restrict_writes(paths: list[str], abi: int, *, scope: bool = False) -> None:
    """Landlock: every kind of write is refused except beneath ``paths``.

    ``scope`` (ABI >= 6) also confines signals and abstract Unix sockets to
    this worker's own Landlock domain (itself and what it starts): the
    sandbox's code cannot signal another pool's workers of the same user.
    """
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    handled = _FS_WRITE_FILE | _FS_REMOVE_DIR | _FS_REMOVE_FILE | _FS_MAKE_ALL
    if abi >= 2:
        handled |= _FS_REFER
    if abi >= 3:
        handled |= _FS_TRUNCATE
    file_rights = handled & (_FS_WRITE_FILE | _FS_TRUNCATE)  # (all a non-directory may get)

    class RulesetAttr(ctypes.Structure):
        _fields_ = [
            ("handled_access_fs", ctypes.c_uint64),
            ("handled_access_net", ctypes.c_uint64),  # (ABI 4)
            ("scoped", ctypes.c_uint64),  # (ABI 6)
        ]

    class PathBeneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]

    scoped = _SCOPE_ABSTRACT_UNIX_SOCKET | _SCOPE_SIGNAL if scope and abi >= 6 else 0
    attr = RulesetAttr(handled, 0, scoped)
    size = ctypes.sizeof(attr) if scoped else 8  # (older kernels know the first field only)
    ruleset = _syscall(libc, _SYS_CREATE_RULESET, ctypes.byref(attr), size, 0)
    try:
        for path in [*paths, *filter(os.path.exists, _ALWAYS_WRITABLE)]:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            try:
                rights = handled if os.path.isdir(path) else file_rights
                rule = PathBeneath(rights, fd)
                _syscall(libc, _SYS_ADD_RULE, ruleset, _RULE_PATH_BENEATH, ctypes.byref(rule), 0)
            finally:
                os.close(fd)
        _prctl(libc, _PR_SET_NO_NEW_PRIVS, 1)
        _syscall(libc, _SYS_RESTRICT_SELF, ruleset, 0)
    finally:
        os.close(ruleset)


def _become_user(spec: dict[str, Any]) -> None:
    """Drop to the pool's user for good (we are root: the host checked)."""
    import ctypes

    uid, gid, name = int(spec["uid"]), int(spec["gid"]), spec.get("user")
    _prctl(ctypes.CDLL(None, use_errno=True), _PR_SET_NO_NEW_PRIVS, 1)
    if isinstance(name, str):
        os.initgroups(name, gid)
    else:
        os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    if os.getuid() != uid or os.geteuid() != uid or os.getegid() != gid:
        raise PermissionError(f"still uid {os.getuid()}/{os.geteuid()} after setuid({uid})")
    if isinstance(name, str):
        os.environ["USER"] = os.environ["LOGNAME"] = name
    home = spec.get("home")
    if isinstance(home, str):
        os.environ["HOME"] = home


def _set_rlimits(limits: dict[str, float], *, nproc: bool) -> None:
    def cap(which: int, value: int, hard: int | None = None) -> None:
        _, old_hard = resource.getrlimit(which)
        hard = value if hard is None else hard
        if old_hard != resource.RLIM_INFINITY:
            hard = min(hard, old_hard)
        resource.setrlimit(which, (min(value, hard), hard))

    if not limits:
        return
    cap(resource.RLIMIT_CORE, 0)  # a worker killed by SIGXCPU dumps no core
    if "memory_mb" in limits:
        # RLIMIT_DATA (heap, anonymous mappings, thread stacks), not RLIMIT_AS:
        # reserved but unused address space (malloc arenas) does not count.
        cap(resource.RLIMIT_DATA, int(limits["memory_mb"] * _MIB))
    if "cpu_seconds" in limits:
        seconds = max(1, int(-(-limits["cpu_seconds"] // 1)))
        cap(resource.RLIMIT_CPU, seconds, seconds + 2)  # SIGXCPU, then SIGKILL
    if "open_files" in limits:
        cap(resource.RLIMIT_NOFILE, int(limits["open_files"]))
    if "file_size_mb" in limits:
        cap(resource.RLIMIT_FSIZE, int(limits["file_size_mb"] * _MIB))
    if nproc and "processes" in limits:
        cap(resource.RLIMIT_NPROC, int(limits["processes"]))


# --- small helpers -------------------------------------------------------------------


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and what caused it (``raise ... from``, or raised while handling)."""
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and len(seen) < 8 and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def _fork_refused(exc: BaseException) -> bool:
    """A fork or thread start failed with EAGAIN (what RLIMIT_NPROC gives)."""
    for error in _chain(exc):
        if isinstance(error, OSError) and error.errno == errno.EAGAIN:
            return True
        if type(error) is RuntimeError:  # threading: "can't start new thread"
            return True
    return False


def _tasks_of(uid: int) -> int:
    """Tasks (threads included) whose real uid is ``uid``: what RLIMIT_NPROC counts.

    (From ``status``: a process that changed user is not dumpable, so its
    ``/proc`` directory belongs to root.)
    """
    count = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            with open(f"/proc/{entry}/status") as status:
                fields = dict(line.split(":", 1) for line in status if ":" in line)
            if int(fields["Uid"].split()[0]) == uid:
                count += int(fields["Threads"])
    return count


def _read_counter(path: str, key: str) -> int | None:
    try:
        with open(path) as lines:
            for line in lines:
                name, _, value = line.partition(" ")
                if name == key:
                    return int(value)
    except (OSError, ValueError):
        return None
    return None


def _write(path: str, text: str) -> None:
    with open(path, "w") as file:
        file.write(text)


def _unshare(flags: int) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(ctypes.c_int(flags)) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"unshare({flags:#x}): {os.strerror(code)}")


def _syscall(libc: Any, number: int, *args: Any) -> int:
    import ctypes

    converted = [arg if not isinstance(arg, int) else ctypes.c_long(arg) for arg in args]
    result = int(libc.syscall(ctypes.c_long(number), *converted))
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, f"syscall {number}: {os.strerror(code)}")
    return result


def _prctl(libc: Any, option: int, value: int) -> None:
    import ctypes

    if libc.prctl(option, ctypes.c_ulong(value), 0, 0, 0) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"prctl({option}): {os.strerror(code)}")


def _say(text: str) -> None:
    """A line on stderr (os.write: after a MemoryError, as little as possible allocates)."""
    with contextlib.suppress(OSError):
        os.write(2, f"snakepool worker {os.getpid()}: {text}\n".encode())
