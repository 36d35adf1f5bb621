"""``start_method`` and ``preload``: workers forked from a template, or spawned."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import psutil
import pytest

import snakepool
from waiting import wait_until

pytestmark = pytest.mark.anyio

ADAPTER = "sp_adapters:Basic"


def template_pid(pool: snakepool.Pool) -> int:
    worker_pid = pool.statistics().workers[0].pid
    assert worker_pid is not None
    return psutil.Process(worker_pid).ppid()


def spawned_fresh(pool: snakepool.Pool) -> bool:
    """The worker is a fresh interpreter (exec'd), started by the pool's keeper."""
    worker_pid = pool.statistics().workers[0].pid
    assert worker_pid is not None
    worker = psutil.Process(worker_pid)
    keeper = psutil.Process(worker.ppid())
    # (a worker forked warm shows the template's command line)
    return "--template" not in worker.cmdline() and "--template" in keeper.cmdline()


async def test_preloaded_pool_forks_its_workers_from_one_template(tmp_path: Path) -> None:
    (tmp_path / "sp_heavy.py").write_text("import os\nLOADED_IN = os.getpid()\n")
    async with snakepool.Pool(
        ADAPTER, size=2, preload=["sp_heavy"], pythonpath=[str(tmp_path)]
    ) as pool:
        stats = pool.statistics()
        assert stats.start_method.startswith("forkserver")
        assert "sp_heavy" in stats.start_method
        parents = {psutil.Process(w.pid).ppid() for w in stats.workers if w.pid}
        assert len(parents) == 1 and os.getpid() not in parents  # the template's children
        assert await pool.call("add", {"a": 2, "b": 3}) == 5
        pids = {await pool.call("pid") for _ in range(6)}
        assert pids <= {w.pid for w in stats.workers}


async def test_a_killed_forked_worker_is_replaced_by_a_fork(tmp_path: Path) -> None:
    async with snakepool.Pool(ADAPTER, size=1, preload=["json"]) as pool:
        template = template_pid(pool)
        old = pool.statistics().workers[0].pid
        assert old is not None
        os.kill(old, signal.SIGKILL)
        await wait_until(lambda: pool.statistics().workers[0].pid not in (None, old))
        await wait_until(lambda: pool.statistics().ready_workers == 1)
        assert template_pid(pool) == template
        assert await pool.call("add", {"a": 1, "b": 1}) == 2
    assert not psutil.pid_exists(template) or psutil.Process(template).status() == "zombie"


async def test_preload_that_starts_threads_falls_back_to_spawning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "sp_threads_at_import.py").write_text(
        "import threading, time\n"
        "threading.Thread(target=time.sleep, args=(3600,), name='busy-bee', daemon=True).start()\n"
    )
    async with snakepool.Pool(
        ADAPTER, size=1, preload=["sp_threads_at_import"], pythonpath=[str(tmp_path)]
    ) as pool:
        stats = pool.statistics()
        assert stats.start_method.startswith("spawn")
        assert "busy-bee" in stats.start_method
        assert spawned_fresh(pool)
        assert await pool.call("add", {"a": 1, "b": 2}) == 3
    assert "busy-bee" in caplog.text


async def test_preload_that_cannot_be_imported_fails_start() -> None:
    pool = snakepool.Pool(ADAPTER, size=1, preload=["no_such_module_for_snakepool"])
    with pytest.raises(snakepool.WorkerStartError, match="no_such_module_for_snakepool"):
        await pool.start()
    await pool.aclose()


async def test_workers_are_forked_by_default_and_spawned_on_request() -> None:
    async with snakepool.Pool(ADAPTER, size=1) as pool:
        assert pool.statistics().start_method.startswith("forkserver")
        assert template_pid(pool) != os.getpid()
        assert await pool.call("add", {"a": 1, "b": 1}) == 2
    async with snakepool.Pool(ADAPTER, size=1, start_method="spawn") as pool:
        assert pool.statistics().start_method.startswith("spawn")
        assert spawned_fresh(pool)
        assert await pool.call("add", {"a": 1, "b": 1}) == 2


async def test_forkserver_that_cannot_fork_fails_start(tmp_path: Path) -> None:
    (tmp_path / "sp_threads_again.py").write_text(
        "import threading, time\n"
        "threading.Thread(target=time.sleep, args=(3600,), daemon=True).start()\n"
    )
    pool = snakepool.Pool(
        ADAPTER,
        size=1,
        preload=["sp_threads_again"],
        pythonpath=[str(tmp_path)],
        start_method="forkserver",
    )
    with pytest.raises(snakepool.WorkerStartError, match="forkserver"):
        await pool.start()
    await pool.aclose()


def test_start_method_is_checked() -> None:
    with pytest.raises(ValueError, match="start_method"):
        snakepool.Pool(ADAPTER, start_method="fork")
