"""Isolation and kernel-enforced limits (issue 23): each setting is crossed by a real
worker. A crossed limit fails the call with ``ResourceExceeded`` naming it, the worker
is replaced and the pool carries on; what the machine cannot enforce is refused at
``start()`` with ``IsolationUnavailable`` (kind ``isolation_unavailable``).

Tests skip only where this kernel or host lacks the feature, and say which.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import snakepool
from snakepool import IsolationUnavailable, Pool, RemoteError, ResourceExceeded
from snakepool.cli import main as cli_main
from snakepool.errors import ConfigError
from snakepool.pool import _isolation
from snakepool.pool._isolation import Isolation, isolation_of, parse_cgroups, refusals, support
from waiting import wait_until

pytestmark = pytest.mark.anyio

LIMITS = "sp_isolation:Limits"
MACHINE = support()
ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="needs a root host (switching users)")
needs_netns = pytest.mark.skipif(
    MACHINE.netns_problem is not None, reason=f"no network namespaces: {MACHINE.netns_problem}"
)
needs_landlock = pytest.mark.skipif(
    MACHINE.landlock_problem is not None, reason=f"no Landlock: {MACHINE.landlock_problem}"
)


def _cgroup(controller: str) -> str | None:
    """Why this host cannot give workers a ``controller`` cgroup, or None."""
    _isolation._prepare_cgroup(controller, MACHINE.cgroups)
    if controller in _isolation._cgroups.ready:
        return None
    return _isolation._cgroups.problems.get(controller) or MACHINE.cgroups.missing.get(
        controller, "?"
    )


@pytest.fixture
def tcp_server() -> Iterator[int]:
    """A listening TCP socket on the host's 127.0.0.1 (connects complete in the backlog)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    try:
        yield server.getsockname()[1]
    finally:
        server.close()


async def _crossed(pool: Pool, command: str, args: dict[str, Any], limit: str) -> None:
    """``command`` crosses ``limit``: ResourceExceeded naming it, then a fresh worker serves."""
    before = await pool.call("ping_pid")
    with pytest.raises(ResourceExceeded) as info:
        await pool.call(command, args, timeout=60)
    assert info.value.limit == limit
    assert info.value.kind == "resource_exceeded"
    assert f"limits[{limit!r}]" in str(info.value)
    after = await pool.call("ping_pid", timeout=60)  # the pool carries on
    assert after != before
    assert pool.statistics().workers[0].restarts >= 1
    assert pool.statistics().failed.get("resource", 0) >= 1


# --- the limits ------------------------------------------------------------------------------


async def test_memory_mb_refuses_an_allocation_beyond_it() -> None:
    async with Pool(LIMITS, size=1, limits={"memory_mb": 256}) as pool:
        limits = await pool.call("rlimits")
        assert limits["RLIMIT_DATA"][0] == 256 * 2**20
        assert await pool.call("allocate", {"mb": 32}) == 32 * 2**20  # under it: fine
        await _crossed(pool, "allocate", {"mb": 1024}, "memory_mb")


async def test_memory_mb_covers_the_workers_children() -> None:
    """With a memory cgroup, the worker and its children share the one budget:
    four children of 80 MiB each stay under their own limit but not under the tree's."""
    problem = _cgroup("memory")
    if problem is not None:
        pytest.skip(f"this host cannot give workers a memory cgroup: {problem}")
    async with Pool(LIMITS, size=1, limits={"memory_mb": 200}) as pool:
        assert await pool.call("children_allocate", {"n": 1, "mb": 40}) == [0]  # under it
        await _crossed(pool, "children_allocate", {"n": 4, "mb": 80}, "memory_mb")


async def test_memory_mb_oom_kill_of_the_worker_itself() -> None:
    """Memory RLIMIT_DATA does not count (shared) is the cgroup's: its OOM killer ends the
    worker, and the host reads the kill in the cgroup's events."""
    problem = _cgroup("memory")
    if problem is not None:
        pytest.skip(f"this host cannot give workers a memory cgroup: {problem}")
    async with Pool(LIMITS, size=1, limits={"memory_mb": 128}) as pool:
        await _crossed(pool, "share", {"mb": 512}, "memory_mb")


async def test_cpu_seconds_ends_a_worker_that_burns_more() -> None:
    async with Pool(LIMITS, size=1, limits={"cpu_seconds": 1}) as pool:
        assert (await pool.call("rlimits"))["RLIMIT_CPU"][0] == 1
        await _crossed(pool, "spin", {"seconds": 60}, "cpu_seconds")


async def test_open_files() -> None:
    async with Pool(LIMITS, size=1, limits={"open_files": 64}) as pool:
        assert await pool.call("open_files", {"n": 8}) == 8
        await _crossed(pool, "open_files", {"n": 200}, "open_files")


async def test_processes_with_a_pids_cgroup() -> None:
    problem = _cgroup("pids")
    if problem is not None:
        pytest.skip(f"this host cannot give workers a pids cgroup: {problem}")
    async with Pool(LIMITS, size=1, limits={"processes": 16}) as pool:
        assert await pool.call("fork", {"n": 3}) == 3
        await _crossed(pool, "fork", {"n": 40}, "processes")


@needs_root
async def test_processes_without_cgroups_binds_a_user_by_rlimit_nproc(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No pids cgroup: workers that are not root get RLIMIT_NPROC (per user)."""
    monkeypatch.setattr(_isolation, "_cgroups", _isolation._Prepared())
    monkeypatch.setattr(_isolation, "_prepare_cgroup", lambda controller, groups: None)
    async with Pool(
        LIMITS, size=1, user="nobody", limits={"processes": 24}, start_method="forkserver"
    ) as pool:
        assert (await pool.call("rlimits"))["RLIMIT_NPROC"][0] == 24
        await _crossed(pool, "fork", {"n": 60}, "processes")


#: A worker's isolation as a host that is not root applies it: imports first, then
#: it becomes an ordinary process of uid 4242 (dumpable, as one exec'd so would be).
_UNPRIVILEGED_WORKER = """
import ctypes, encodings.idna, json, os, socket, sys, time
from snakepool.workers import _isolation
os.setgroups([]); os.setgid(4242); os.setuid(4242)
ctypes.CDLL(None).prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE
try:
    _isolation._apply(json.loads(sys.argv[1]))
except OSError as exc:
    print(json.dumps({"unsupported": str(exc)})); sys.exit()
started = []
try:
    for _ in range(20):
        pid = os.fork()
        if pid == 0:
            time.sleep(30); os._exit(0)
        started.append(pid)
except OSError as exc:
    refused = exc.errno
for pid in started:
    os.kill(pid, 9); os.waitpid(pid, 0)
try:
    socket.create_connection(("127.0.0.1", int(sys.argv[2])), timeout=5).close()
    network = "connected"
except OSError as exc:
    network = type(exc).__name__
print(json.dumps({"forks": len(started), "refused": refused, "network": network,
                  "uid": os.getuid(), "nproc": _isolation.resource.getrlimit(6)[0]}))
"""


@needs_root
def test_a_host_that_is_not_root_gives_each_worker_a_user_namespace(tcp_server: int) -> None:
    """``processes`` without a pids cgroup, and ``network=False``, as a host that is not
    root has its workers apply them: RLIMIT_NPROC in a user namespace of the worker's
    own counts the worker's processes only (its user has 5 more outside)."""
    spec = {"limits": {"processes": 6}, "nproc": True, "userns": True, "network": False}
    outside = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import os, time; os.setgid(4242); os.setuid(4242); time.sleep(30)",
            ]
        )
        for _ in range(5)
    ]
    try:
        run = subprocess.run(
            [sys.executable, "-c", _UNPRIVILEGED_WORKER, json.dumps(spec), str(tcp_server)],
            capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
    finally:
        for process in outside:
            process.kill()
            process.wait()
    found = json.loads(run.stdout)
    if "unsupported" in found:
        pytest.skip(f"no unprivileged user namespaces here: {found['unsupported']}")
    assert found["uid"] == 4242 and found["nproc"] == 6
    assert found["forks"] == 5  # 6 tasks: the worker and five children, in its namespace
    assert found["refused"] == errno.EAGAIN
    assert found["network"] == "ConnectionRefusedError"  # its own loopback


async def test_processes_for_root_workers_without_cgroups_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_isolation, "_cgroups", _isolation._Prepared())
    monkeypatch.setattr(_isolation, "_prepare_cgroup", lambda controller, groups: None)
    pool = Pool(LIMITS, size=1, limits={"processes": 8})
    with pytest.raises(IsolationUnavailable) as info:
        if ROOT:
            await pool.start()
        else:  # (not root: RLIMIT_NPROC binds these workers; check the root host's answer)
            _isolation.prepare(pool.config, euid=0)
    await pool.aclose()
    assert info.value.feature == "limits.processes"
    assert info.value.kind == "isolation_unavailable"
    assert "pids cgroup" in str(info.value)


async def test_file_size_mb(tmp_path: Path) -> None:
    async with Pool(LIMITS, size=1, limits={"file_size_mb": 2}) as pool:
        assert await pool.call("write_mb", {"path": str(tmp_path / "small"), "mb": 1}) == 1
        await _crossed(pool, "write_mb", {"path": str(tmp_path / "big"), "mb": 8}, "file_size_mb")
    assert (tmp_path / "big").stat().st_size == 2 * 2**20  # the kernel stopped it there


# --- user, network, filesystem -----------------------------------------------------------------


@needs_root
async def test_user_nobody() -> None:
    async with Pool(LIMITS, size=1, user="nobody") as pool:
        who = await pool.call("whoami")
    nobody = _isolation._resolve_user("nobody")
    assert (who["uid"], who["euid"], who["gid"]) == (nobody.uid, nobody.uid, nobody.gid)
    assert 0 not in who["groups"]


def test_user_is_refused_unless_the_host_is_root() -> None:
    isolation = Isolation(user="nobody")
    problems = refusals(isolation, MACHINE, euid=1000)
    assert [feature for feature, _ in problems] == ["user"]
    assert "needs a host running as root (this one is uid 1000)" in problems[0][1]
    config = Pool(LIMITS, user="nobody").config
    with pytest.raises(IsolationUnavailable) as info:
        _isolation.prepare(config, euid=1000)
    assert info.value.feature == "user"
    assert refusals(isolation, MACHINE, euid=0) == []


async def test_an_unknown_user_is_refused_at_start() -> None:
    pool = Pool(LIMITS, size=1, user="no-such-user-here")
    with pytest.raises(IsolationUnavailable, match="no such user") as info:
        await pool.start()
    await pool.aclose()
    assert info.value.feature == "user"


@needs_netns
@pytest.mark.parametrize("start_method", ["auto", "spawn"])
async def test_network_false(tcp_server: int, start_method: str) -> None:
    async with Pool(LIMITS, size=1, start_method=start_method) as pool:
        assert await pool.call("connect", {"port": tcp_server}) == "connected"  # (the control)
    async with Pool(LIMITS, size=1, network=False, start_method=start_method) as pool:
        with pytest.raises(RemoteError) as info:
            await pool.call("connect", {"port": tcp_server})
        # Refused: its 127.0.0.1 is a loopback of its own, where nobody listens.
        assert isinstance(info.value, ConnectionRefusedError)
        assert await pool.call("ping_pid") > 0  # while the protocol to the host works


@needs_landlock
@pytest.mark.parametrize("start_method", ["auto", "spawn"])
async def test_writable_paths(tmp_path: Path, start_method: str) -> None:
    inside, outside = tmp_path / "inside", tmp_path / "outside"
    inside.mkdir()
    outside.mkdir()
    async with Pool(
        LIMITS, size=1, writable_paths=[str(inside)], start_method=start_method
    ) as pool:
        assert await pool.call("write", {"path": str(inside / "a")}) == str(inside / "a")
        with pytest.raises(PermissionError):
            await pool.call("write", {"path": str(outside / "b")})
        with pytest.raises(PermissionError):
            await pool.call("write", {"path": str(tmp_path / "c")})
    assert (inside / "a").read_text() == "hi"
    assert not (outside / "b").exists() and not (tmp_path / "c").exists()


async def test_a_writable_path_that_does_not_exist_is_a_config_error(tmp_path: Path) -> None:
    pool = Pool(LIMITS, size=1, writable_paths=[str(tmp_path / "missing")])
    with pytest.raises(ConfigError, match="does not exist") as info:
        await pool.start()
    await pool.aclose()
    assert info.value.key == "writable_paths"


# --- the sandbox -----------------------------------------------------------------------------


@needs_netns
@needs_landlock
async def test_sandbox_with_the_generic_adapters_call(tcp_server: int, tmp_path: Path) -> None:
    if not ROOT:
        pytest.skip("the sandbox as the host's own user: this test checks the switch to nobody")

    def call(function: str, **args: Any) -> Any:
        return pool.call("call", {"target": f"sp_isolation:{function}", "args": args})

    async with Pool(
        "generic",
        size=1,
        sandbox=True,
        preload=["sp_isolation"],
        adapter_config={"allow": ["sp_isolation"]},
    ) as pool:
        who = await call("whoami")
        assert who["uid"] != 0 and who["euid"] != 0
        scratch = Path(who["tmp"])
        assert who["home"] == str(scratch) and scratch.name == f"w{who['pid']}"
        assert await call("write", path=str(scratch / "mine")) == str(scratch / "mine")
        with pytest.raises(PermissionError):
            await call("write", path=str(tmp_path / "escape"))
        with pytest.raises(ConnectionRefusedError):  # (a loopback of its own: nobody listens)
            await call("connect", port=tcp_server)
        limits = await call("rlimits")
        assert limits["RLIMIT_NOFILE"][0] == _isolation.SANDBOX_LIMITS["open_files"]
        with pytest.raises(ResourceExceeded) as info:
            await call("allocate", mb=4096)
        assert info.value.limit == "memory_mb"
        again = await call("whoami")  # a fresh worker, just as isolated
        assert again["pid"] != who["pid"] and again["uid"] == who["uid"]
        await wait_until(lambda: not scratch.exists())  # the dead worker's scratch is gone
    assert not (tmp_path / "escape").exists()


@needs_landlock
async def test_sandbox_hides_the_hosts_environment_and_other_workers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if not ROOT:
        pytest.skip("checks two sandboxed workers of one user (nobody): needs a root host")
    if MACHINE.landlock_abi < 6:
        pytest.skip(f"Landlock ABI {MACHINE.landlock_abi} cannot scope signals (needs 6)")
    monkeypatch.setenv("SP_TEST_SECRET_TOKEN", "hunter2")
    options: dict[str, Any] = {
        "size": 2,
        "preload": ["sp_isolation"],
        "adapter_config": {"allow": ["sp_isolation"]},
        "env": {"SP_TEST_GIVEN": "1"},
    }
    # (the control: two workers of one user may signal each other)
    async with Pool("generic", user="nobody", **options) as pool:
        pids = [worker.pid for worker in pool.statistics().workers]
        others = await pool.call("call", {"target": "sp_isolation:signal_others", "args": [pids]})
        assert len(others) == 1
        assert "SP_TEST_SECRET_TOKEN" in await pool.call("call", {"target": "sp_isolation:environ"})
    async with Pool("generic", sandbox=True, **options) as pool:
        pids = [worker.pid for worker in pool.statistics().workers]
        with pytest.raises(PermissionError):
            await pool.call("call", {"target": "sp_isolation:signal_others", "args": [pids]})
        seen = await pool.call("call", {"target": "sp_isolation:environ"})
    assert "SP_TEST_SECRET_TOKEN" not in seen
    assert seen["SP_TEST_GIVEN"] == "1" and "PATH" in seen


def test_sandbox_profile_and_what_overrides_it() -> None:
    config = Pool("generic", sandbox=True, limits={"processes": None, "memory_mb": 64}).config
    isolation = isolation_of(config, euid=0)
    assert isolation.user == "nobody" and not isolation.network and isolation.scratch
    assert isolation.writable_paths == ()
    assert "processes" not in isolation.limits and isolation.limits["memory_mb"] == 64
    assert isolation.limits["open_files"] == _isolation.SANDBOX_LIMITS["open_files"]
    assert isolation_of(config, euid=1000).user is None  # the host's own, unprivileged, user
    assert not isolation_of(Pool("generic").config).active


# --- refusals and bad options -------------------------------------------------------------------


async def test_what_the_machine_cannot_do_is_refused_at_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    lacking = dataclasses.replace(
        MACHINE, netns_problem="unshare(CLONE_NEWNET) failed: EPERM", landlock_problem="no"
    )
    monkeypatch.setattr(_isolation, "support", lambda: lacking)
    for options, feature in (({"network": False}, "network"), ({"writable_paths": []}, None)):
        pool = Pool(LIMITS, size=1, **options)
        with pytest.raises(IsolationUnavailable) as info:
            await pool.start()
        await pool.aclose()
        assert info.value.feature == (feature or "writable_paths")
        assert isinstance(info.value, snakepool.WorkerStartError)
        assert pool.statistics().workers[0].pid is None  # no worker ran less isolated


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"limits": {"memory": 5}}, ValueError, "did you mean 'memory_mb'"),
        ({"limits": {"open_files": 0}}, ValueError, r"limits\['open_files'\] must be a number > 0"),
        ({"limits": {"processes": 1.5}}, ValueError, "whole number"),
        ({"limits": {"processes": float("inf")}}, ValueError, "finite"),
        ({"limits": {"cpu_seconds": True}}, ValueError, "cpu_seconds"),
        ({"limits": [1]}, TypeError, "limits must be a dict"),
        ({"user": "root"}, ValueError, "unprivileged user"),
        ({"user": 1.5}, TypeError, "user name or a uid"),
        ({"network": "no"}, TypeError, "network must be True or False"),
        ({"writable_paths": "/tmp"}, TypeError, "list of paths"),
        ({"sandbox": 1}, TypeError, "sandbox must be True or False"),
    ],
)
def test_bad_options_are_named(options: dict[str, Any], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        Pool("generic", **options)


_V2_MOUNTINFO = "35 24 0:30 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"
_HYBRID_MOUNTINFO = (
    "31 23 0:28 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n"
    "35 31 0:32 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"
    "39 31 0:36 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids\n"
    "41 31 0:38 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n"
)


def test_cgroup_parents_are_found_below_the_hosts_cgroup() -> None:
    """(Parsing only: v2 is what hosts mostly have; this test machine may not.)"""
    v2 = parse_cgroups(
        "0::/system.slice/app.service\n", _V2_MOUNTINFO, lambda path: {"cpu", "memory", "pids"}
    )
    parent = "/sys/fs/cgroup/system.slice/app.service/snakepool"
    assert v2.parents == {"memory": parent, "pids": parent}
    assert v2.versions == {"memory": 2, "pids": 2} and not v2.missing
    no_controllers = parse_cgroups("0::/\n", _V2_MOUNTINFO, lambda path: {"cpu"})
    assert set(no_controllers.missing) == {"memory", "pids"} and not no_controllers.parents
    hybrid = parse_cgroups(
        "8:pids:/\n4:memory:/box/a1\n0::/\n", _HYBRID_MOUNTINFO, lambda path: {"hugetlb"}
    )
    assert hybrid.parents == {
        "memory": "/sys/fs/cgroup/memory/box/a1/snakepool",
        "pids": "/sys/fs/cgroup/pids/snakepool",
    }
    assert hybrid.versions == {"memory": 1, "pids": 1}


def test_doctor_reports_isolation(capsys: pytest.CaptureFixture[str]) -> None:
    cli_main(["doctor"])
    out = capsys.readouterr().out
    lines = {line.split(":", 1)[0] for line in out.splitlines() if line.startswith("isolation")}
    for feature in ("limits", "user", "network", "writable_paths", "sandbox"):
        assert f"isolation   {feature}" in lines
    expected = "yes (Landlock" if MACHINE.landlock_problem is None else "no ("
    assert f"isolation   writable_paths: {expected}" in out
