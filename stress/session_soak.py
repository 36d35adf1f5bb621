"""Session soak: many sessions with variables and persisted state while workers die.

Each session defines a variable and sets it to session-specific values,
persists session-specific state with ``ctx.save_state``, and probes the
worker it lands on. Whatever a call sees must be the session's own and
current: its id, the variable value set last (never a stale or a foreign
one), the state saved last (rebuilt by ``restore_session`` on a new worker).
With ``affinity="strict_queue"`` a session only changes worker when its
worker was killed (so between two kills all its calls land on one pid).

Run: python stress/session_soak.py [--sessions 1000] [--calls-per-session 20] [--kill-every 200]
Exit status 1 if any rule was broken (the summary says which).
"""

from __future__ import annotations

import argparse
import gc
import random
import sys
import time
from typing import Any

import anyio
from soak_adapters import (
    ADAPTER,
    STRESS_DIR,
    SoakReport,
    WorkerKiller,
    add_kill_arguments,
    finish_report,
    num_fds,
    setup_logging,
    wait_full_size,
)

import snakepool
from snakepool import SnakepoolError

CALL_TIMEOUT = 10.0
HANG_AFTER = 2 * CALL_TIMEOUT + 5.0
VAR, KEY = "owner", "token"


def _pool(workers: int) -> snakepool.Pool:
    return snakepool.Pool(
        ADAPTER,
        name="sessions",
        size=workers,
        pythonpath=[STRESS_DIR],
        call_timeout=CALL_TIMEOUT,
        affinity="strict_queue",
    )


async def session_soak(
    sessions: int,
    calls_per_session: int,
    kill_every: int,
    workers: int = 4,
    seed: int = 0,
    concurrency: int = 16,
    min_worker_age: float = 0.0,
) -> SoakReport:
    """Run ``sessions`` sessions (``concurrency`` at a time) of ``calls_per_session``
    steps each, killing a worker every ``kill_every`` resolved calls."""
    report = SoakReport("session soak")
    report.info["settings"] = (
        f"sessions={sessions} calls_per_session={calls_per_session} kill_every={kill_every} "
        f"workers={workers} concurrency={concurrency} seed={seed} min_worker_age={min_worker_age}"
    )
    rng = random.Random(seed)
    started = time.monotonic()
    async with _pool(1) as warm, warm.session() as s:
        await s.call("remember", {"key": KEY, "value": 0})
    gc.collect()
    fds_before = num_fds()

    seen: set[int] = set()
    pool = _pool(workers)
    pool.add_listener(
        lambda e: (
            seen.add(e.data["pid"]) if e.name == "worker.started" and e.data.get("pid") else None
        )
    )
    try:
        async with pool:
            seen.update(w.pid for w in pool.statistics().workers if w.pid)
            killer = WorkerKiller(pool, kill_every, random.Random(rng.random()), min_worker_age)
            limiter = anyio.Semaphore(concurrency)

            async def one_session(n: int) -> None:
                srng = random.Random(rng.random())
                async with limiter, pool.session() as s:
                    sid, label = s.id, f"#{n}"
                    var_value = f"{sid}/v0"
                    await s.variables.define(VAR, "str", var_value)
                    state_ok: set[Any] = {None}  # what the state may be (several while unsure)
                    last_pid: int | None = None
                    pids: set[int] = set()

                    def landed(pid: int) -> None:
                        nonlocal last_pid
                        if last_pid is not None and pid != last_pid:
                            report.count("session_moves")
                            if last_pid not in killer.killed:
                                report.violate(
                                    f"session {label} moved from pid {last_pid} to {pid} "
                                    "though its worker was never killed (strict_queue)"
                                )
                        last_pid = pid
                        pids.add(pid)

                    for step in range(calls_per_session):
                        roll = srng.random()
                        if roll < 0.15:
                            var_value = f"{sid}/v{step + 1}"
                            await s.variables.set(VAR, var_value)
                            report.count("variable_sets")
                            continue
                        if roll < 0.35:
                            new = f"{sid}/s{step}"
                            pid = await _call(s, sid, label, "remember", {"key": KEY, "value": new})
                            if pid is None:  # it may or may not have been saved before the crash
                                state_ok = state_ok | {new}
                            else:
                                state_ok = {new}
                                landed(pid)
                            continue
                        got = await _call(s, sid, label, "probe", {"var": VAR, "key": KEY})
                        if got is None:
                            continue
                        report.count("probes")
                        landed(got["pid"])
                        if got["session"] != sid:
                            report.violate(
                                f"session {label}: call ran as session {got['session']!r}"
                            )
                        if got["var"] != var_value:
                            what = (
                                "stale"
                                if isinstance(got["var"], str) and got["var"].startswith(sid)
                                else "foreign"
                            )
                            report.violate(
                                f"session {label} step {step}: {what} variable {got['var']!r}, "
                                f"set to {var_value!r} (pid {got['pid']})"
                            )
                        if got["state"] not in state_ok:
                            what = (
                                "stale"
                                if isinstance(got["state"], str) and got["state"].startswith(sid)
                                else "foreign or lost"
                            )
                            report.violate(
                                f"session {label} step {step}: {what} state {got['state']!r}, "
                                f"expected one of {sorted(map(str, state_ok))} (pid {got['pid']}, "
                                f"restored on {got['restored_on']})"
                            )
                        else:
                            state_ok = {got["state"]}  # now known
                        if got["restored_on"] is not None:
                            report.count("probes_on_restored_workers")
                    report.count("sessions")
                    if len(pids) > 1:
                        report.count("sessions_that_moved")

            async def guarded_session(n: int) -> None:
                try:
                    await one_session(n)
                except Exception as exc:  # a host-side session operation failed
                    report.error(f"{type(exc).__name__} outside a call", exc)
                    report.violate(f"session #{n} failed: {type(exc).__name__}: {exc}")

            async def _call(
                s: snakepool.Session, sid: str, label: str, command: str, args: dict[str, Any]
            ) -> Any:
                report.count("calls")
                try:
                    with anyio.fail_after(HANG_AFTER):
                        return await s.call(command, args, timeout=CALL_TIMEOUT)
                except SnakepoolError as exc:
                    report.error(f"{type(exc).__name__} ({exc.category.value}) in {command}", exc)
                    if exc.category.value not in ("communication", "protocol"):
                        report.violate(
                            f"session {label} {command}: unexpected {type(exc).__name__}: "
                            f"{str(exc).splitlines()[0]}"
                        )
                    return None
                except TimeoutError:
                    report.violate(f"session {label} {command} hung (> {HANG_AFTER:g}s)")
                    return None
                finally:
                    killer.done()

            async with anyio.create_task_group() as outer:
                outer.start_soon(killer.run)
                async with anyio.create_task_group() as tg:
                    for n in range(sessions):
                        tg.start_soon(guarded_session, n)
                outer.cancel_scope.cancel()

            report.counts["kills"] = killer.kills
            if report.counts.get("sessions", 0) != sessions:
                report.violate(
                    f"{report.counts.get('sessions', 0)} of {sessions} sessions finished"
                )
            recovery = await wait_full_size(pool, report)
            report.info["back to full size after"] = f"{recovery:.2f}s"
            stats = pool.statistics()
            seen.update(w.pid for w in stats.workers if w.pid)
            restarts = sum(w.restarts for w in stats.workers)
            report.counts["worker_restarts"] = restarts
            if restarts != killer.kills:
                report.violate(f"{restarts} worker restarts for {killer.kills} kills")
            if stats.sessions:
                report.violate(f"{stats.sessions} sessions still live after every one was closed")
            report.info["breaker"] = stats.breaker_state
    finally:
        await finish_report(report, seen, fds_before, started)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=1_000)
    parser.add_argument("--calls-per-session", type=int, default=20)
    parser.add_argument("--kill-every", type=int, default=200)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=16)
    add_kill_arguments(parser)
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    report = anyio.run(
        session_soak,
        args.sessions,
        args.calls_per_session,
        args.kill_every,
        args.workers,
        args.seed,
        args.concurrency,
        args.min_worker_age,
    )
    print(report.summary())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
