"""Warm starts: how long until a new worker says Hello, spawned vs forked from a template.

For each case it times "spawn requested" -> "Hello received", N times each:

* spawn: ``python -m snakepool.workers`` started afresh (what a pool does
  without ``preload``): the interpreter starts and the adapter's imports run;
* fork:  the worker is forked from a template (``snakepool.pool._template``)
  that imported the case's ``preload`` modules once.

Cases: ``generic`` (no preload), ``sklearn`` (the sklearn adapter, preload
``sklearn.pipeline`` + ``sklearn.linear_model``), ``dspy`` (the DSPy adapter,
preload ``dspy``). A case whose library is not installed is skipped.

Run: python stress/warm_start.py [-n 10] [--cases generic,sklearn,dspy]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import anyio

from snakepool import protocol as p
from snakepool.pool._config import THREAD_ENV_VARS
from snakepool.pool._template import WorkerTemplate


@dataclass(frozen=True)
class Case:
    name: str
    adapter: str
    preload: tuple[str, ...]
    needs: str | None = None  # a module that must be installed


CASES = {
    "generic": Case("generic", "generic", ()),
    "sklearn": Case(
        "sklearn",
        "snakepool.adapters.sklearn:SklearnAdapter",
        ("sklearn.pipeline", "sklearn.linear_model"),
        needs="sklearn",
    ),
    "dspy": Case("dspy", "snakepool.adapters.dspy:DSPyAdapter", ("dspy",), needs="dspy"),
}


def worker_env(cache_dir: str) -> dict[str, str]:
    """What a pool gives its workers (and so the template): one BLAS thread each."""
    env = dict(os.environ)
    for var in THREAD_ENV_VARS:
        env.setdefault(var, "1")
    env.update(
        PYTHONUNBUFFERED="1",
        SNAKEPOOL_HOST_PID=str(os.getpid()),
        SNAKEPOOL_WORKER_ID="0",
        # Read by litellm / DSPy at import: they must be set for the template too.
        LITELLM_LOCAL_MODEL_COST_MAP="True",
        DSPY_CACHEDIR=cache_dir,
    )
    return env


def init_frame(conn: p.Connection, case: Case) -> bytes:
    return conn.send(
        p.Init(version=p.PROTOCOL_VERSION, worker_id=0, pool="warm-start", adapter=case.adapter)
    )


def expect_hello(conn: p.Connection, data: bytes) -> bool:
    """Feed bytes; True once Hello arrived (raises if the worker failed)."""
    for event in conn.receive_data(data):
        if isinstance(event, p.Hello):
            return True
        if isinstance(event, p.StartupFailed):
            raise RuntimeError(f"worker failed to start: {event.type}: {event.message}")
    if not data:
        raise RuntimeError("worker exited before Hello")
    return False


async def spawn_once(case: Case, env: Mapping[str, str]) -> float:
    started = time.perf_counter()
    process = await anyio.open_process(
        [sys.executable, "-m", "snakepool.workers"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=dict(env),
        start_new_session=True,
    )
    async with process:
        assert process.stdin is not None and process.stdout is not None
        conn = p.Connection(p.Role.HOST)
        await process.stdin.send(init_frame(conn, case))
        while not expect_hello(conn, await process.stdout.receive()):
            pass
        elapsed = time.perf_counter() - started
        await process.stdin.aclose()
        await process.wait()
    return elapsed


async def fork_once(template: WorkerTemplate, case: Case, env: Mapping[str, str]) -> float:
    stdin_r, stdin_w = os.pipe()
    stdout_r, stdout_w = os.pipe()
    devnull = os.open(os.devnull, os.O_WRONLY)  # the worker's stderr
    os.set_blocking(stdout_r, False)
    try:
        started = time.perf_counter()
        child = await template.spawn(env, stdin_r, stdout_w, devnull)
        for fd in (stdin_r, stdout_w, devnull):
            os.close(fd)  # the worker has its own copies now
        stdin_r = stdout_w = devnull = -1
        conn = p.Connection(p.Role.HOST)
        os.write(stdin_w, init_frame(conn, case))
        while True:
            await anyio.wait_readable(stdout_r)
            if expect_hello(conn, os.read(stdout_r, 65536)):
                break
        elapsed = time.perf_counter() - started
        os.close(stdin_w)
        stdin_w = -1
        await child.wait()
        return elapsed
    finally:
        for fd in (stdin_r, stdin_w, stdout_r, stdout_w, devnull):
            if fd >= 0:
                os.close(fd)


def summary(label: str, seconds: list[float]) -> str:
    ms = [s * 1000 for s in seconds]
    return f"  {label:<24} p50 {statistics.median(ms):7.1f} ms   max {max(ms):7.1f} ms"


async def timed(n: int, once: Callable[[], Any]) -> list[float]:
    return [await once() for _ in range(n)]


async def run_case(case: Case, n: int, cache_dir: str) -> None:
    if case.needs and importlib.util.find_spec(case.needs) is None:
        print(f"{case.name}: skipped ({case.needs} is not installed)")
        return
    env = worker_env(cache_dir)
    print(f"{case.name}: adapter {case.adapter}, preload {list(case.preload) or 'none'}")
    await spawn_once(case, env)  # warm the page cache: both sides start from the same state
    print(summary("spawn (python -m ...)", await timed(n, lambda: spawn_once(case, env))))
    started = time.perf_counter()
    template = await WorkerTemplate.start(
        python=sys.executable,
        env=env,
        cwd=None,
        preload=case.preload,
        sys_path=[],
        timeout=120,
    )
    try:
        ready = time.perf_counter() - started
        print(
            f"  template ready in {ready * 1000:.0f} ms (imports {template.import_seconds * 1000:.0f} ms)"
        )
        print(summary("fork from template", await timed(n, lambda: fork_once(template, case, env))))
    finally:
        await template.aclose()


async def replacement_times(case: Case, n: int, how: str) -> list[float]:
    """A whole Pool: SIGKILL its worker, time until the replacement answers a call."""
    import signal

    import snakepool

    if how == "spawn":
        pool = snakepool.Pool(case.adapter, size=1, start_method="spawn", startup_timeout=120)
    elif how == "default":  # forked, nothing preloaded: the adapter imports in setup()
        pool = snakepool.Pool(case.adapter, size=1, startup_timeout=120)
    else:
        preload = list(case.preload) or ["json"]
        pool = snakepool.Pool(case.adapter, size=1, preload=preload, startup_timeout=120)
    times: list[float] = []
    async with pool:
        for _ in range(n):
            old = pool.statistics().workers[0].pid
            assert old is not None
            started = time.perf_counter()
            os.kill(old, signal.SIGKILL)
            while True:
                worker = pool.statistics().workers[0]
                if worker.pid not in (None, old) and worker.state in ("idle", "busy"):
                    break
                await anyio.sleep(0.001)
            await pool.call("ping")
            times.append(time.perf_counter() - started)
    return times


async def run_pool_case(case: Case, n: int) -> None:
    if case.needs and importlib.util.find_spec(case.needs) is None:
        return
    print(f"{case.name}: a Pool's worker SIGKILLed -> replacement answers a call")
    print(summary("start_method='spawn'", await replacement_times(case, n, "spawn")))
    print(summary("default (forked)", await replacement_times(case, n, "default")))
    print(summary("preload=[...] (forked)", await replacement_times(case, n, "preload")))


async def main(n: int, cases: list[str]) -> None:
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, N={n} per row")
    with tempfile.TemporaryDirectory(prefix="warm-start-") as cache_dir:
        for name in cases:
            await run_case(CASES[name], n, cache_dir)
    for name in cases:
        await run_pool_case(CASES[name], n)


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=10, help="workers per row")
    parser.add_argument(
        "--cases", default=",".join(CASES), help="comma-separated: " + ", ".join(CASES)
    )
    args = parser.parse_args()
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; choose from {list(CASES)}")
    anyio.run(main, args.n, cases)


if __name__ == "__main__":
    cli()
