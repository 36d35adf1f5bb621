"""Sessions shared through Redis at scale (issue 19), against a ``redis-server`` of its own.

Two scenarios, each a set of real host processes (``--url`` to use a Redis of your own):

``hosts``: one *setter* host sets two variables of each of ``--sessions`` sessions
together (``set_many({"n": v, "m": v})``, ``v`` counting up per session) and, once
``set_many`` returned, records ``v`` as acknowledged (a plain Redis key). ``--hosts``
*caller* hosts (each a pool of ``--workers`` workers, ``--callers`` concurrent callers)
read the acknowledged value ``a`` of a session, then call a handler that returns the
session's ``ctx.variables``. Every call must see ``n == m`` (one whole ``set_many``)
and ``n >= a`` (at least as new as the last set acknowledged before it started); at
the end every host must see each session's last value (no lost update). Exit 1 on any
violation.

``rss``: one host creates ``--sessions`` sessions with a short TTL (``--ttl``), makes
a call in every ``--call-every``-th (so its workers hold those too), lets them all expire, and waits until
the pool has forgotten them; the host's RSS must end within ``--rss-limit`` MiB of
where it was after a warm-up of 1,000 sessions. Exit 1 if not.

Run::

    python stress/redis_sessions.py hosts [--hosts 8] [--sessions 64] [--seconds 10]
    python stress/redis_sessions.py rss [--sessions 100000] [--ttl 10] [--call-every 10]

The session-call benchmark against plain calls is ``stress/session_calls.py --store redis``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from snakepool import testing

ADAPTER_SOURCE = """\
from typing import Any

from snakepool.adapters import Adapter, CallContext, command


class Shared(Adapter):
    @command
    def read(self, ctx: CallContext) -> dict[str, Any]:
        return dict(ctx.variables)
"""
ADAPTER = "redis_sessions_adapter:Shared"
POOL_NAME = "redis-sessions"  # the same on every host: the same Redis namespace
WARM_UP_SESSIONS = 1000


# --- a redis-server of our own --------------------------------------------------------------


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    """A throwaway ``redis-server`` on loopback (``snakepool.testing``); yields its URL."""
    try:
        with testing.redis_server() as url:
            yield url
    except FileNotFoundError as exc:
        raise SystemExit(str(exc)) from None


# --- the host processes ---------------------------------------------------------------------


def _session_ids(count: int) -> list[str]:
    return [f"shared-{i}" for i in range(count)]


def _ack_key(session_id: str) -> str:
    return f"redis-sessions-test:ack:{session_id}"


async def _setter(args: argparse.Namespace) -> dict[str, Any]:
    import redis.asyncio as aioredis

    import snakepool

    raw = aioredis.Redis.from_url(args.url)
    async with snakepool.Pool(
        ADAPTER, size=1, session_store=args.url, name=POOL_NAME, max_sessions=10**6
    ) as pool:
        sessions = [await pool.session(i, ttl=600).open() for i in _session_ids(args.sessions)]
        for session in sessions:
            await session.variables.define("n", "int", 0)
            await session.variables.define("m", "int", 0)
        print(json.dumps({"ready": True}), flush=True)
        values = [0] * len(sessions)
        stop = time.monotonic() + args.seconds
        sets = 0
        while time.monotonic() < stop:
            index = sets % len(sessions)
            values[index] += 1
            await sessions[index].variables.set_many({"n": values[index], "m": values[index]})
            await raw.set(_ack_key(sessions[index].id), values[index])  # acknowledged
            sets += 1
    await raw.aclose()
    return {"role": "setter", "sets": sets, "last": values}


async def _caller(args: argparse.Namespace) -> dict[str, Any]:
    import redis.asyncio as aioredis

    import snakepool

    raw = aioredis.Redis.from_url(args.url)
    ids = _session_ids(args.sessions)
    calls = 0
    violations: list[str] = []
    async with snakepool.Pool(
        ADAPTER, size=args.workers, session_store=args.url, name=POOL_NAME, max_sessions=10**6
    ) as pool:
        sessions = [pool.session(i) for i in ids]

        async def one_caller(stop: float) -> None:
            nonlocal calls
            while time.monotonic() < stop:
                session = random.choice(sessions)
                acked = int(await raw.get(_ack_key(session.id)) or 0)
                seen = await session.call("read")
                calls += 1
                if seen["n"] != seen["m"]:
                    violations.append(f"{session.id}: a mixed set_many: {seen}")
                if seen["n"] < acked:
                    violations.append(f"{session.id}: read n={seen['n']} after {acked} was set")

        started = time.monotonic()
        stop = started + args.seconds
        async with asyncio.TaskGroup() as tasks:
            for _ in range(args.callers):
                tasks.create_task(one_caller(stop))
        elapsed = time.monotonic() - started
        print(json.dumps({"done": True}), flush=True)
        sys.stdin.readline()  # the setter has finished: read the last values
        last = [(await session.call("read"))["n"] for session in sessions]
    await raw.aclose()
    return {
        "role": "caller",
        "calls": calls,
        "elapsed": elapsed,
        "violations": violations[:20],
        "last": last,
    }


def host_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=("setter", "caller"))
    parser.add_argument("url")
    parser.add_argument("sessions", type=int)
    parser.add_argument("seconds", type=float)
    parser.add_argument("workers", type=int)
    parser.add_argument("callers", type=int)
    args = parser.parse_args(argv)
    result = asyncio.run(_setter(args) if args.role == "setter" else _caller(args))
    print(json.dumps(result), flush=True)
    return 0


def _spawn(adapters: str, *args: object) -> subprocess.Popen[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [adapters, env.get("PYTHONPATH")]))
    return subprocess.Popen(
        [sys.executable, __file__, "_host", *map(str, args)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )


def _line(process: subprocess.Popen[str]) -> dict[str, Any]:
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line:
        raise RuntimeError(f"host process {process.pid} exited (status {process.wait()})")
    found: dict[str, Any] = json.loads(line)
    return found


def hosts(args: argparse.Namespace, url: str, adapters: str) -> int:
    setter = _spawn(adapters, "setter", url, args.sessions, args.seconds, 1, 1)
    callers: list[subprocess.Popen[str]] = []
    try:
        _line(setter)  # the sessions exist, their variables are defined
        for _ in range(args.hosts):
            callers.append(
                _spawn(adapters, "caller", url, args.sessions, args.seconds, args.workers,
                       args.callers)
            )  # fmt: skip
        for caller in callers:
            _line(caller)  # done calling
        set_result = _line(setter)
        for caller in callers:
            assert caller.stdin is not None
            caller.stdin.write("\n")
            caller.stdin.flush()
        results = [_line(caller) for caller in callers]
    finally:
        for process in [setter, *callers]:
            process.kill()
            process.wait()
    calls = sum(r["calls"] for r in results)
    elapsed = max(r["elapsed"] for r in results)
    violations = [v for r in results for v in r["violations"]]
    lost = [
        f"host {i}: session {s} ended at n={seen}, the last set was {last}"
        for i, r in enumerate(results)
        for s, (seen, last) in enumerate(zip(r["last"], set_result["last"], strict=True))
        if seen != last
    ]
    print(
        f"{args.hosts} caller hosts x {args.callers} callers ({args.workers} workers each), "
        f"{args.sessions} sessions: {calls:,} calls ({calls / elapsed:,.0f}/s), "
        f"{set_result['sets']:,} set_many by the setter host"
    )
    for problem in (violations + lost)[:20]:
        print("VIOLATION:", problem)
    print("ok: every call saw a whole set_many, at least as new as the last acknowledged one; "
          "no update lost" if not violations and not lost else "FAILED")  # fmt: skip
    return 0 if not violations and not lost and calls else 1


# --- rss: many sessions through one host ---------------------------------------------------


async def _rss(args: argparse.Namespace, url: str) -> int:
    import psutil

    import snakepool

    me = psutil.Process()

    async with snakepool.Pool(
        ADAPTER, size=args.workers, session_store=url, name=POOL_NAME, max_sessions=10**7
    ) as pool:
        late = 0  # sessions that expired before their call (a slow machine): no matter here

        async def make(count: int) -> None:
            semaphore = asyncio.Semaphore(64)

            async def one(index: int) -> None:
                nonlocal late
                async with semaphore:
                    session = await pool.session(ttl=args.ttl).open()
                    if index % args.call_every == 0:
                        try:
                            await session.call("read")
                        except snakepool.SessionExpired:
                            late += 1

            async with asyncio.TaskGroup() as tasks:
                for index in range(count):
                    tasks.create_task(one(index))

        async def forgotten() -> None:
            """Every session expired in Redis and forgotten by the pool (its reaper)."""
            manager = pool._sessions_manager()
            deadline = time.monotonic() + args.ttl + 600
            while time.monotonic() < deadline:
                if not (await manager.store.count() or manager.bindings):
                    return
                await asyncio.sleep(0.2)  # (the reaper runs each second)
            raise RuntimeError("the sessions were not all forgotten within 10 minutes")

        await make(min(WARM_UP_SESSIONS, args.sessions))
        await forgotten()
        before = me.memory_info().rss
        started = time.monotonic()
        for done in range(0, args.sessions, 10_000):
            await make(min(10_000, args.sessions - done))
            print(f"  {done + min(10_000, args.sessions - done):,} sessions made, "
                  f"RSS {me.memory_info().rss / 2**20:.0f} MiB", flush=True)  # fmt: skip
        made = time.monotonic() - started
        await forgotten()
        after = me.memory_info().rss
    growth = (after - before) / 2**20
    print(
        f"{args.sessions:,} sessions (TTL {args.ttl:g} s, a call in every {args.call_every}) "
        f"made in {made:.1f} s, "
        f"all expired and forgotten after {time.monotonic() - started:.1f} s; host RSS "
        f"{before / 2**20:.0f} -> {after / 2**20:.0f} MiB ({growth:+.1f} MiB, "
        f"limit {args.rss_limit:g})" + (f"; {late} expired before their call" if late else "")
    )
    return 0 if growth <= args.rss_limit else 1


# --- the command line -----------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python stress/redis_sessions.py", description=__doc__.splitlines()[0]
    )
    parser.add_argument("scenario", choices=("hosts", "rss"))
    parser.add_argument("--url", help="a Redis of your own (default: start one on loopback)")
    parser.add_argument("--hosts", type=int, default=8, help="caller host processes (8)")
    parser.add_argument("--sessions", type=int, help="sessions (hosts: 64; rss: 100,000)")
    parser.add_argument("--seconds", type=float, default=10.0, help="hosts: how long (10)")
    parser.add_argument("--workers", type=int, default=1, help="workers per host (1)")
    parser.add_argument("--callers", type=int, default=16, help="hosts: callers per host (16)")
    parser.add_argument("--ttl", type=float, default=10.0, help="rss: session TTL in s (10)")
    parser.add_argument(
        "--call-every", type=int, default=10, help="rss: a call in every Nth session (10)"
    )
    parser.add_argument("--rss-limit", type=float, default=50.0, help="rss: MiB (50)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_host"]:
        return host_main(argv[1:])
    args = _parser().parse_args(argv)
    if args.sessions is None:
        args.sessions = 64 if args.scenario == "hosts" else 100_000
    with contextlib.ExitStack() as stack:
        url = args.url or stack.enter_context(redis_server())
        adapters = stack.enter_context(tempfile.TemporaryDirectory(prefix="snakepool-rs-"))
        Path(adapters, "redis_sessions_adapter.py").write_text(ADAPTER_SOURCE)
        if args.scenario == "hosts":
            return hosts(args, url, adapters)
        sys.path.insert(0, adapters)  # (the workers inherit it)
        return asyncio.run(_rss(args, url))


if __name__ == "__main__":
    sys.exit(main())
