"""Host side of worker isolation: the options, what this machine supports, the
refusal at pool start, the cgroups the workers join, and how a worker ended.

A pool's ``limits``, ``user``, ``network``, ``writable_paths`` and
``sandbox`` become an :class:`Isolation` (:func:`isolation_of`: the sandbox
profile filled in). :func:`prepare` runs at ``pool.start()``: it refuses
(:class:`IsolationUnavailable`, whose ``feature`` names the option) what the
machine cannot enforce, never running a worker less isolated than asked, and
makes the cgroup parents the workers' leaves go under. :func:`worker_env`
tells each worker what to apply (the worker side is
:mod:`snakepool.workers._isolation`). :class:`LimitWatch` reads, once a
worker has exited, which limit (if any) ended it, and cleans up after it.

See docs/isolation.md for what each setting stops and what it does not.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import logging
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

from ..errors import ConfigError, IsolationUnavailable
from ..workers._isolation import ENV_VAR, LIMIT_EXIT_CODES, LIMITS, cgroup_events

__all__ = [
    "LIMITS",
    "SANDBOX_LIMITS",
    "Cgroups",
    "Isolation",
    "LimitWatch",
    "Support",
    "check_options",
    "describe_support",
    "inherited_env",
    "isolation_of",
    "limit_watch",
    "parse_cgroups",
    "prepare",
    "refusals",
    "support",
    "worker_env",
]

_log = logging.getLogger("snakepool.isolation")

#: What ``sandbox=True`` limits, where ``limits`` does not say otherwise.
SANDBOX_LIMITS: Mapping[str, float] = {
    "memory_mb": 1024,
    "cpu_seconds": 600,
    "open_files": 256,
    "processes": 128,
    "file_size_mb": 256,
}
_INTEGER_LIMITS = ("open_files", "processes")
#: cgroup controllers used, by the limit they enforce.
_CONTROLLERS = {"memory_mb": "memory", "processes": "pids"}
_CGROUP_DIR = "snakepool"  # under the host's own cgroup: workers' leaves go in here
_NETNS_PROBE = (
    "import ctypes, os, sys\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    "flags = 0x40000000 if os.geteuid() == 0 else 0x50000000\n"  # NEWNET (| NEWUSER)
    "if libc.unshare(flags) != 0:\n"
    "    sys.exit(os.strerror(ctypes.get_errno()))\n"
)


class _Options(Protocol):
    """What this module reads of a ``PoolConfig`` (no import of it: it imports us)."""

    @property
    def name(self) -> str: ...
    @property
    def cwd(self) -> str | os.PathLike[str] | None: ...
    @property
    def limits(self) -> Mapping[str, float | None] | None: ...
    @property
    def user(self) -> str | int | None: ...
    @property
    def network(self) -> bool: ...
    @property
    def writable_paths(self) -> Sequence[str | os.PathLike[str]] | None: ...
    @property
    def sandbox(self) -> bool: ...


# --- the options -------------------------------------------------------------------------


def check_options(
    limits: object, user: object, network: object, writable_paths: object, sandbox: object
) -> None:
    """Type and value checks of the isolation options (``PoolConfig`` calls this)."""
    if limits is not None:
        if not isinstance(limits, Mapping):
            raise TypeError(f"limits must be a dict, got {type(limits).__name__}")
        for key, value in limits.items():
            _check_limit(key, value)
    if user is not None:
        if isinstance(user, bool) or not isinstance(user, str | int):
            raise TypeError(f"user must be a user name or a uid, got {type(user).__name__}")
        if user in ("", "root", "0", 0) or (isinstance(user, int) and user < 0):
            raise ValueError(f"user must name an unprivileged user (not root), got {user!r}")
    for name, value in (("network", network), ("sandbox", sandbox)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False, got {value!r}")
    if writable_paths is not None:
        if isinstance(writable_paths, str | bytes) or not isinstance(writable_paths, Sequence):
            raise TypeError("writable_paths must be a list of paths (or None: no restriction)")
        for entry in writable_paths:
            if not isinstance(entry, str | os.PathLike) or not os.fspath(entry):
                raise TypeError(f"writable_paths entries must be paths, got {entry!r}")


def _check_limit(key: object, value: object) -> None:
    if key not in LIMITS:
        from difflib import get_close_matches

        close = get_close_matches(str(key), LIMITS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown limit {key!r}{hint}; limits are: {', '.join(LIMITS)}")
    if value is None:  # (no limit: takes one of the sandbox's away)
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"limits[{key!r}] must be a number > 0 or None, got {value!r}")
    if value == float("inf"):
        raise ValueError(f"limits[{key!r}] must be finite (None: no limit), got {value!r}")
    if key in _INTEGER_LIMITS and value != int(value):
        raise ValueError(f"limits[{key!r}] must be a whole number, got {value!r}")


@dataclass(frozen=True)
class Isolation:
    """What a pool's workers run under, the sandbox profile filled in."""

    limits: Mapping[str, float] = field(default_factory=dict)
    user: str | int | None = None
    network: bool = True
    writable_paths: tuple[str, ...] | None = None
    #: A private writable directory per worker (TMPDIR and HOME): the sandbox's.
    scratch: bool = False

    @property
    def active(self) -> bool:
        return bool(
            self.limits
            or self.user is not None
            or not self.network
            or self.writable_paths is not None
            or self.scratch
        )


def isolation_of(config: _Options, *, euid: int | None = None) -> Isolation:
    """The isolation ``config`` asks for: its options over the sandbox profile, if set.

    The sandbox is every limit of ``SANDBOX_LIMITS`` (``limits`` may change
    or drop one: ``{"processes": None}``), ``user="nobody"`` when the host is
    root (else the host's own, unprivileged, user; ``user`` picks another),
    no network, and writes only to a private scratch directory, its TMPDIR
    and HOME (``writable_paths`` adds to it).
    """
    sandbox = config.sandbox
    limits: dict[str, float | None] = dict(SANDBOX_LIMITS) if sandbox else {}
    limits.update(config.limits or {})
    user = config.user
    if sandbox and user is None and (os.geteuid() if euid is None else euid) == 0:
        user = "nobody"
    writable, paths = config.writable_paths, None
    if writable is not None:  # (relative: to the workers' cwd)
        base = os.fspath(config.cwd) if config.cwd is not None else os.getcwd()
        paths = tuple(os.path.join(base, os.fspath(path)) for path in writable)
    return Isolation(
        limits={key: float(value) for key, value in limits.items() if value is not None},
        user=user,
        network=config.network and not sandbox,
        writable_paths=(paths or ()) if sandbox else paths,
        scratch=sandbox,
    )


# --- what this machine supports ------------------------------------------------------------


@dataclass(frozen=True)
class Cgroups:
    """Where the workers' cgroups can go: controller -> parent directory (or why not)."""

    parents: Mapping[str, str]
    versions: Mapping[str, int]
    missing: Mapping[str, str]


@dataclass(frozen=True)
class Support:
    """What isolation this machine offers (``None`` reasons: supported)."""

    linux: bool
    euid: int
    landlock_abi: int
    landlock_problem: str | None
    netns_problem: str | None
    cgroups: Cgroups


def support() -> Support:
    """This machine's support, probed once per process (the netns probe forks)."""
    return _support()


@functools.cache
def _support() -> Support:
    linux = sys.platform.startswith("linux")
    abi, landlock_problem = _landlock_abi() if linux else (0, "needs Linux")
    return Support(
        linux=linux,
        euid=os.geteuid() if hasattr(os, "geteuid") else -1,
        landlock_abi=abi,
        landlock_problem=landlock_problem,
        netns_problem=_netns_problem() if linux else "needs Linux",
        cgroups=_discover_cgroups() if linux else Cgroups({}, {}, {}),
    )


def _landlock_abi() -> tuple[int, str | None]:
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        abi = int(libc.syscall(ctypes.c_long(444), None, ctypes.c_size_t(0), ctypes.c_uint32(1)))
    except (OSError, AttributeError) as exc:
        return 0, f"cannot call landlock_create_ruleset: {exc}"
    if abi > 0:
        return abi, None
    code = ctypes.get_errno()
    if code == errno.ENOSYS:
        return 0, "this kernel has no Landlock (Linux >= 5.13 built with CONFIG_SECURITY_LANDLOCK)"
    if code == errno.EOPNOTSUPP:
        return 0, "Landlock is disabled at boot (add landlock to the lsm= kernel parameter)"
    return 0, f"landlock_create_ruleset failed: {os.strerror(code)}"


def _netns_problem() -> str | None:
    try:
        probe = subprocess.run(
            [sys.executable, "-S", "-c", _NETNS_PROBE],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot run the probe: {exc}"
    if probe.returncode == 0:
        return None
    why = (probe.stderr.strip().splitlines() or ["?"])[-1]
    if os.geteuid() == 0:
        return f"unshare(CLONE_NEWNET) failed: {why}"
    return (
        f"unshare(CLONE_NEWUSER|CLONE_NEWNET) failed: {why} (a host that is not root needs "
        "unprivileged user namespaces: sysctl kernel.unprivileged_userns_clone=1, "
        "user.max_user_namespaces > 0)"
    )


def _discover_cgroups() -> Cgroups:
    """Per controller: the parent directory of worker cgroups under the host's own."""
    try:
        with open("/proc/self/cgroup") as file:
            memberships = file.read()
        with open("/proc/self/mountinfo") as file:
            mounts = file.read()
    except OSError as exc:
        reason = f"cannot read /proc/self/cgroup or mountinfo: {exc}"
        return Cgroups({}, {}, dict.fromkeys(("memory", "pids"), reason))
    return parse_cgroups(memberships, mounts, _read_words)


def parse_cgroups(
    memberships: str, mountinfo: str, words: Callable[[str], set[str]] = lambda path: set()
) -> Cgroups:
    """:func:`_discover_cgroups` from the text of ``/proc/self/cgroup`` and
    ``/proc/self/mountinfo``; ``words(path)`` reads a v2 ``cgroup.controllers``."""
    v1_mounts: dict[str, tuple[str, str]] = {}
    v2_mount: tuple[str, str] | None = None
    for line in mountinfo.splitlines():
        fields = line.split()
        if "-" not in fields:
            continue
        dash = fields.index("-")
        fstype, root, point = fields[dash + 1], fields[3], fields[4]
        if fstype == "cgroup2":
            v2_mount = (root, point)
        elif fstype == "cgroup":
            for option in fields[dash + 3].split(","):
                v1_mounts[option] = (root, point)
    groups = [line.split(":", 2) for line in memberships.splitlines() if line.count(":") >= 2]
    v2_dir = next((_under(v2_mount, p) for h, _, p in groups if h == "0" and v2_mount), None)
    v2_controllers = words(os.path.join(v2_dir, "cgroup.controllers")) if v2_dir else set()
    parents: dict[str, str] = {}
    versions: dict[str, int] = {}
    missing: dict[str, str] = {}
    for controller in ("memory", "pids"):
        v1_path = next((p for _, names, p in groups if controller in names.split(",")), None)
        if v2_dir is not None and controller in v2_controllers:
            parents[controller] = os.path.join(v2_dir, _CGROUP_DIR)
            versions[controller] = 2
        elif controller in v1_mounts and v1_path is not None:
            parents[controller] = os.path.join(_under(v1_mounts[controller], v1_path), _CGROUP_DIR)
            versions[controller] = 1
        else:
            missing[controller] = f"no cgroup {controller!r} controller for this process"
    return Cgroups(parents, versions, missing)


def _under(mount: tuple[str, str], path: str) -> str:
    root, point = mount
    relative = os.path.relpath(path, root) if root != "/" else path.lstrip("/")
    return os.path.normpath(os.path.join(point, relative))


def _read_words(path: str) -> set[str]:
    try:
        with open(path) as file:
            return set(file.read().split())
    except OSError:
        return set()


# --- refusing, preparing -------------------------------------------------------------------


def refusals(isolation: Isolation, machine: Support, *, euid: int) -> list[tuple[str, str]]:
    """``(feature, why)`` for each part of ``isolation`` this machine cannot enforce.

    ``euid`` is the host's effective uid (a parameter, so that the answer for
    a host that is not root can be checked as root).
    """
    found: list[tuple[str, str]] = []
    if not isolation.active:
        return found
    if not machine.linux:
        return [("platform", f"isolation needs Linux; this is {sys.platform}")]
    if isolation.user is not None and euid != 0:
        found.append(
            (
                "user",
                f"user={isolation.user!r} needs a host running as root (this one is uid "
                f"{euid}): only root can run its workers as another user; leave user unset "
                f"(the workers then run as uid {euid})",
            )
        )
    if not isolation.network and machine.netns_problem is not None:
        found.append(
            ("network", f"network=False needs network namespaces: {machine.netns_problem}")
        )
    if (
        isolation.writable_paths is not None or isolation.scratch
    ) and machine.landlock_problem is not None:
        found.append(
            ("writable_paths", f"restricting writes needs Landlock: {machine.landlock_problem}")
        )
    if "processes" in isolation.limits and "pids" not in _cgroups.ready:
        problem = _nproc_problem(isolation, machine, euid)
        if problem is not None:
            why = _cgroups.problems.get("pids") or machine.cgroups.missing.get("pids", "?")
            found.append(
                (
                    "limits.processes",
                    f"limits['processes'] needs a pids cgroup ({why}), or {problem}",
                )
            )
    return found


def _nproc_problem(isolation: Isolation, machine: Support, euid: int) -> str | None:
    """Why RLIMIT_NPROC cannot stand in for a pids cgroup here (None: it can).

    It binds no root process. A host that is not root gives each worker a user
    namespace of its own, where it counts that worker's processes; a root host's
    ``user=`` workers share their user's count.
    """
    if euid != 0:
        if machine.netns_problem is None:  # (the probe made a user namespace too)
            return None
        return f"unprivileged user namespaces ({machine.netns_problem})"
    if isolation.user is not None:
        return None
    return "user=... (RLIMIT_NPROC then counts every process of that user; root is exempt)"


class _Prepared:
    """The cgroup parents this process made ready (and why others could not be)."""

    def __init__(self) -> None:
        self.ready: dict[str, str] = {}  # controller -> parent directory
        self.problems: dict[str, str] = {}  # controller -> why it is not ready


_cgroups = _Prepared()


def prepare(config: _Options, *, euid: int | None = None) -> Isolation:
    """At pool start: refuse what cannot be enforced, make the cgroup parents.

    Raises :class:`IsolationUnavailable` (its ``feature`` names the option).
    """
    isolation = isolation_of(config, euid=euid)
    if not isolation.active:
        return isolation
    euid = os.geteuid() if euid is None else euid
    machine = support()
    if isolation.user is not None:
        _resolve_user(isolation.user)  # (no such user: refused here, by name)
    for limit, controller in _CONTROLLERS.items():
        if limit in isolation.limits and machine.linux:
            _prepare_cgroup(controller, machine.cgroups)
    problems = refusals(isolation, machine, euid=euid)
    if problems:
        feature, why = problems[0]
        more = "".join(f"; also {f}: {w}" for f, w in problems[1:])
        raise IsolationUnavailable(
            f"pool {config.name!r}: cannot isolate its workers as asked: {why}{more}",
            feature=feature,
        )
    for path in isolation.writable_paths or ():
        if not os.path.exists(path):
            raise ConfigError(
                f"pool {config.name!r}: writable_paths entry {path!r} does not exist",
                pool=config.name,
                key="writable_paths",
            )
    if isolation.scratch:
        _scratch_base(create=True)
    if isolation.user is not None:
        _warn_if_unreadable(isolation.user)
    _sweep()
    return isolation


def _prepare_cgroup(controller: str, groups: Cgroups) -> None:
    """Make ``controller``'s parent (v2: with the controller enabled down to it)."""
    parent = groups.parents.get(controller)
    if parent is None or controller in _cgroups.ready:
        return
    try:
        if groups.versions[controller] == 2:
            _enable(os.path.dirname(parent), controller)
            os.makedirs(parent, exist_ok=True)
            _enable(parent, controller)
        else:
            os.makedirs(parent, exist_ok=True)
    except OSError as exc:
        hint = ""
        if exc.errno == errno.EBUSY:
            hint = (
                " (cgroup v2 lets only leaf cgroups hold processes, and the host's holds the "
                "host: run it in a cgroup of its own below a delegated one)"
            )
        _cgroups.problems[controller] = f"cannot prepare {parent}: {exc.strerror or exc}{hint}"
        return
    _cgroups.ready[controller] = parent
    _cgroups.problems.pop(controller, None)


def _enable(directory: str, controller: str) -> None:
    if controller in _read_words(os.path.join(directory, "cgroup.subtree_control")):
        return
    with open(os.path.join(directory, "cgroup.subtree_control"), "w") as file:
        file.write(f"+{controller}")


class _User(NamedTuple):
    uid: int
    gid: int
    name: str | None  # (None: a uid no passwd entry names)
    home: str | None


def _resolve_user(user: str | int) -> _User:
    """Who ``user`` is on this machine (a uid without a passwd entry: its own gid)."""
    numeric = isinstance(user, int) or user.isdigit()
    try:
        entry = pwd.getpwuid(int(user)) if numeric else pwd.getpwnam(str(user))
    except KeyError:
        if numeric:
            return _User(int(user), int(user), None, None)
        raise IsolationUnavailable(
            f"user={user!r}: no such user on this machine", feature="user"
        ) from None
    return _User(entry.pw_uid, entry.pw_gid, entry.pw_name, entry.pw_dir)


def _warn_if_unreadable(user: str | int) -> None:
    """A user that cannot read the standard library fails every import not made before."""
    uid, gid, _, _ = _resolve_user(user)
    stdlib = sysconfig.get_paths()["stdlib"]
    if not _readable(stdlib, uid, gid):
        _log.warning(
            "user=%r cannot read %s (this interpreter's standard library): workers that "
            "import a module their template did not already import will fail; make it "
            "readable, or preload those modules",
            user,
            stdlib,
        )


def _readable(path: str, uid: int, gid: int) -> bool:
    """Can ``uid``/``gid`` reach and read ``path`` (by mode bits)?"""
    current = "/"
    for part in [*os.path.abspath(path).split(os.sep)[1:], None]:
        try:
            info = os.stat(current)
        except OSError:
            return False
        need = stat.S_IXOTH if part is not None else stat.S_IROTH
        shift = 6 if info.st_uid == uid else 3 if info.st_gid == gid else 0
        if not (info.st_mode >> shift) & need:
            return False
        if part is not None:
            current = os.path.join(current, part)
    return True


def _scratch_base(*, create: bool = False) -> str:
    """The directory of the sandbox's per-worker scratch directories (root's, 0711)."""
    base = os.path.join(tempfile.gettempdir(), f"snakepool-scratch-{os.geteuid()}")
    if create:
        with contextlib.suppress(FileExistsError):
            os.mkdir(base, 0o711)
        info = os.lstat(base)
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
            raise IsolationUnavailable(
                f"{base} is not a directory of this user; remove it", feature="writable_paths"
            )
        if stat.S_IMODE(info.st_mode) != 0o711:
            os.chmod(base, 0o711)
    return base


def _sweep() -> None:
    """Remove dead workers' leftovers (cgroups, scratch directories) of this machine."""
    for parent in _cgroups.ready.values():
        _remove_dead(parent, os.rmdir)
    base = _scratch_base()
    if os.path.isdir(base):
        _remove_dead(base, functools.partial(shutil.rmtree, ignore_errors=True))


def _remove_dead(parent: str, remove: Any) -> None:
    with contextlib.suppress(OSError):
        for entry in os.listdir(parent):
            if entry.startswith("w") and entry[1:].isdigit() and not _alive(int(entry[1:])):
                with contextlib.suppress(OSError):
                    remove(os.path.join(parent, entry))


def _alive(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}")


def describe_support() -> dict[str, str]:
    """Feature -> what this machine offers for it, one line each (``snakepool doctor``).

    Makes the cgroup parents it reports on, as a pool asking for them would.
    """
    machine = support()
    if not machine.linux:
        return dict.fromkeys(("limits", "user", "network", "writable_paths"), "no (needs Linux)")
    for controller in _CONTROLLERS.values():
        _prepare_cgroup(controller, machine.cgroups)
    ready = ", ".join(
        f"{name} (cgroup v{machine.cgroups.versions[name]})" for name in sorted(_cgroups.ready)
    )
    missing = {**machine.cgroups.missing, **_cgroups.problems}
    not_ready = "; ".join(f"{name}: {why}" for name, why in sorted(missing.items()))
    limits = "yes: memory_mb, cpu_seconds, open_files, file_size_mb by setrlimit"
    limits += f"; cgroup controllers: {ready or 'none'}" + (
        f" (not {not_ready})" if not_ready else ""
    )
    as_root = refusals(Isolation(limits={"processes": 1.0}), machine, euid=machine.euid)
    limits += "; processes: " + (
        f"only with user=... ({as_root[0][1]})" if as_root else "yes (pids cgroup)"
    )
    sandbox = Isolation(
        limits=SANDBOX_LIMITS,
        user="nobody" if machine.euid == 0 else None,
        network=False,
        writable_paths=(),
        scratch=True,
    )
    lacking = refusals(sandbox, machine, euid=machine.euid)
    return {
        "limits": limits,
        "user": "yes (the host runs as root)"
        if machine.euid == 0
        else f"no (needs a root host; this one is uid {machine.euid})",
        "network": "yes (network namespaces)"
        if machine.netns_problem is None
        else f"no ({machine.netns_problem})",
        "writable_paths": f"yes (Landlock ABI {machine.landlock_abi})"
        if machine.landlock_problem is None
        else f"no ({machine.landlock_problem})",
        "sandbox": "yes" if not lacking else "no: " + "; ".join(why for _, why in lacking),
    }


# --- the worker's side of it ---------------------------------------------------------------


#: What a sandbox's workers (and their template) inherit of the host's environment:
#: what finding programs, libraries and the locale takes. Secrets the host holds in
#: its environment (API keys, tokens) stay out: the sandbox's code could read them.
_SANDBOX_ENV = ("PATH", "LANG", "LANGUAGE", "TZ", "LD_LIBRARY_PATH", "VIRTUAL_ENV")
_SANDBOX_ENV_PREFIXES = ("LC_", "PYTHON", "SNAKEPOOL_")


def inherited_env(config: _Options) -> dict[str, str]:
    """The host's environment as ``config``'s workers inherit it (the pool's ``env``
    is added after): all of it, but for a sandbox only ``_SANDBOX_ENV``."""
    if not config.sandbox:
        return dict(os.environ)
    return {
        name: value
        for name, value in os.environ.items()
        if name in _SANDBOX_ENV or name.startswith(_SANDBOX_ENV_PREFIXES)
    }


def worker_env(config: _Options) -> dict[str, str]:
    """``{SNAKEPOOL_ISOLATION: spec}`` for a worker of ``config`` (``{}``: none asked)."""
    isolation = isolation_of(config)
    if not isolation.active:
        return {}
    spec: dict[str, Any] = {
        "limits": dict(isolation.limits),
        "network": isolation.network,
        "cgroups": {
            controller: parent
            for limit, controller in _CONTROLLERS.items()
            if limit in isolation.limits and (parent := _cgroups.ready.get(controller)) is not None
        },
    }
    spec["nproc"] = "processes" in isolation.limits and "pids" not in spec["cgroups"]
    spec["userns"] = spec["nproc"] and os.geteuid() != 0  # (so that it counts per worker)
    if isolation.writable_paths is not None or isolation.scratch:
        spec["writable"] = list(isolation.writable_paths or ())
        spec["landlock_abi"] = support().landlock_abi
    if isolation.scratch:
        spec["scratch"] = _scratch_base()
        spec["landlock_scope"] = True  # (signals, abstract sockets: this worker's own only)
    if isolation.user is not None:
        uid, gid, name, home = _resolve_user(isolation.user)
        spec.update(uid=uid, gid=gid, user=name, home=home)
    return {ENV_VAR: json.dumps(spec)}


class LimitWatch:
    """Which limit, if any, ended a worker; and its cgroups and scratch cleaned up."""

    def __init__(self, spec: Mapping[str, Any]) -> None:
        self.limits: Mapping[str, float] = spec.get("limits") or {}
        self.cgroups: Mapping[str, str] = spec.get("cgroups") or {}
        self.scratch: str | None = spec.get("scratch")

    def crossed(self, pid: int | None, exit_code: int | None) -> str | None:
        """The limit behind ``exit_code`` (read once the worker has exited), or None."""
        if pid is None:
            return None
        leaves = {name: os.path.join(parent, f"w{pid}") for name, parent in self.cgroups.items()}
        limit = self._from_exit(exit_code)
        if (
            limit is None
            and exit_code == -signal.SIGKILL
            and "memory_mb" in self.limits
            and cgroup_events(leaves).get("memory_mb", 0) > 0
        ):
            limit = "memory_mb"  # the OOM killer, inside the worker's cgroup
        for leaf in dict.fromkeys(leaves.values()):
            with contextlib.suppress(OSError):
                os.rmdir(leaf)  # (busy while a descendant dies: swept later)
        if self.scratch is not None:
            shutil.rmtree(os.path.join(self.scratch, f"w{pid}"), ignore_errors=True)
        return limit

    def _from_exit(self, exit_code: int | None) -> str | None:
        for limit, code in LIMIT_EXIT_CODES.items():
            if exit_code == code and limit in self.limits:
                return limit
        if exit_code == -signal.SIGXCPU and "cpu_seconds" in self.limits:
            return "cpu_seconds"
        if exit_code == -signal.SIGXFSZ and "file_size_mb" in self.limits:
            return "file_size_mb"
        return None


def limit_watch(env: Mapping[str, str]) -> LimitWatch | None:
    """The watch for a worker started with ``env`` (None: it has no isolation)."""
    text = env.get(ENV_VAR)
    return LimitWatch(json.loads(text)) if text else None
