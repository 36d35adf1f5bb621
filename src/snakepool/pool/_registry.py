"""The run registry: which worker processes each live host started.

Workers normally die with their host (stdin EOF, ``PR_SET_PDEATHSIG``). Where
that could not work (another OS, a worker that blocked signals and never reads
stdin), a later host of the same pool reaps the leftovers on start. Each
worker gets one small JSON file holding its pid, its start time and its
command line, plus the same facts for its host: a pid that the OS reused for
an unrelated process never matches all three, so it is never killed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
from pathlib import Path
from typing import Any

import psutil

from .._paths import ensure_private_dir, runtime_dir

__all__ = ["RunRegistry", "ensure_private_dir", "runtime_dir"]

_log = logging.getLogger("snakepool.pool")
_START_TIME_TOLERANCE = 0.5  # seconds; psutil's create_time is rounded to clock ticks


def _facts(pid: int) -> dict[str, Any] | None:
    try:
        proc = psutil.Process(pid)
        return {"pid": pid, "started": proc.create_time(), "cmdline": proc.cmdline()}
    except psutil.Error:
        return None


def _matches(recorded: dict[str, Any]) -> bool:
    """Is the process ``recorded`` describes still that very process?"""
    now = _facts(int(recorded["pid"]))
    return (
        now is not None
        and abs(float(now["started"]) - float(recorded["started"])) < _START_TIME_TOLERANCE
        and now["cmdline"] == recorded["cmdline"]
    )


class RunRegistry:
    """One pool's entries in the per-user run registry."""

    def __init__(self, pool: str, directory: Path | None = None) -> None:
        self.pool = pool
        self.directory = (directory or runtime_dir()) / "runs"
        self._host = _facts(os.getpid())

    def _path(self, worker_pid: int) -> Path:
        return self.directory / f"{self.pool}.{os.getpid()}.{worker_pid}.json"

    def add(self, worker_pid: int) -> None:
        """Record a worker this host just started (best effort: never fails the pool)."""
        worker = _facts(worker_pid)
        if worker is None or self._host is None:
            return
        try:
            ensure_private_dir(self.directory.parent)
            ensure_private_dir(self.directory)
            record = {"pool": self.pool, "host": self._host, "worker": worker}
            self._path(worker_pid).write_text(json.dumps(record))
        except OSError as exc:
            _log.debug("run registry: cannot record worker %d: %s", worker_pid, exc)

    def remove(self, worker_pid: int) -> None:
        with contextlib.suppress(OSError):
            self._path(worker_pid).unlink()

    def reap_leftovers(self) -> list[int]:
        """Kill workers of this pool whose host is gone; returns their pids."""
        reaped: list[int] = []
        try:
            entries = list(self.directory.glob(f"{self.pool}.*.json"))
        except OSError:
            return reaped
        for path in entries:
            try:
                record = json.loads(path.read_text())
                host, worker = record["host"], record["worker"]
                if record["pool"] != self.pool:
                    continue  # another pool whose name starts like ours
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if _matches(host):
                continue  # its host is alive: not ours to touch
            if _matches(worker):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(int(worker["pid"]), signal.SIGKILL)
                reaped.append(int(worker["pid"]))
                _log.warning(
                    "pool %s: killed leftover worker pid %s of a host (pid %s) that died",
                    self.pool, worker["pid"], host["pid"],
                )  # fmt: skip
            with contextlib.suppress(OSError):
                path.unlink()
        return reaped
