"""Supervisor: pools from a TOML file or the embedded default, env overrides, GPU pinning."""

from __future__ import annotations

import contextlib
import os
import stat
import sys
import tomllib
from pathlib import Path
from typing import Any

import psutil
import pytest

from snakepool import PoolClosed, PoolDisabled
from snakepool.pool import ConfigError, Pool, PoolStatistics, Supervisor, SupervisorStatistics
from snakepool.pool._supervisor import DEFAULT_CONFIG_TOML
from waiting import wait_until

pytestmark = pytest.mark.anyio

CPUS = os.cpu_count() or 1
ENV_KEYS = ("SNAKEPOOL_WORKER_ID", "CUDA_VISIBLE_DEVICES")  # read with os:getenv in a session


def write(tmp_path: Path, text: str, name: str = "snakepool.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.fixture
def no_gpu(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No GPU visible, and no nvidia-smi to find one (PATH holds an empty directory)."""
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No SNAKEPOOL_* override and no thread settings leak in from the outer environment."""
    for var in list(os.environ):
        if var.startswith("SNAKEPOOL_") or var.endswith("_NUM_THREADS"):
            monkeypatch.delenv(var)


# --- a config file with two pools -------------------------------------------------------


@pytest.mark.usefixtures("clean_env")
async def test_from_file_starts_both_pools(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        session_store = "memory"

        [pools.fast]
        adapter = "generic"
        size = 2

        [pools.slow]
        adapter = "sp_adapters:Basic"
        size = 1
        call_timeout = 30
        """,
    )
    sup = Supervisor.from_file(path)
    assert list(sup) == ["fast", "slow"] and len(sup) == 2
    assert "fast" in sup and "nope" not in sup
    assert isinstance(sup["fast"], Pool) and sup.pools["slow"] is sup["slow"]
    assert sup["slow"].config.call_timeout == 30
    with pytest.raises(KeyError, match=r"no pool named 'nope'.*fast, slow"):
        sup["nope"]
    with pytest.raises(TypeError):
        sup.pools["other"] = sup["fast"]  # type: ignore[index]

    async with sup:
        assert await sup["fast"].call("echo", {"value": [1, "two"]}) == [1, "two"]
        assert await sup["slow"].call("add", {"a": 2, "b": 3}) == 5
        stats = sup.statistics()
        assert isinstance(stats, SupervisorStatistics)
        assert set(stats.pools) == {"fast", "slow"}
        assert all(isinstance(s, PoolStatistics) for s in stats.pools.values())
        assert stats.pools["fast"].size == 2 and stats.pools["slow"].size == 1
        assert stats.pools["fast"].completed == 1 and stats.pools["slow"].completed == 1
        assert all(s.enabled and s.ready_workers == s.size for s in stats.pools.values())
        with pytest.raises(AttributeError):
            stats.pools = {}  # type: ignore[misc]
    assert sup.closed and all(pool.closed for pool in sup.pools.values())
    await sup.aclose()  # idempotent


@pytest.mark.usefixtures("clean_env")
async def test_a_pool_that_cannot_start_closes_the_others(tmp_path: Path) -> None:
    sup = Supervisor(
        {
            "good": {"adapter": "generic", "size": 1},
            "bad": {"adapter": "no_such_module_anywhere:Nope", "size": 1, "startup_timeout": 10},
        }
    )
    with pytest.raises(Exception, match="no_such_module_anywhere"):
        await sup.start()
    assert sup.closed and sup["good"].closed and sup["bad"].closed
    assert sup.state == "broken"  # (not closed by anyone: its start failed)
    with pytest.raises(PoolClosed, match="cannot be started again"):
        await sup.start()
    await sup.aclose()  # (idempotent: nothing left to close)
    assert sup.state == "broken"


# --- bad configs: a clear ConfigError, nothing started -----------------------------------


@pytest.mark.usefixtures("clean_env")
def test_unknown_key_names_key_line_and_valid_keys(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[pools.fast]\nadapter = "generic"\nsize = 2\n\n[pools.slow]\nadapter = "generic"\nsise = 1\n',
    )
    with pytest.raises(ConfigError) as info:
        Supervisor.from_file(path)
    message = str(info.value)
    assert f"{path}:7:" in message
    assert "pool 'slow'" in message and "unknown key 'sise'" in message
    assert "did you mean 'size'" in message and "valid keys: adapter," in message
    assert (info.value.path, info.value.line, info.value.pool, info.value.key) == (
        str(path),
        7,
        "slow",
        "sise",
    )


@pytest.mark.usefixtures("clean_env")
def test_wrong_type_names_pool_key_and_line(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '# two pools\n[pools.a]\nadapter = "generic"\n\n[pools.b]\nadapter = "generic"\n'
        '  size = "two"\n',
    )
    with pytest.raises(
        ConfigError, match=r":7: pool 'b', key 'size': size must be an int >= 1, got 'two'"
    ):
        Supervisor.from_file(path)
    # a value in a sub-table is found at its header
    path = write(tmp_path, '[pools.a]\nadapter = "generic"\n\n[pools.a.env]\nOMP = 4\n', "env.toml")
    with pytest.raises(
        ConfigError, match=r"env\.toml:4: pool 'a', key 'env': env must map str to str"
    ):
        Supervisor.from_file(path)
    # the plain constructor: no file, no line, same names
    with pytest.raises(ConfigError, match=r"^pool 'x', key 'affinity': affinity must be one of"):
        Supervisor({"x": {"adapter": "generic", "affinity": "sticky"}})
    with pytest.raises(ConfigError, match=r"pool 'x': 'adapter' is required"):
        Supervisor({"x": {"size": 1}})
    with pytest.raises(ConfigError, match=r"pool 'x', key 'pythonpath': pythonpath must be a list"):
        Supervisor({"x": {"adapter": "generic", "pythonpath": [1]}})


@pytest.mark.usefixtures("clean_env")
def test_unknown_top_level_key_and_bad_session_store(tmp_path: Path) -> None:
    path = write(tmp_path, '\n[pool.fast]\nadapter = "generic"\n')
    with pytest.raises(
        ConfigError, match=r":2: unknown top-level key 'pool' \(did you mean 'pools'\?\)"
    ):
        Supervisor.from_file(path)
    path = write(tmp_path, 'session_store = 3\n[pools.fast]\nadapter = "generic"\n')
    with pytest.raises(ConfigError, match=r":1: session_store must be a string"):
        Supervisor.from_file(path)
    path = write(tmp_path, 'session_store = "postgres://x"\n[pools.fast]\nadapter = "generic"\n')
    with pytest.raises(
        ConfigError, match=r"pool 'fast', key 'session_store': session_store must be"
    ):
        Supervisor.from_file(path)
    with pytest.raises(ConfigError, match="no pools configured"):
        Supervisor.from_file(write(tmp_path, 'session_store = "memory"\n'))


def test_toml_syntax_error_and_missing_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[pools.fast]\nadapter = "generic"\nsize = = 2\n')
    with pytest.raises(ConfigError, match=r"invalid TOML: .*line 3") as info:
        Supervisor.from_file(path)
    assert info.value.line == 3 and str(path) in str(info.value)
    with pytest.raises(ConfigError, match="cannot read the config file"):
        Supervisor.from_file(tmp_path / "missing.toml")


@pytest.mark.usefixtures("clean_env")
def test_env_overrides_apply_and_bad_values_name_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, '[pools.my-pool]\nadapter = "generic"\nsize = 2\ncall_timeout = 5\n')
    monkeypatch.setenv("SNAKEPOOL_MY_POOL_SIZE", "3")
    monkeypatch.setenv("SNAKEPOOL_MY_POOL_CALL_TIMEOUT", "7.5")
    monkeypatch.setenv("SNAKEPOOL_MY_POOL_MAX_REQUESTS", "none")
    config = Supervisor.from_file(path)["my-pool"].config
    assert (config.size, config.call_timeout, config.max_requests) == (3, 7.5, None)

    monkeypatch.setenv("SNAKEPOOL_MY_POOL_SIZE", "three")
    with pytest.raises(
        ConfigError, match=r"SNAKEPOOL_MY_POOL_SIZE='three'.*'my-pool'.*'size'.*expected an int"
    ) as info:
        Supervisor.from_file(path)
    assert info.value.variable == "SNAKEPOOL_MY_POOL_SIZE"
    monkeypatch.setenv("SNAKEPOOL_MY_POOL_SIZE", "0")  # parses, but Pool refuses it
    with pytest.raises(ConfigError, match=r"SNAKEPOOL_MY_POOL_SIZE='0'.*size must be an int >= 1"):
        Supervisor.from_file(path)
    monkeypatch.delenv("SNAKEPOOL_MY_POOL_SIZE")
    monkeypatch.setenv("SNAKEPOOL_MY_POOL_CALL_TIMEOUT", "soon")
    with pytest.raises(
        ConfigError, match=r"SNAKEPOOL_MY_POOL_CALL_TIMEOUT='soon'.*expected a number"
    ):
        Supervisor({"my-pool": {"adapter": "generic"}})


# --- the embedded default ------------------------------------------------------------------


@pytest.mark.usefixtures("clean_env", "no_gpu")
def test_default_is_the_embedded_toml() -> None:
    sup = Supervisor.default()
    assert list(sup) == ["general", "optimizer", "gpu"]
    general, optimizer, gpu = (sup[name].config for name in sup)
    assert general.adapter == optimizer.adapter == gpu.adapter == "generic"
    assert general.size == CPUS and general.worker_count == CPUS
    assert (optimizer.size, optimizer.call_timeout, optimizer.max_memory_mb) == (1, 3600, 8192)
    assert optimizer.env is not None
    assert {
        optimizer.env[v] for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
    } == {str(CPUS)}
    assert (gpu.gpus, gpu.workers_per_gpu, gpu.worker_count) == ("auto", 1, 0)
    loaded = tomllib.loads(DEFAULT_CONFIG_TOML)
    assert list(loaded["pools"]) == list(sup)
    again = Supervisor(loaded["pools"], session_store=loaded.get("session_store"))
    assert {n: p.config for n, p in again.pools.items()} == {
        n: p.config for n, p in sup.pools.items()
    }


@pytest.mark.usefixtures("clean_env", "no_gpu")
async def test_default_without_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SNAKEPOOL_GENERAL_SIZE", "1")  # keep it light
    async with Supervisor.default() as sup:
        assert await sup["general"].call("ping") == "pong"
        assert await sup["optimizer"].call("ping") == "pong"
        stats = sup.statistics().pools
        assert stats["general"].size == 1 and stats["optimizer"].size == 1
        gpu = stats["gpu"]
        assert gpu.enabled is False and gpu.size == 0 and gpu.workers == ()
        assert gpu.disabled_reason and "no GPU found" in gpu.disabled_reason
        with pytest.raises(PoolDisabled, match=r"pool 'gpu' is disabled: no GPU found"):
            await sup["gpu"].call("ping")
        assert stats["general"].enabled and stats["optimizer"].enabled


@pytest.mark.usefixtures("clean_env", "no_gpu")
async def test_only_the_optimizer_gets_every_cpu_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """The default config, plus the generic adapter's allow-list to read the workers' env."""
    monkeypatch.setenv("SNAKEPOOL_GENERAL_SIZE", "1")
    pools = tomllib.loads(DEFAULT_CONFIG_TOML)["pools"]
    for name in ("general", "optimizer"):
        pools[name]["adapter_config"] = {"allow": ["os"]}
    getenv = {"target": "os:getenv", "args": ["OMP_NUM_THREADS"]}
    async with Supervisor(pools) as sup:
        assert await sup["optimizer"].call("call", getenv) == str(CPUS)
        assert await sup["general"].call("call", getenv) == "1"
        assert await sup["general"].call("call", {**getenv, "args": ["MKL_NUM_THREADS"]}) == "1"


# --- GPU pinning (a fake nvidia-smi) ------------------------------------------------------


@pytest.fixture
def two_fake_gpus(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    bin_dir = tmp_path / "fake-bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = "-L" ]; then\n'
        '  echo "GPU 0: Fake (UUID: GPU-0)"\n'
        '  echo "GPU 1: Fake (UUID: GPU-1)"\n'
        "fi\n"
    )
    smi.chmod(smi.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    monkeypatch.setenv("PATH", os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent)]))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


async def environments_by_slot(pool: Pool) -> dict[int, dict[str, Any]]:
    """Every worker's environment, by slot: one session per worker spreads the calls."""
    found: dict[int, dict[str, Any]] = {}
    async with contextlib.AsyncExitStack() as stack:
        for _ in range(pool.statistics().size):
            session = await stack.enter_async_context(pool.session())
            env = {
                key: await session.call("call", {"target": "os:getenv", "args": [key]})
                for key in ENV_KEYS
            }
            found[int(env["SNAKEPOOL_WORKER_ID"])] = env
    return found


@pytest.mark.usefixtures("clean_env", "two_fake_gpus")
async def test_gpu_pool_pins_each_worker_and_a_replacement_keeps_its_slot(
    tmp_path: Path,
) -> None:
    path = write(
        tmp_path,
        '[pools.gpu]\nadapter = "generic"\ngpus = "auto"\nworkers_per_gpu = 2\n'
        'adapter_config = { allow = ["os"] }\n',
    )
    async with Supervisor.from_file(path) as sup:
        pool = sup["gpu"]
        stats = pool.statistics()
        assert stats.enabled and stats.size == 4
        assert [w.gpu for w in stats.workers] == [0, 0, 1, 1]
        envs = await environments_by_slot(pool)
        assert sorted(envs) == [0, 1, 2, 3]
        for worker in stats.workers:
            assert envs[worker.id]["CUDA_VISIBLE_DEVICES"] == str(worker.gpu)

        victim = stats.workers[2]
        assert victim.pid is not None
        psutil.Process(victim.pid).kill()

        def replaced() -> bool:
            worker = pool.statistics().workers[victim.id]
            return worker.restarts == 1 and worker.state in ("idle", "busy")

        await wait_until(replaced)
        after = pool.statistics().workers[victim.id]
        assert after.pid != victim.pid and after.gpu == 1
        envs = await environments_by_slot(pool)
        assert sorted(envs) == [0, 1, 2, 3]
        assert envs[victim.id]["CUDA_VISIBLE_DEVICES"] == "1"
        assert int(envs[victim.id]["SNAKEPOOL_WORKER_ID"]) == victim.id
