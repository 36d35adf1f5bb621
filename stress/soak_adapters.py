"""The adapter the soaks run in their workers, and host-side helpers they share.

Workers import ``soak_adapters:Soak`` (the pools put this directory on their
``pythonpath``); the soak scripts import the helpers below (``SoakReport``,
``WorkerKiller``, the orphan and fd checks).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import logging
import os
import random
import signal
import time
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import anyio
import psutil

from snakepool.adapters import Adapter, CallContext, command

STRESS_DIR = str(Path(__file__).resolve().parent)
ADAPTER = "soak_adapters:Soak"


# --- the worker side ---------------------------------------------------------------


class Soak(Adapter):
    """Echo, streams and session state: what the soaks check against."""

    @command
    async def echo(self, value: Any = None, delay: float = 0.0) -> Any:
        """Return ``value`` (after ``delay`` seconds, so that kills find calls in flight)."""
        if delay:
            await anyio.sleep(delay)
        return value

    @command
    async def count(self, n: int, delay: float = 0.0) -> AsyncIterator[int]:
        for i in range(n):
            if delay:
                await anyio.sleep(delay)
            yield i

    @command
    def remember(self, key: str, value: Any, ctx: CallContext) -> int:
        """Keep ``value`` in the session (locally and persisted on the host)."""
        ctx.session_state[key] = value
        ctx.save_state(key, value)
        return os.getpid()

    @command
    def probe(self, var: str, key: str, ctx: CallContext) -> dict[str, Any]:
        """What this worker believes about the session: variable, state, who it is."""
        return {
            "pid": os.getpid(),
            "session": ctx.session_id,
            "var": ctx.variables.get(var) if ctx.variables is not None else None,
            "state": ctx.session_state.get(key),
            "restored_on": ctx.session_state.get("__restored_on"),
        }

    def restore_session(self, ctx: CallContext, state: dict[str, Any]) -> None:
        ctx.session_state.update(state)
        ctx.session_state["__restored_on"] = os.getpid()


# --- host-side helpers -----------------------------------------------------------------


@dataclasses.dataclass
class SoakReport:
    """What a soak counted and every rule it saw broken (``ok`` when none)."""

    name: str
    counts: dict[str, int] = dataclasses.field(default_factory=dict)
    errors: dict[str, int] = dataclasses.field(default_factory=dict)
    info: dict[str, Any] = dataclasses.field(default_factory=dict)
    violations: list[str] = dataclasses.field(default_factory=list)
    examples: dict[str, str] = dataclasses.field(default_factory=dict)
    elapsed: float = 0.0

    def __post_init__(self) -> None:
        self._t0 = time.monotonic()

    @property
    def ok(self) -> bool:
        return not self.violations

    def count(self, key: str, n: int = 1) -> None:
        self.counts[key] = self.counts.get(key, 0) + n

    def error(self, key: str, exc: BaseException | None = None) -> None:
        """Count an error of kind ``key``; the first one's message is kept as an example."""
        self.errors[key] = self.errors.get(key, 0) + 1
        if exc is not None and key not in self.examples:
            self.examples[key] = f"at {time.monotonic() - self._t0:.2f}s: {exc}".splitlines()[0]

    def violate(self, message: str, *, limit: int = 20) -> None:
        """Record a broken rule (the first ``limit`` in full, then only a count)."""
        if len(self.violations) < limit:
            self.violations.append(message)
        else:
            self.count("violations_not_shown")

    def summary(self) -> str:
        lines = [f"== {self.name}: {'OK' if self.ok else 'FAILED'} in {self.elapsed:.1f}s"]
        lines += [f"  {key}: {value}" for key, value in sorted(self.counts.items())]
        if self.errors:
            lines.append("  errors by type:")
            lines += [f"    {key}: {value}" for key, value in sorted(self.errors.items())]
            lines.append("  first error of each type:")
            lines += [f"    {key}: {text}" for key, text in sorted(self.examples.items())]
        lines += [f"  {key}: {value}" for key, value in self.info.items()]
        if self.violations:
            lines.append(f"  VIOLATIONS ({len(self.violations)}):")
            lines += [f"    - {v}" for v in self.violations]
            hidden = self.counts.get("violations_not_shown")
            if hidden:
                lines.append(f"    ... and {hidden} more")
        return "\n".join(lines)


async def finish_report(
    report: SoakReport, seen: set[int], fds_before: int, started: float
) -> SoakReport:
    """The checks every pool soak ends with: no orphans, no fd growth, timing."""
    await check_no_orphans(report, seen)
    report.counts["workers_seen"] = len(seen)
    gc.collect()
    check_fds(report, fds_before, num_fds())
    report.elapsed = time.monotonic() - started
    return report


def add_kill_arguments(parser: argparse.ArgumentParser) -> None:
    """Options the worker-killing soaks share."""
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--min-worker-age",
        type=float,
        default=0.0,
        help="only kill workers this many seconds old (5 keeps clear of the crash-loop backoff)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show the pool's warnings")


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.WARNING if verbose else logging.ERROR,
        format="%(relativeCreated)8.0fms %(name)s %(levelname)s %(message)s",
    )


def num_fds() -> int:
    return int(psutil.Process().num_fds())


def worker_children() -> dict[int, str]:
    """This process's descendants that run ``snakepool.workers``."""
    found: dict[int, str] = {}
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            cmdline = " ".join(child.cmdline())
            if "snakepool.workers" in cmdline:
                found[child.pid] = cmdline
    return found


def alive(pid: int) -> bool:
    """True if ``pid`` exists; a zombie counts (nobody waited for it)."""
    try:
        return psutil.Process(pid).status() is not None
    except psutil.Error:
        return False


async def check_no_orphans(report: SoakReport, seen: Iterable[int], timeout: float = 10.0) -> None:
    """After the pool closed: no worker we ever saw, and no worker child, is left."""
    seen = set(seen)
    deadline = anyio.current_time() + timeout
    while True:
        left = {pid for pid in seen if alive(pid) and _is_worker(pid)}
        children = worker_children()
        if not left and not children:
            return
        if anyio.current_time() > deadline:
            break
        await anyio.sleep(0.05)
    for pid in sorted(left | set(children)):
        report.violate(f"orphan worker process left after close: pid {pid} {_describe(pid)}")
        with contextlib.suppress(psutil.Error):
            psutil.Process(pid).kill()


def _is_worker(pid: int) -> bool:
    try:
        return "snakepool.workers" in " ".join(psutil.Process(pid).cmdline())
    except psutil.ZombieProcess:
        return True  # a zombie that was a worker of ours (its parent never reaped it)
    except psutil.Error:
        return False


def _describe(pid: int) -> str:
    try:
        proc = psutil.Process(pid)
        return f"(status {proc.status()}, parent {proc.ppid()})"
    except psutil.Error:
        return "(gone)"


def check_fds(report: SoakReport, before: int, after: int, slack: int = 4) -> None:
    report.info["fds"] = f"{before} before, {after} after"
    if after > before + slack:
        report.violate(f"file descriptors grew from {before} to {after} (slack {slack})")


class WorkerKiller:
    """SIGKILLs a random ready worker of ``pool`` every ``every`` completed calls (jittered).

    ``min_age``: only kill workers at least that many seconds old (waiting for
    one if none is). The pool treats a worker that dies younger than 5 s as a
    crash loop and backs its restart off exponentially (up to 30 s), so with
    ``min_age=0`` a fast killer measures that policy too.
    """

    def __init__(self, pool: Any, every: int, rng: random.Random, min_age: float = 0.0) -> None:
        self.pool = pool
        self.every = every
        self.rng = rng
        self.min_age = min_age
        self.born: dict[int, float] = {}
        self.completed = 0
        self.kills = 0
        self.killed: set[int] = set()
        self.kill_times: list[float] = []
        self._next = self._gap()
        self._due = anyio.Event()

    def _gap(self) -> int:
        return max(1, int(self.every * self.rng.uniform(0.7, 1.3)))

    def done(self) -> None:
        """Called once per resolved call."""
        self.completed += 1
        if self.completed >= self._next:
            self._due.set()

    async def run(self) -> None:
        """Kill until cancelled."""
        while True:
            await self._due.wait()
            self._due = anyio.Event()
            self._next = self.completed + self._gap()
            while True:
                now = time.monotonic()
                ready = []
                for w in self.pool.statistics().workers:
                    if w.pid is None or w.state not in ("idle", "busy") or w.pid in self.killed:
                        continue
                    if now - self.born.setdefault(w.pid, now) >= self.min_age:
                        ready.append(w.pid)
                if ready:
                    break
                await anyio.sleep(0.01)
            pid = self.rng.choice(ready)
            self.killed.add(pid)
            self.kills += 1  # before the signal: calls that see its effect see the new epoch
            self.kill_times.append(time.monotonic())
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


async def wait_full_size(pool: Any, report: SoakReport, timeout: float = 30.0) -> float:
    """Poll until every worker slot is ready again; returns the seconds it took."""
    start = anyio.current_time()
    with anyio.move_on_after(timeout):
        while True:
            stats = pool.statistics()
            if stats.ready_workers == stats.size:
                return anyio.current_time() - start
            await anyio.sleep(0.05)
    stats = pool.statistics()
    report.violate(
        f"pool did not return to full size within {timeout:g}s: {stats.ready_workers}/{stats.size} "
        f"ready ({[(w.id, w.pid, w.state) for w in stats.workers]})"
    )
    return timeout


def rss_mb() -> float:
    return float(psutil.Process().memory_info().rss) / 2**20
