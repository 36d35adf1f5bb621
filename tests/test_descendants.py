"""No descendant of a worker outlives it: children in its group, children that
called setsid(), double-forked ones, and children that hold its pipes open.

The worker and the pool's template (its keeper) are child subreapers: see
snakepool/workers/_descendants.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import anyio
import pytest

import snakepool
from conftest import TESTS_DIR
from snakepool import WorkerCrashed
from waiting import gone, wait_until

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(
        not sys.platform.startswith("linux"), reason="child subreapers are a Linux feature"
    ),
]

ADAPTER = "sp_descendants:Spawner"


@pytest.mark.parametrize(
    "how",
    [
        pytest.param(["auto"], id="forked-from-the-template"),
        pytest.param(["spawn"], id="spawned"),
        pytest.param(["auto", "0"], id="gpu-pool"),
    ],
)
def test_every_descendant_is_gone_within_3s_of_the_hosts_sigkill(how: list[str]) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS_DIR), *sys.path]))
    host = subprocess.Popen(
        [sys.executable, str(TESTS_DIR / "sp_descendants_host.py"), *how],
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
    pids: dict[str, int] = {}
    try:
        assert host.stdout is not None
        pids = json.loads(host.stdout.readline())
        assert set(pids) == {"worker", "holder", "in_group", "own_session", "double_forked"}
        assert not any(gone(pid) for pid in pids.values())
        host.send_signal(signal.SIGKILL)
        host.wait(timeout=10)
        deadline = time.monotonic() + 3.0
        while not all(map(gone, pids.values())) and time.monotonic() < deadline:
            time.sleep(0.02)
        left = {kind: pid for kind, pid in pids.items() if not gone(pid)}
        assert not left, f"outlived their SIGKILLed host: {left}"
    finally:
        host.kill()
        host.wait()
        for pid in pids.values():  # (only if the test failed)
            if not gone(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("start_method", ["auto", "spawn"])
async def test_a_dead_workers_children_go_with_it_and_its_slot_is_refilled(
    start_method: str,
) -> None:
    async with snakepool.Pool(ADAPTER, size=1, start_method=start_method) as pool:
        children = await pool.call("spawn_children")
        holder = await pool.call("c_fork_holder")  # keeps the worker's pipes open
        worker = await pool.call("pid")
        with anyio.fail_after(10):  # seen from the process, not from EOF (never comes)
            with pytest.raises(WorkerCrashed) as crash:
                await pool.call("die")
        assert crash.value.exit_code == 3
        with anyio.fail_after(10):  # the slot is refilled at once
            assert await pool.call("echo", {"value": 1}) == 1
        assert await pool.call("pid") != worker
        await wait_until(lambda: all(gone(pid) for pid in [holder, *children.values()]), 5)


async def test_closing_the_pool_leaves_no_descendant() -> None:
    started = time.monotonic()
    async with snakepool.Pool(ADAPTER, size=1) as pool:
        children = await pool.call("spawn_children")
        holder = await pool.call("c_fork_holder")
    assert time.monotonic() - started < 15  # (it took 29 s when the pipes held the close)
    assert all(gone(pid) for pid in [holder, *children.values()])


async def test_a_killed_worker_takes_its_escaped_children_along() -> None:
    """A timeout's kill (or any SIGKILL of the worker) reaches what left its group."""
    async with snakepool.Pool(ADAPTER, size=1) as pool:
        children = await pool.call("spawn_children")
        worker = await pool.call("pid")
        os.kill(worker, signal.SIGKILL)
        await wait_until(lambda: all(gone(pid) for pid in children.values()), 5)
        with anyio.fail_after(10):
            assert await pool.call("echo", {"value": 2}) == 2


async def test_the_protocol_pipes_are_not_inherited_by_a_handlers_children() -> None:
    async with snakepool.Pool(ADAPTER, size=1) as pool:
        pipes = await pool.call("protocol_pipes")
        assert all(pipe.startswith("pipe:[") for pipe in pipes)
        children = await pool.call("fds_of_children")
        for kind in ("spawned", "forked"):
            assert children[kind], kind  # (it listed something: at least its stdio)
            assert not set(pipes) & set(children[kind]), kind
