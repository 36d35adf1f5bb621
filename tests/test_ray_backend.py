"""``backend="ray"``: pools whose workers are Ray actors, on a real multi-node
Ray cluster this module starts on this machine (``ray.cluster_utils.Cluster``:
a head and two more nodes, shared by the module's tests, shut down after).

The same API as a local pool (calls, streams, sessions, host tools, timeouts)
and the failure semantics of issue 21: a killed actor fails only its started
calls and its slot is refilled; a node removed under load gives every call
exactly one outcome and the pool is whole again on the other nodes; closing
leaves no actor behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import psutil
import pytest

import snakepool
from snakepool import RemoteError, WorkerCrashed
from waiting import wait_until

ray = pytest.importorskip("ray", reason="backend='ray' needs Ray: pip install 'snakepool[ray]'")
from ray.cluster_utils import Cluster  # noqa: E402

from snakepool.pool._ray import ACTOR_CLASS  # noqa: E402

pytestmark = pytest.mark.anyio

ADAPTER = "sp_adapters:Stateful"
_NODE = {"num_cpus": 2, "object_store_memory": 80 * 2**20}  # (logical CPUs: Ray only counts)
#: Node deaths are noticed in about a second (Ray's default is tens of seconds).
_FAST_HEALTH = {
    "health_check_initial_delay_ms": 0,
    "health_check_period_ms": 300,
    "health_check_failure_threshold": 3,
}


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    cluster = Cluster(
        initialize_head=True,
        connect=True,
        head_node_args={**_NODE, "include_dashboard": False, "_system_config": _FAST_HEALTH},
    )
    try:
        cluster.add_node(**_NODE)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def _our_processes() -> dict[int, str]:
    """Worker subprocesses and worker actors below this process (Ray's own idle
    workers and daemons are the cluster's, shared by the module)."""
    found = {}
    for child in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(child.cmdline())
        except psutil.Error:
            continue
        if "snakepool.workers" in cmd or "WorkerNode" in cmd:
            found[child.pid] = cmd
    return found


@pytest.fixture(autouse=True)
def no_leftover_processes() -> Iterator[None]:
    """(Overrides conftest's: the cluster's daemons outlive each test on purpose.)"""
    before = set(_our_processes())
    yield
    end = time.monotonic() + 15.0
    left = {pid: cmd for pid, cmd in _our_processes().items() if pid not in before}
    while left and time.monotonic() < end:
        time.sleep(0.05)
        left = {pid: cmd for pid, cmd in _our_processes().items() if pid not in before}
    assert not left, f"test left processes behind: {left}"


def _actors() -> list[str]:
    """The ids of the live worker actors (Ray's state, from its GCS: no dashboard needed)."""
    return [
        actor_id
        for actor_id, actor in ray._private.state.actors().items()
        if actor["ActorClassName"] == ACTOR_CLASS and actor["State"] != "DEAD"
    ]


def _pool(**options: Any) -> snakepool.Pool:
    ray_options = {"num_cpus": 0, "scheduling_strategy": "SPREAD", **options.pop("ray", {})}
    return snakepool.Pool(ADAPTER, backend="ray", ray=ray_options, **options)


# --- options (no cluster) ----------------------------------------------------------------


def test_ray_options_are_checked() -> None:
    with pytest.raises(ValueError, match=r"GPUs come from Ray: set ray=\{'num_gpus'|num_gpus"):
        snakepool.Pool("generic", backend="ray", gpus=[0])
    with pytest.raises(ValueError, match=r"ray has no option 'num_cpu' \(did you mean 'num_cpus'"):
        snakepool.Pool("generic", backend="ray", ray={"num_cpu": 1})
    with pytest.raises(ValueError, match=r"ray\['num_gpus'\] must be a number >= 0"):
        snakepool.Pool("generic", backend="ray", ray={"num_gpus": -1})
    with pytest.raises(ValueError, match=r'ray=.* is for backend="ray"'):
        snakepool.Pool("generic", ray={"num_cpus": 1})
    with pytest.raises(ValueError, match="backend must be one of local, ray"):
        snakepool.Pool("generic", backend="dask")
    with pytest.raises(ValueError, match='limits cannot be used with backend="ray"'):
        snakepool.Pool("generic", backend="ray", limits={"memory_mb": 100})


def test_status_shows_where_ray_workers_run() -> None:
    """``snakepool status`` prints each Ray worker's node and GPUs (from statistics)."""
    from snakepool.cli._client import _plain, _table
    from snakepool.pool import PoolStatistics, WorkerStatistics

    worker = WorkerStatistics(
        id=0, pid=7, state="idle", inflight=0, requests=0, restarts=0, rss_bytes=None,
        node_id="abcdef0123456789", node_address="10.0.0.2", gpu_ids=("1",),
    )  # fmt: skip
    stats = PoolStatistics(
        name="gpu", size=1, queued=0, sessions=0, breaker_state="closed",
        workers=(worker,), completed=0, failed={},
    )  # fmt: skip
    assert "ray workers: 0@10.0.0.2/abcdef01 gpu=1" in _table({"gpu": _plain(stats)})


# --- the same API ------------------------------------------------------------------------


async def test_calls_streams_sessions_tools_and_where_each_worker_runs(cluster: Cluster) -> None:
    async with _pool(size=2, ray={"num_cpus": 2}) as pool:  # (a node's CPUs each: one per node)
        stats = pool.statistics()
        nodes = {node.node_id for node in cluster.list_all_nodes()}
        assert all(w.node_id in nodes and w.node_address for w in stats.workers)
        assert len({w.node_id for w in stats.workers}) == 2  # SPREAD: one per node
        assert stats.start_method.startswith("ray (cluster at ")
        assert await pool.call("echo", {"value": {"a": b"\x00"}}) == {"a": b"\x00"}
        assert [item async for item in pool.stream("count_to", {"n": 4})] == [0, 1, 2, 3]
        pool.register_tool("upper", lambda word: word.upper())
        assert await pool.call("use_tool", {"name": "upper", "args": {"word": "ray"}}) == "RAY"
        with pytest.raises(RemoteError, match="no host tool named 'nope'"):
            await pool.call("use_tool", {"name": "nope"})
        async with pool.session() as session:
            await session.variables.define("model", "str", "m1")
            first = await session.call("remember", {"key": "k", "value": [1, 2]})
            assert (await session.call("recall", {"key": "k"}))["value"] == [1, 2]
            assert await session.call("var", {"name": "model"}) == "m1"
            with pytest.raises(WorkerCrashed, match=r"Ray actor .* on node"):
                await session.call("die")
            recalled = await session.call("recall", {"key": "k"})  # restored elsewhere
            assert recalled["value"] == [1, 2] and recalled["pid"] != first
            assert recalled["restored_on"] == recalled["pid"]
        assert len(_actors()) == 2
    assert _actors() == []  # closing leaves no actor behind


async def test_a_timeout_kills_only_the_hung_worker(cluster: Cluster, tmp_path: Path) -> None:
    async with _pool(size=2, cancel_grace=0.2) as pool:
        pids = {w.pid for w in pool.statistics().workers}
        release = tmp_path / "release"
        async with anyio.create_task_group() as tg:
            results: list[Any] = []

            async def other() -> None:
                results.append(await pool.call("hold", {"release": str(release)}))

            tg.start_soon(other)
            await wait_until(lambda: sum(w.inflight for w in pool.statistics().workers) == 1)
            busy = next(w.pid for w in pool.statistics().workers if w.inflight)
            with pytest.raises(TimeoutError):
                await pool.call("hold_sync", {"release": str(tmp_path / "never")}, timeout=0.5)
            await wait_until(lambda: _restarted(pool, 1), timeout=30)
            release.touch()
        assert results and results[0]["pid"] == busy  # the other worker's call finished
        after = {w.pid for w in pool.statistics().workers}
        assert busy in after and len(after - pids) == 1  # only the hung one was replaced


async def test_a_killed_actor_fails_only_its_started_calls(
    cluster: Cluster, tmp_path: Path
) -> None:
    async with _pool(size=2) as pool:
        release = tmp_path / "release"
        outcomes: list[object] = []

        async def hold() -> None:
            try:
                outcomes.append(await pool.call("hold", {"release": str(release)}))
            except WorkerCrashed as exc:
                outcomes.append(exc)

        async with anyio.create_task_group() as tg:
            for _ in range(2):
                tg.start_soon(hold)
            await wait_until(lambda: all(w.inflight for w in pool.statistics().workers))
            victim = pool.statistics().workers[0]
            _actor_process(victim.pid).kill()  # (as the OOM killer would)
            await wait_until(lambda: len(outcomes) == 1)
            release.touch()
        crashed = [o for o in outcomes if isinstance(o, WorkerCrashed)]
        assert len(crashed) == 1 and len(outcomes) == 2
        assert "Ray actor" in str(crashed[0]) and "died" in str(crashed[0])
        assert crashed[0].stderr_tail and "node" in crashed[0].stderr_tail
        await wait_until(lambda: _restarted(pool, 1), timeout=30)
        assert pool.statistics().workers[victim.id].restarts == 1
        assert await pool.call("echo", {"value": 1}) == 1


def _restarted(pool: snakepool.Pool, restarts: int) -> bool:
    """The pool is whole again, after ``restarts`` replacements."""
    stats = pool.statistics()
    return stats.ready_workers == stats.size and sum(w.restarts for w in stats.workers) == restarts


def _actor_process(worker_pid: int | None) -> psutil.Process:
    """The process of the actor that runs the worker ``worker_pid`` (its parent)."""
    assert worker_pid is not None
    actor = psutil.Process(worker_pid).parent()
    assert actor is not None and ACTOR_CLASS in " ".join(actor.cmdline())
    return actor


async def test_removing_a_node_under_load(cluster: Cluster) -> None:
    """Every call gets exactly one outcome, none hangs; the pool is whole again on
    the remaining nodes within 30 s; a session that lived there is restored."""
    doomed = cluster.add_node(**_NODE, resources={"doomed": 1})
    cluster.wait_for_nodes()
    try:
        async with _pool(size=3, worker_concurrency=4, ray={"num_cpus": 1}) as pool:
            stats = pool.statistics()
            on_doomed = [w for w in stats.workers if w.node_id == doomed.node_id]
            assert on_doomed, "SPREAD placed no worker on the new node"
            doomed_pids = {w.pid for w in on_doomed}
            sessions = [pool.session() for _ in range(6)]
            homes = [
                await s.call("remember", {"key": "k", "value": f"kept {i}"})
                for i, s in enumerate(sessions)
            ]
            assert doomed_pids & set(homes), "no session lives on the doomed node"
            outcomes: dict[int, list[str]] = {}

            async def caller(n: int) -> None:
                for i in range(20):
                    key = n * 100 + i
                    with anyio.fail_after(60):  # none hangs
                        try:
                            await pool.call("nap", {"seconds": 0.01})
                            outcomes.setdefault(key, []).append("ok")
                        except WorkerCrashed:
                            outcomes.setdefault(key, []).append("crashed")

            async with anyio.create_task_group() as tg:
                for n in range(16):
                    tg.start_soon(caller, n)
                await wait_until(lambda: len(outcomes) > 30)
                cluster.remove_node(doomed)
            assert len(outcomes) == 16 * 20
            assert all(len(o) == 1 for o in outcomes.values())  # exactly one outcome each
            await wait_until(lambda: pool.statistics().ready_workers == 3, timeout=30)
            alive = {n.node_id for n in cluster.list_all_nodes()}
            assert all(w.node_id in alive for w in pool.statistics().workers)
            for i, session in enumerate(sessions):  # restored through restore_session
                assert (await session.call("recall", {"key": "k"}))["value"] == f"kept {i}"
        assert _actors() == []
    finally:
        if doomed in cluster.worker_nodes:
            cluster.remove_node(doomed)


async def test_snakepool_up_serves_a_ray_backed_pool(
    cluster: Cluster, workdir: Path, env: dict[str, str]
) -> None:
    """``snakepool up`` reads ``backend = "ray"`` and a ``[pools.NAME.ray]`` table,
    serves the pool to ``snakepool.connect()``, and ``snakepool status`` shows the
    node each worker runs on; stopping it leaves no actor behind."""
    config = workdir / "pools.toml"
    config.write_text(
        textwrap.dedent(f"""\
            [pools.far]
            adapter = "{ADAPTER}"
            size = 2
            backend = "ray"

            [pools.far.ray]
            address = "{cluster.address}"
            num_cpus = 2  # (a node's CPUs each: one worker per node; SPREAD only tries)
            """)
    )
    sock, log = workdir / "s.sock", workdir / "up.log"
    cli = [sys.executable, "-m", "snakepool.cli"]
    env = {**env, "RAY_USAGE_STATS_ENABLED": "0"}
    with log.open("w") as output:
        up = await anyio.open_process(
            [*cli, "up", "--config", str(config), "--socket", str(sock)],
            stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
        )  # fmt: skip
    try:
        await wait_until(lambda: sock.exists() or up.returncode is not None, timeout=90)
        assert up.returncode is None, log.read_text()
        async with snakepool.connect(sock) as client:
            assert await client["far"].call("echo", {"value": {"a": [1, 2]}}) == {"a": [1, 2]}
            workers = (await client.status())["far"]["workers"]
        nodes = {node.node_id for node in cluster.list_all_nodes()}
        assert len(workers) == 2 and all(w["node_id"] in nodes for w in workers)
        assert len({w["node_id"] for w in workers}) == 2
        status = await anyio.run_process([*cli, "status", "--socket", str(sock)], env=env)
        shown = {f"{w['id']}@{w['node_address']}/{w['node_id'][:8]}" for w in workers}
        [row] = [line for line in status.stdout.decode().splitlines() if "ray workers:" in line]
        assert set(row.split("ray workers:")[1].split()) == shown
        up.send_signal(signal.SIGTERM)
        with anyio.fail_after(60):
            assert await up.wait() == 0, log.read_text()
        await wait_until(lambda: _actors() == [], timeout=15)
    finally:
        if up.returncode is None:
            up.kill()
            await up.wait()


def test_the_cluster_going_away(tmp_path: Path) -> None:
    """Calls fail naming the cluster's address, the pool is broken (not closed) and
    ``aclose()`` returns at once. (In a process of its own: Ray ends a driver whose
    cluster has been gone for 60 s, and the cluster is that process's own.)"""
    script = Path(__file__).with_name("sp_ray_gone.py")
    done = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=tmp_path,
        env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
        check=False,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("REPORT ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    report = json.loads(lines[-1].removeprefix("REPORT "))
    assert report["first"] == 1 and report["state"] == "broken"
    assert report["broken_after"] < 15
    for kind, message in report["outcomes"]:
        assert kind == "pool_closed"
        assert f"the Ray cluster at {report['address']} is gone" in message
    assert report["aclose_seconds"] < 5
