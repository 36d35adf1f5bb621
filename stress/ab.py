"""Old commit against new, side by side: plain and session call performance.

The refactoring issues ask that performance hold, "measured side by side on
alternating rounds (old and new commit in one run, median of at least 5
rounds)". This machine is a shared 2-CPU VM whose speed drifts by tens of
percent over minutes, so two runs made minutes apart compare the machine, not
the code. Here both versions run in the same run, in short turns: each round
runs one fresh child interpreter per version, old then new in even rounds and
new then old in odd ones (ABBA ABBA ...), so a drift hits both alike. Every
metric is the median over the rounds, compared as new/old.

Each version is a source tree: OLD_REF (and NEW_REF, if given) is checked out
with ``git worktree add --detach`` into a temporary directory; without NEW_REF
the new version is a copy of this checkout's ``src`` as it is now, uncommitted
changes included (a copy, so edits made during the run do not leak into it).
A child imports snakepool from its tree (``PYTHONPATH=<tree>/src`` comes before
the venv's editable install) and so do its workers (a same-interpreter worker
inherits the host's environment and ``sys.path``); the child checks both, and
the first round prints where each side's snakepool came from.

Scenarios (each child, after a warm-up):

- ``plain``: ``Pool("generic", size=W)``; 64 callers calling the no-op ``echo``
  (calls/s), then sequential calls (p50 latency, microseconds).
- ``session``: a pool of a tiny adapter (written to the temporary directory)
  whose ``read`` handler returns ``ctx.variables["temperature"]``; 64 sessions,
  each with two variables, one caller per session; every 100 calls of a
  session its ``temperature`` is ``set`` (and the next read must see it).
  Session calls/s, and in the same child the plain calls/s of that pool's
  no-op, so each round also gives the ratio session/plain; then the p50 of
  sequential reads of one session.
- ``socket``: the plain scenario's no-op through a real ``snakepool up`` of the
  version's tree (``stress/socket_bench.py``'s), called with that tree's
  ``snakepool.connect()``: calls/s at 64 callers, sequential p50, and the
  server's CPU per call (the server's own cost, which calls/s hides when the
  machine drifts).

Run::

    python stress/ab.py OLD_REF [NEW_REF] [--rounds 5] [--calls 20000] [--workers 2]
                        [--scenario plain|session|both|socket] [--store memory|redis] [--paired]
                        [--json OUT]

``--store redis`` runs the session scenario against a ``redis-server`` this run
starts on loopback (``stress/redis_sessions.py``), shared by both sides.

``--paired`` (plain scenario) keeps one child per version alive for the whole
run and takes turns in slices of a few milliseconds instead of whole children:
a burst of ``--calls / 4`` calls from 64 callers by one side, then by the
other (ABBA), and sequential calls 20 at a time, alternating. A drift of the
machine over seconds (this VM's sequential p50 moves between ~35 and ~120 us
from one minute to the next) then hits both sides alike. A round is a quarter
of each side's bursts and sequential calls.

``python stress/ab.py HEAD HEAD`` compares a commit with itself: the spread it
shows is the noise floor (here the sequential p50 flips between about 35 and
about 90 us from one child to the next when other work shares the machine).

Exit status 0 when every child ran (the verdicts are information, not a gate);
1 when a child failed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CALLERS = 64
SESSIONS = 64
SET_EVERY = 100
SEQUENTIAL_CALLS = 2000
#: Plain bursts per child (a burst of 20000 no-ops takes a quarter second): their median.
PLAIN_BURSTS = 3
CHILD_TIMEOUT = 600.0

#: The session scenario's adapter, written into the temporary directory.
ADAPTER_MODULE = "ab_adapter"
ADAPTER_SOURCE = '''\
"""stress/ab.py's adapter: a no-op, a variable read, and where snakepool came from."""

from typing import Any

import snakepool
from snakepool.adapters import Adapter, CallContext, command


class ABAdapter(Adapter):
    @command
    def noop(self, value: Any = None) -> Any:
        return value

    @command
    def read(self, ctx: CallContext) -> float:
        return ctx.variables["temperature"]

    @command
    def where(self) -> str:
        return snakepool.__file__
'''


@dataclass(frozen=True)
class Metric:
    key: str
    title: str
    unit: str  # "calls/s", "us" or "ratio"
    higher_is_better: bool = True


METRICS = (
    Metric("plain_calls_s", f"plain calls/s, {CALLERS} callers (generic echo)", "calls/s"),
    Metric("plain_p50_us", "sequential p50 (generic echo)", "us", higher_is_better=False),
    Metric(
        "plain_cpu_us",
        f"CPU per plain call, host and workers, {CALLERS} callers (less noisy than calls/s)",
        "us",
        higher_is_better=False,
    ),
    Metric(
        "plain_host_cpu_us",
        f"CPU per plain call, the host alone, {CALLERS} callers (--paired)",
        "us",
        higher_is_better=False,
    ),
    Metric(
        "session_calls_s",
        f"session calls/s, {SESSIONS} sessions, one caller each (read ctx.variables)",
        "calls/s",
    ),
    Metric(
        "session_p50_us",
        "sequential p50, one session (read ctx.variables)",
        "us",
        higher_is_better=False,
    ),
    Metric(
        "session_pool_plain_calls_s",
        f"plain calls/s on the session pool, {CALLERS} callers (noop), same child",
        "calls/s",
    ),
    Metric("session_over_plain", "session/plain calls/s, per round", "ratio"),
    Metric("socket_calls_s", f"calls/s through snakepool up, {CALLERS} callers", "calls/s"),
    Metric("socket_p50_us", "sequential p50 through snakepool up", "us", higher_is_better=False),
    Metric(
        "socket_server_cpu_us",
        f"CPU per call of the snakepool up process, {CALLERS} callers",
        "us",
        higher_is_better=False,
    ),
)


# --- the child: one version, one round ----------------------------------------------------


async def _burst(call: Callable[[int], Awaitable[Any]], total: int) -> float:
    """``total`` calls from ``CALLERS`` concurrent callers; calls/s."""
    per_caller = max(1, total // CALLERS)

    async def caller() -> None:
        for i in range(per_caller):
            result = await call(i)
            if result != i:
                raise AssertionError(f"the no-op returned {result!r}, expected {i!r}")

    started = time.perf_counter()
    async with asyncio.TaskGroup() as tg:
        for _ in range(CALLERS):
            tg.create_task(caller())
    return CALLERS * per_caller / (time.perf_counter() - started)


async def _plain_burst(call: Callable[[int], Awaitable[Any]], total: int) -> float:
    """The median calls/s of ``PLAIN_BURSTS`` bursts."""
    return statistics.median([await _burst(call, total) for _ in range(PLAIN_BURSTS)])


async def _sequential_p50_us(call: Callable[[int], Awaitable[Any]], calls: int) -> float:
    samples = []
    for i in range(calls):
        started = time.perf_counter()
        await call(i)
        samples.append(time.perf_counter() - started)
    return statistics.median(samples) * 1e6


async def _plain(workers: int, calls: int) -> dict[str, float]:
    import snakepool

    async with snakepool.Pool("generic", size=workers) as pool:

        async def echo(i: int) -> Any:
            return await pool.call("echo", {"value": i})

        await _burst(echo, min(calls, 2000))  # warm-up
        await _sequential_p50_us(echo, 200)
        workers = [w.pid for w in pool.statistics().workers if w.pid is not None]
        cpu_before = _cpu_seconds(workers)
        calls_s = await _plain_burst(echo, calls)
        made = PLAIN_BURSTS * CALLERS * max(1, calls // CALLERS)  # (as _burst rounds them)
        cpu_per_call = (_cpu_seconds(workers) - cpu_before) / made
        return {
            "plain_calls_s": calls_s,
            "plain_p50_us": await _sequential_p50_us(echo, min(calls, SEQUENTIAL_CALLS)),
            "plain_cpu_us": cpu_per_call * 1e6,
        }


async def _socket(workers: int, calls: int) -> dict[str, float]:
    from socket_bench import cpu_seconds, snakepool_up  # (this directory: the same server)

    import snakepool

    with tempfile.TemporaryDirectory(prefix="sp-ab-") as tmp:
        async with (
            snakepool_up(Path(tmp), workers) as (sock, up_pid),
            snakepool.connect(sock) as client,
        ):
            remote = client["bench"]

            async def echo(i: int) -> Any:
                return await remote.call("echo", {"value": i})

            await _burst(echo, min(calls, 2000))  # warm-up
            await _sequential_p50_us(echo, 200)
            cpu_before = cpu_seconds(up_pid)  # (the scheduler's: finer than psutil's ticks)
            calls_s = await _plain_burst(echo, calls)
            made = PLAIN_BURSTS * CALLERS * max(1, calls // CALLERS)  # (as _burst rounds them)
            server_cpu = (cpu_seconds(up_pid) - cpu_before) / made
            return {
                "socket_calls_s": calls_s,
                "socket_p50_us": await _sequential_p50_us(echo, min(calls, SEQUENTIAL_CALLS)),
                "socket_server_cpu_us": server_cpu * 1e6,
            }


def _cpu_seconds(worker_pids: list[int]) -> float:
    """CPU time (user + system) of this host process and the given workers.

    What a call costs, rather than how fast it went: a VM whose speed drifts
    between rounds moves calls/s far more than it moves CPU per call.
    """
    import psutil

    total = time.process_time()
    for pid in worker_pids:
        times = psutil.Process(pid).cpu_times()
        total += times.user + times.system
    return total


class _SessionCaller:
    """One session's caller: reads its variable, sets it every ``SET_EVERY`` calls."""

    def __init__(self, session: Any) -> None:
        self.session = session
        self.calls = 0
        self.expected = 0.5

    async def define(self) -> None:
        await self.session.variables.define("temperature", "float", self.expected)
        await self.session.variables.define("top_k", "int", 40)

    async def run(self, calls: int) -> None:
        for _ in range(calls):
            if self.calls and self.calls % SET_EVERY == 0:
                self.expected = self.calls / 1e6
                await self.session.variables.set("temperature", self.expected)
            got = await self.session.call("read")
            if got != self.expected:
                raise AssertionError(f"session read {got!r}, expected {self.expected!r}")
            self.calls += 1


async def _session_burst(callers: list[_SessionCaller], total: int) -> float:
    per_session = max(1, total // len(callers))
    started = time.perf_counter()
    async with asyncio.TaskGroup() as tg:
        for caller in callers:
            tg.create_task(caller.run(per_session))
    return len(callers) * per_session / (time.perf_counter() - started)


async def _session(
    workers: int, calls: int, adapter_dir: str, store: str
) -> tuple[dict[str, float], str]:
    import snakepool

    adapter = f"{ADAPTER_MODULE}:ABAdapter"
    async with (
        snakepool.Pool(
            adapter, size=workers, pythonpath=[adapter_dir], session_store=store
        ) as pool,
        contextlib.AsyncExitStack() as stack,
    ):
        where = await pool.call("where")

        async def noop(i: int) -> Any:
            return await pool.call("noop", {"value": i})

        callers = [
            _SessionCaller(await stack.enter_async_context(pool.session())) for _ in range(SESSIONS)
        ]
        for caller in callers:
            await caller.define()
        await _burst(noop, min(calls, 2000))  # warm-up
        await _session_burst(callers, min(calls, 2000))

        async def read(i: int) -> Any:
            return await callers[0].session.call("read")

        plain = await _plain_burst(noop, calls)
        session = await _session_burst(callers, calls)
        metrics = {
            "session_calls_s": session,
            "session_p50_us": await _sequential_p50_us(read, min(calls, SEQUENTIAL_CALLS)),
            "session_pool_plain_calls_s": plain,
            "session_over_plain": session / plain,
        }
        return metrics, where


async def _worker_file(adapter_dir: str) -> str:
    """Where a worker's snakepool came from (a one-worker pool of the same launch)."""
    import snakepool

    async with snakepool.Pool(
        f"{ADAPTER_MODULE}:ABAdapter", size=1, pythonpath=[adapter_dir]
    ) as pool:
        where: str = await pool.call("where")
        return where


async def _child(
    tree: str, scenario: str, workers: int, calls: int, adapter_dir: str, store: str
) -> dict[str, Any]:
    import snakepool

    src = os.path.realpath(os.path.join(tree, "src"))
    host_file = os.path.realpath(snakepool.__file__)
    if not host_file.startswith(src + os.sep):
        raise RuntimeError(f"imported {host_file}, not the snakepool of {src}")
    metrics: dict[str, float] = {}
    if scenario in ("plain", "both"):
        metrics.update(await _plain(workers, calls))
    if scenario == "socket":
        metrics.update(await _socket(workers, calls))
    if scenario in ("session", "both"):
        found, worker_file = await _session(workers, calls, adapter_dir, store)
        metrics.update(found)
    else:
        worker_file = await _worker_file(adapter_dir)
    worker_file = os.path.realpath(worker_file)
    if not worker_file.startswith(src + os.sep):
        raise RuntimeError(f"a worker imported {worker_file}, not the snakepool of {src}")
    return {"host_file": host_file, "worker_file": worker_file, "metrics": metrics}


def child_main(argv: Sequence[str]) -> int:
    tree, scenario, workers, calls, adapter_dir, store = argv
    result = asyncio.run(_child(tree, scenario, int(workers), int(calls), adapter_dir, store))
    print(json.dumps(result))
    return 0


async def _paired_child(tree: str, workers: int) -> None:
    """``--paired``: one pool for the whole run; commands on stdin, one JSON line each.

    ``burst N`` -> {"calls_s", "cpu_us"}; ``seq N`` -> {"latencies_us": [...]}.
    """
    import snakepool

    loop = asyncio.get_running_loop()
    async with snakepool.Pool("generic", size=workers) as pool:

        async def echo(i: int) -> Any:
            return await pool.call("echo", {"value": i})

        await _burst(echo, 2000)  # warm-up
        pids = [w.pid for w in pool.statistics().workers if w.pid is not None]
        # (its workers run this interpreter with this PYTHONPATH: the same snakepool)
        print(json.dumps({"host_file": snakepool.__file__}), flush=True)
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            what, count = line.split()
            if what == "burst":
                before, host_before = _cpu_seconds(pids), time.process_time()
                calls_s = await _burst(echo, int(count))
                made = CALLERS * max(1, int(count) // CALLERS)
                found = {
                    "calls_s": calls_s,
                    "cpu_us": (_cpu_seconds(pids) - before) / made * 1e6,
                    "host_cpu_us": (time.process_time() - host_before) / made * 1e6,
                }
            else:
                latencies = []
                for i in range(int(count)):
                    started = time.perf_counter()
                    await echo(i)
                    latencies.append((time.perf_counter() - started) * 1e6)
                found = {"latencies_us": latencies}
            print(json.dumps(found), flush=True)


# --- the parent: trees, rounds, tables ----------------------------------------------------


@dataclass
class Side:
    name: str  # "old" or "new"
    label: str  # what the tables call it
    tree: Path
    worktree: bool  # made with ``git worktree add`` (removed with ``git worktree remove``)


def _git(*args: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(REPO), *args], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"git {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout.strip()


def _compile(tree: Path) -> None:
    """Byte-compile the tree so that no side pays (or races on) its first import."""
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(tree / "src")], check=False)


def _checkout(name: str, ref: str, workdir: Path) -> Side:
    sha = _git("rev-parse", "--verify", f"{ref}^{{commit}}")
    tree = workdir / name
    _git("worktree", "add", "--detach", str(tree), sha)
    _compile(tree)
    return Side(name, f"{ref} ({sha[:9]})", tree, worktree=True)


def _snapshot(workdir: Path) -> Side:
    """The working tree's src as it is now (uncommitted changes included)."""
    tree = workdir / "new"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO / "src", tree / "src", ignore=ignore)
    _compile(tree)
    dirty = " + uncommitted changes" if _git("status", "--porcelain", "--", "src") else ""
    return Side(
        "new", f"working tree ({_git('rev-parse', '--short=9', 'HEAD')}{dirty})", tree, False
    )


def _remove(side: Side) -> None:
    if side.worktree:
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "remove", "--force", str(side.tree)],
            capture_output=True,
            check=False,
        )


@contextlib.contextmanager
def _sides(old_ref: str, new_ref: str | None) -> Iterator[tuple[Path, list[Side]]]:
    """The two trees in a temporary directory, and the adapter module beside them."""
    workdir = Path(tempfile.mkdtemp(prefix="snakepool-ab-")).resolve()
    sides: list[Side] = []
    try:
        (workdir / f"{ADAPTER_MODULE}.py").write_text(ADAPTER_SOURCE)
        sides.append(_checkout("old", old_ref, workdir))
        sides.append(_checkout("new", new_ref, workdir) if new_ref else _snapshot(workdir))
        yield workdir, sides
    finally:
        for side in sides:
            _remove(side)
        shutil.rmtree(workdir, ignore_errors=True)


def _run_child(side: Side, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(side.tree / "src"), env.get("PYTHONPATH")])
    )
    command = [sys.executable, __file__, "_child", str(side.tree), args.scenario]
    command += [str(args.workers), str(args.calls), str(workdir), args.store_url]
    child = subprocess.Popen(
        command,
        env=env,
        cwd=workdir,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = child.communicate(timeout=CHILD_TIMEOUT)
    except BaseException:
        os.killpg(child.pid, signal.SIGKILL)
        child.communicate()
        raise
    if child.returncode != 0:
        raise RuntimeError(f"the {side.name} child failed (exit {child.returncode}):\n{err}")
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def _order(sides: list[Side], round_index: int) -> list[Side]:
    """ABBA: old first in even rounds, new first in odd ones."""
    return sides if round_index % 2 == 0 else sides[::-1]


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _rounds(sides: list[Side], args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    values: dict[str, dict[str, list[float]]] = {side.name: {} for side in sides}
    files: dict[str, dict[str, str]] = {}
    for r in range(args.rounds):
        for side in _order(sides, r):
            found = _run_child(side, args, workdir)
            if side.name not in files:
                files[side.name] = {k: found[k] for k in ("host_file", "worker_file")}
                where = f"{found['host_file']} (workers: {found['worker_file']})"
                print(f"{side.name}: snakepool from {where}")
            for key, value in found["metrics"].items():
                values[side.name].setdefault(key, []).append(value)
            shown = ", ".join(f"{k} {v:,.3g}" for k, v in found["metrics"].items())
            _progress(f"round {r + 1}/{args.rounds} {side.name}: {shown}")
    return {"values": values, "files": files}


def _paired_rounds(sides: list[Side], args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """``--paired``: both children at once, taking turns in short slices (see above)."""
    children: dict[str, subprocess.Popen[str]] = {}
    files: dict[str, dict[str, str]] = {}

    def ask(side: Side, command: str) -> dict[str, Any]:
        child = children[side.name]
        assert child.stdin is not None and child.stdout is not None
        child.stdin.write(command + "\n")
        child.stdin.flush()
        line = child.stdout.readline()
        if not line:
            raise RuntimeError(
                f"the {side.name} child ended: {child.stderr.read() if child.stderr else ''}"
            )
        found: dict[str, Any] = json.loads(line)
        return found

    try:
        for side in sides:
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join(
                filter(None, [str(side.tree / "src"), env.get("PYTHONPATH")])
            )
            command = [sys.executable, __file__, "_paired", str(side.tree), str(args.workers)]
            children[side.name] = child = subprocess.Popen(
                command, env=env, cwd=workdir, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, text=True, start_new_session=True,
            )  # fmt: skip
            assert child.stdout is not None
            files[side.name] = json.loads(child.stdout.readline() or "{}")
            print(f"{side.name}: snakepool from {files[side.name].get('host_file')}")
        values: dict[str, dict[str, list[float]]] = {side.name: {} for side in sides}
        burst, slices = max(CALLERS, args.calls // 4), max(1, SEQUENTIAL_CALLS // 20 // 4)
        for r in range(args.rounds):
            rates: dict[str, list[float]] = {side.name: [] for side in sides}
            cpus: dict[str, list[float]] = {side.name: [] for side in sides}
            host_cpus: dict[str, list[float]] = {side.name: [] for side in sides}
            latencies: dict[str, list[float]] = {side.name: [] for side in sides}
            for turn in range(4):
                for side in _order(sides, r * 4 + turn):
                    found = ask(side, f"burst {burst}")
                    rates[side.name].append(found["calls_s"])
                    cpus[side.name].append(found["cpu_us"])
                    host_cpus[side.name].append(found["host_cpu_us"])
            for turn in range(slices * 4):
                for side in _order(sides, turn):
                    latencies[side.name] += ask(side, "seq 20")["latencies_us"]
            for side in sides:
                got = values[side.name]
                got.setdefault("plain_calls_s", []).append(statistics.median(rates[side.name]))
                got.setdefault("plain_cpu_us", []).append(statistics.median(cpus[side.name]))
                host_cpu = statistics.median(host_cpus[side.name])
                got.setdefault("plain_host_cpu_us", []).append(host_cpu)
                got.setdefault("plain_p50_us", []).append(statistics.median(latencies[side.name]))
            shown = "; ".join(
                f"{name}: {v['plain_calls_s'][-1]:,.0f} calls/s, p50 {v['plain_p50_us'][-1]:.1f} us, "
                f"{v['plain_cpu_us'][-1]:.1f} us CPU"
                for name, v in values.items()
            )
            _progress(f"round {r + 1}/{args.rounds}: {shown}")
        return {"values": values, "files": files}
    finally:
        for child in children.values():
            with contextlib.suppress(OSError):
                os.killpg(child.pid, signal.SIGKILL)
            child.communicate()


def _summaries(values: dict[str, dict[str, list[float]]], tolerance: float) -> dict[str, Any]:
    metrics: dict[str, Any] = {}
    for metric in METRICS:
        old, new = values["old"].get(metric.key), values["new"].get(metric.key)
        if not old or not new:
            continue
        old_median, new_median = statistics.median(old), statistics.median(new)
        ratio = new_median / old_median
        higher = metric.higher_is_better
        within = ratio >= 1 - tolerance if higher else ratio <= 1 + tolerance
        metrics[metric.key] = {
            "title": metric.title,
            "unit": metric.unit,
            "higher_is_better": higher,
            "old": old,
            "new": new,
            "old_median": old_median,
            "new_median": new_median,
            "new_over_old": ratio,
            "within_tolerance": within,
        }
    return metrics


def _fmt(value: float, unit: str) -> str:
    if unit == "ratio":
        return f"{value:.3f}"
    return f"{value:,.1f}" if unit == "us" else f"{value:,.0f}"


def _table(metric: dict[str, Any], tolerance: float) -> str:
    unit = metric["unit"]
    better = "higher" if metric["higher_is_better"] else "lower"
    rows = [["round", "old", "new", "new/old"]]
    for i, (old, new) in enumerate(zip(metric["old"], metric["new"], strict=True)):
        rows.append([str(i + 1), _fmt(old, unit), _fmt(new, unit), f"{new / old:.3f}"])
    medians = metric["old_median"], metric["new_median"]
    rows.append(["median", *(_fmt(m, unit) for m in medians), f"{metric['new_over_old']:.3f}"])
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    lines = [f"{metric['title']} [{unit}, {better} is better]"]
    for row in rows:
        lines.append("  " + "  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)))
    change = (metric["new_over_old"] - 1) * 100
    verdict = "ok" if metric["within_tolerance"] else "WORSE"
    lines.append(
        f"  new vs old (medians): {change:+.1f}%: {verdict} "
        f"(allowed: {tolerance:.0%} {'lower' if metric['higher_is_better'] else 'higher'})"
    )
    return "\n".join(lines)


def _machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": sys.version.split()[0],
    }


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python stress/ab.py",
        description="Old commit against new in alternating rounds (see the module docstring).",
    )
    parser.add_argument("old_ref", help="the old commit (any git revision)")
    parser.add_argument("new_ref", nargs="?", help="the new commit (default: the working tree)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds (default 5)")
    parser.add_argument("--calls", type=int, default=20000, help="calls per measurement (20000)")
    parser.add_argument("--workers", type=int, default=2, help="pool size (default 2)")
    parser.add_argument(
        "--scenario", choices=("plain", "session", "both", "socket"), default="both"
    )
    parser.add_argument(
        "--store",
        choices=("memory", "redis"),
        default="memory",
        help="the session scenario's store; redis: a redis-server started on loopback",
    )
    parser.add_argument(
        "--paired",
        action="store_true",
        help="plain scenario: both versions alive at once, taking turns in short slices",
    )
    parser.add_argument("--tolerance", type=float, default=0.10, help="verdict band (0.10)")
    parser.add_argument("--json", metavar="OUT", help="also write the results as JSON")
    return parser


@contextlib.contextmanager
def _store(args: argparse.Namespace) -> Iterator[str]:
    """The session store's URL: ``memory``, or a ``redis-server`` of this run's own."""
    if args.store == "memory":
        yield "memory"
        return
    from redis_sessions import redis_server  # (stress/: this script's directory)

    with redis_server() as url:
        yield url


def _sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # so that the worktrees are removed


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_child"]:
        return child_main(argv[1:])
    if argv[:1] == ["_paired"]:
        asyncio.run(_paired_child(argv[1], int(argv[2])))
        return 0
    args = _parser().parse_args(argv)
    if args.rounds < 1 or args.calls < CALLERS or args.workers < 1:
        raise SystemExit(f"need --rounds >= 1, --calls >= {CALLERS}, --workers >= 1")
    if args.paired:
        args.scenario = "plain"  # (the only one measured in slices)
    signal.signal(signal.SIGTERM, _sigterm)
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]  # (progress: stderr)
    machine = _machine()
    with _store(args) as args.store_url, _sides(args.old_ref, args.new_ref) as (workdir, sides):
        labels = {side.name: side.label for side in sides}
        print(f"old: {labels['old']}\nnew: {labels['new']}")
        print(
            f"{args.rounds} rounds (ABBA), scenario {args.scenario} (store {args.store}), "
            f"{args.workers} workers, "
            f"{args.calls} calls per measurement, {machine['cpus']} CPUs, "
            f"load {machine['load_average']}"
        )
        try:
            measured = (_paired_rounds if args.paired else _rounds)(sides, args, workdir)
        except RuntimeError as error:
            print(error, file=sys.stderr)
            return 1
    metrics = _summaries(measured["values"], args.tolerance)
    print()
    print("\n\n".join(_table(metric, args.tolerance) for metric in metrics.values()))
    if args.json:
        result = {
            "old": {"label": labels["old"], **measured["files"]["old"]},
            "new": {"label": labels["new"], **measured["files"]["new"]},
            "workdir": str(workdir),
            "rounds": args.rounds,
            "calls": args.calls,
            "workers": args.workers,
            "scenario": args.scenario,
            "store": args.store,
            "tolerance": args.tolerance,
            "machine": {**machine, "load_average_after": _machine()["load_average"]},
            "metrics": metrics,
        }
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
