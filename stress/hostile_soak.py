"""Hostile-client soak on the socket server.

A ``SocketServer`` over a pool listens on a Unix socket in a temporary
directory. A well-behaved client keeps calling (calls, streams, sessions)
and must see every request succeed, while each round a crowd of hostile
clients, at once: sends garbage, a 4 GiB length prefix, a huge frame before
``hello``, floods beyond the in-flight limit, leaves mid-call and mid-stream,
never reads its replies, sends invalid request ids, unknown message types and
malformed calls, and runs session operations on random ids.

Checked: the good client never fails, the pool keeps its full size with no
worker restarts, the process's RSS stays bounded, every connection the server
drops is closed (and every hostile connection ends on the server side), and
file descriptors do not grow.

Run: python stress/hostile_soak.py [--rounds 200]
Exit status 1 if any rule was broken (the summary says which).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import random
import shutil
import struct
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
from soak_adapters import (
    ADAPTER,
    STRESS_DIR,
    SoakReport,
    check_fds,
    check_no_orphans,
    num_fds,
    rss_mb,
)

import snakepool
from snakepool.errors import ProtocolError
from snakepool.protocol import NEED_DATA, FrameDecoder, FrameEncoder, Sentinel
from snakepool.server import SocketServer

POOL = "general"
INFLIGHT_LIMIT = 16
#: A connection the server should drop must be closed within this many seconds.
DROP_WITHIN = 10.0
#: The server drops a client that has not read for this long (snakepool.server).
SEND_TIMEOUT = 30.0


class Raw:
    """A client connection that speaks the framing and nothing else it need not."""

    def __init__(self, stream: anyio.abc.SocketStream) -> None:
        self.stream = stream
        self.decoder = FrameDecoder(2**31)
        self.encoder = FrameEncoder(2**31)
        self.frames: list[dict[str, Any]] = []
        self.closed_by_server = False

    @classmethod
    async def connect(cls, path: Path) -> Raw:
        return cls(await anyio.connect_unix(path))

    async def send_bytes(self, data: bytes) -> bool:
        """Send raw bytes; False if the server already closed the connection."""
        try:
            await self.stream.send(data)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            return False
        return True

    async def send(self, message: Any) -> bool:
        return await self.send_bytes(self.encoder.encode(message))

    async def hello(self) -> None:
        await self.send({"t": "hello", "v": 1})
        welcome = await self.next_frame(10.0)
        if welcome is None or welcome.get("t") != "welcome":
            raise AssertionError(f"no welcome from the server: {welcome!r}")

    async def next_frame(self, timeout: float) -> dict[str, Any] | None:
        """The next frame (None at end of stream); TimeoutError if none comes in time."""
        with anyio.fail_after(timeout):
            while True:
                try:
                    frame = self.decoder.next_frame()
                except ProtocolError:
                    self.closed_by_server = True
                    return None
                if frame is not NEED_DATA and not isinstance(frame, Sentinel):
                    self.frames.append(frame)
                    return frame
                if frame is not NEED_DATA:
                    self.closed_by_server = True
                    return None
                try:
                    data = await self.stream.receive(1 << 20)
                except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                    data = b""
                self.decoder.feed(data)

    async def until_closed(self, timeout: float = DROP_WITHIN) -> bool:
        """Read until the server closes; False if it did not within ``timeout``."""
        with anyio.move_on_after(timeout):
            while await self.next_frame(timeout) is not None:
                pass
            return True
        return False

    async def aclose(self) -> None:
        with contextlib.suppress(Exception):
            await self.stream.aclose()


def _call(i: Any, command: str, args: Any, mode: str = "call", **extra: Any) -> dict[str, Any]:
    return {"t": "call", "i": i, "p": POOL, "c": command, "a": args, "m": mode, **extra}


class Hostile:
    """The attacks: each one opens its own connection and checks the server's answer."""

    def __init__(self, path: Path, report: SoakReport, rng: random.Random, hold: float) -> None:
        self.path = path
        self.report = report
        self.rng = rng
        self.hold = hold

    async def expect_drop(self, raw: Raw, what: str, want_error: bool = True) -> None:
        """The server must send an ``error`` (when ``want_error``) and close the connection."""
        try:
            if not await raw.until_closed():
                self.report.violate(
                    f"{what}: the server did not drop the connection in {DROP_WITHIN:g}s"
                )
                return
            if want_error and not any(f.get("t") == "error" for f in raw.frames):
                self.report.violate(f"{what}: dropped without an 'error' frame ({raw.frames[-3:]})")
            self.report.count("hostile_dropped")
        finally:
            await raw.aclose()

    async def garbage(self) -> None:
        raw = await Raw.connect(self.path)
        junk = self.rng.choice(
            [
                b"\x00\x00\x00\x07GARBAGE",
                b"\x00\x00\x00\x00",  # an empty frame
                struct.pack(">I", 3) + b"\x93\x01\x02",  # a list, not a map
                self.rng.randbytes(self.rng.randint(5, 4000)),
            ]
        )
        await raw.send_bytes(junk)
        # Random bytes may announce a long frame and wait for its body: end it.
        with contextlib.suppress(Exception):
            await raw.stream.send_eof()
        await self.expect_drop(raw, f"garbage {junk[:12]!r}", want_error=False)

    async def four_gib_prefix(self) -> None:
        raw = await Raw.connect(self.path)
        await raw.hello()
        await raw.send_bytes(b"\xff\xff\xff\xff" + b"x" * 4096)
        await self.expect_drop(raw, "4 GiB length prefix")

    async def huge_before_hello(self) -> None:
        raw = await Raw.connect(self.path)
        size = 16 * 2**20
        await raw.send_bytes(struct.pack(">I", size) + b"\x81" + b"y" * (2**20))
        await self.expect_drop(raw, "16 MiB frame before hello")

    async def bad_hello(self) -> None:
        raw = await Raw.connect(self.path)
        await raw.send(
            self.rng.choice(
                [{"t": "hello", "v": 99}, _call(1, "echo", {}), {"t": "status", "i": 1}]
            )
        )
        await self.expect_drop(raw, "wrong first message")

    async def flood(self) -> None:
        raw = await Raw.connect(self.path)
        await raw.hello()
        n = 4 * INFLIGHT_LIMIT
        burst = b"".join(
            raw.encoder.encode(_call(i, "echo", {"value": i, "delay": 0.02}))
            for i in range(1, n + 1)
        )
        await raw.send_bytes(burst)
        answers: dict[int, dict[str, Any]] = {}
        try:
            while len(answers) < n:
                frame = await raw.next_frame(30.0)
                if frame is None:
                    self.report.violate("flood: the server dropped a client that only flooded")
                    break
                answers[frame["i"]] = frame
        except TimeoutError:
            self.report.violate(f"flood: only {len(answers)} of {n} requests answered in 30s")
        refused = sum(1 for a in answers.values() if a.get("y") == "PoolOverloaded")
        wrong = [
            a
            for a in answers.values()
            if (a.get("t") == "result" and a.get("r") != a.get("i"))
            or (a.get("t") == "failure" and a.get("y") != "PoolOverloaded")
        ]
        if wrong:
            self.report.violate(f"flood: wrong answers {wrong[:3]}")
        self.report.count("flood_refused", refused)
        self.report.count("flood_served", len(answers) - refused)
        await raw.aclose()

    async def quit_mid_call(self) -> None:
        raw = await Raw.connect(self.path)
        await raw.hello()
        for i in range(1, 4):
            await raw.send(_call(i, "echo", {"value": i, "delay": 30.0}))
        await anyio.sleep(self.rng.uniform(0.0, 0.2))
        await raw.aclose()

    async def quit_mid_stream(self) -> None:
        raw = await Raw.connect(self.path)
        await raw.hello()
        await raw.send(_call(1, "count", {"n": 10**9, "delay": 0.0005}, mode="stream"))
        for _ in range(self.rng.randint(0, 50)):
            if await raw.next_frame(10.0) is None:
                self.report.violate("mid-stream: the server ended a healthy stream")
                break
        await raw.aclose()

    async def never_reads(self) -> None:
        raw = await Raw.connect(self.path)
        await raw.hello()
        big = b"z" * 2**18
        for i in range(1, INFLIGHT_LIMIT + 1):
            await raw.send(_call(i, "echo", {"value": big}))
        await raw.send(_call(INFLIGHT_LIMIT + 1, "count", {"n": 10**9}, mode="stream"))
        await anyio.sleep(self.hold)  # never reading a byte
        await raw.aclose()

    async def bad_ids(self) -> None:
        raw = await Raw.connect(self.path)
        await raw.hello()
        bad = self.rng.choice(["x", None, True, 1.5, [1], {"a": 1}])
        message = _call(bad, "echo", {"value": 1})
        if bad is None:
            del message["i"]
        await raw.send(message)
        await self.expect_drop(raw, f"request id {bad!r}")

    async def duplicate_id(self) -> None:
        raw = await Raw.connect(self.path)
        await raw.hello()
        await raw.send(_call(7, "echo", {"value": 1, "delay": 5.0}))
        await raw.send(_call(7, "echo", {"value": 2}))
        await self.expect_drop(raw, "duplicate request id in flight")

    async def unknown_type(self) -> None:
        raw = await Raw.connect(self.path)
        await raw.hello()
        await raw.send(self.rng.choice([{"t": "bogus", "i": 1}, {"i": 1}, {"t": 5, "i": 1}]))
        await self.expect_drop(raw, "unknown message type")

    async def malformed_calls(self) -> None:
        """Bad fields in well-framed requests: each gets a failure, the connection stays."""
        raw = await Raw.connect(self.path)
        await raw.hello()
        requests = [
            {"t": "call", "i": 1, "p": "nope", "c": "echo", "a": {}},
            {"t": "call", "i": 2, "p": POOL, "c": 123, "a": {}},
            {"t": "call", "i": 3, "p": POOL, "c": "echo", "a": [1, 2]},
            {"t": "call", "i": 4, "p": POOL, "c": "echo", "a": {}, "m": "bogus"},
            {"t": "call", "i": 5, "p": POOL, "c": "echo", "a": {}, "o": -1},
            {"t": "call", "i": 6, "p": POOL, "c": "echo", "a": {}, "o": "soon"},
            {"t": "call", "i": 7, "p": POOL, "c": "no_such_command", "a": {}},
            {"t": "call", "i": 8, "p": POOL, "c": "echo", "a": {"nope": 1}},
            {"t": "call", "i": 9, "p": POOL, "c": "echo", "a": {}, "s": 42},
            {"t": "call", "i": 10, "p": POOL, "c": "echo", "a": {}, "m": "stream"},
            {"t": "cancel", "i": 999},  # nothing to cancel: ignored
        ]
        for request in requests:
            await raw.send(request)
        await self._answers(raw, "malformed call", expected=10, failures_at_least=9)
        await raw.aclose()

    async def random_sessions(self) -> None:
        """Session operations on ids nobody opened: each gets an answer, nothing breaks."""
        raw = await Raw.connect(self.path)
        await raw.hello()
        ops = [
            ("get", {"name": "x"}),
            ("set", {"name": "x", "value": 1}),
            ("define", {"name": "x", "type": "float", "initial": 0.5}),
            ("close", {}),
            ("get_many", {"names": ["a", "b"]}),
            ("set_many", {"values": {"a": 1}}),
            ("bogus", {}),
            ("set", {"unexpected": 1}),
        ]
        n = 0
        for op, args in self.rng.sample(ops, 4):
            n += 1
            await raw.send(
                {"t": "session", "i": n, "p": POOL, "op": op, "s": uuid.uuid4().hex, "a": args}
            )
        n += 1
        await raw.send(_call(n, "probe", {"var": "x", "key": "y"}, s=uuid.uuid4().hex))
        await self._answers(raw, "random session ops", expected=n, failures_at_least=0)
        await raw.aclose()

    async def never_reads_until_dropped(self) -> None:
        """Never read, and never leave: the server must drop it (after its 30 s send timeout)."""
        raw = await Raw.connect(self.path)
        await raw.hello()
        big = b"z" * 2**18
        for i in range(1, INFLIGHT_LIMIT + 1):
            await raw.send(_call(i, "echo", {"value": big}))
        await anyio.sleep(SEND_TIMEOUT + 5.0)
        # Only now read what is buffered: the connection must end (the drop's
        # 'error' frame may not have fitted in the full socket buffer).
        await self.expect_drop(raw, "a client that never reads", want_error=False)

    async def slowloris(self) -> None:
        raw = await Raw.connect(self.path)
        await raw.send_bytes(b"\x00\x00")  # half a header, then nothing
        await anyio.sleep(self.hold)
        await raw.aclose()

    async def _answers(self, raw: Raw, what: str, expected: int, failures_at_least: int) -> None:
        got: dict[Any, dict[str, Any]] = {}
        try:
            while len(got) < expected:
                frame = await raw.next_frame(15.0)
                if frame is None:
                    self.report.violate(
                        f"{what}: the server dropped the client ({raw.frames[-2:]})"
                    )
                    return
                got[frame.get("i")] = frame
        except TimeoutError:
            self.report.violate(f"{what}: {len(got)} of {expected} answers in 15s")
            return
        failures = [f for f in got.values() if f.get("t") == "failure"]
        for f in failures:
            self.report.count(f"hostile_failure_{f.get('y')}")
        if len(failures) < failures_at_least:
            self.report.violate(f"{what}: only {len(failures)} failures: {list(got.values())}")

    def attacks(self) -> list[Callable[[], Awaitable[None]]]:
        return [
            self.garbage,
            self.four_gib_prefix,
            self.huge_before_hello,
            self.bad_hello,
            self.flood,
            self.quit_mid_call,
            self.quit_mid_stream,
            self.never_reads,
            self.bad_ids,
            self.duplicate_id,
            self.unknown_type,
            self.malformed_calls,
            self.random_sessions,
            self.slowloris,
        ]


async def hostile_soak(
    rounds: int,
    *,
    workers: int = 2,
    worker_concurrency: int = 4,
    seed: int = 0,
    hold: float = 0.5,
    rss_limit_mb: float = 256.0,
    patient: bool = False,
) -> SoakReport:
    """Run ``rounds`` rounds of every attack at once beside a well-behaved client.

    ``hold``: seconds the never-reading and slow clients stay connected.
    ``patient``: the first round also has a client that never reads and never
    leaves, which the server must drop by itself (takes over 30 s).
    """
    report = SoakReport("hostile-client soak")
    report.info["settings"] = (
        f"rounds={rounds} workers={workers}x{worker_concurrency} seed={seed} hold={hold} "
        f"patient={patient}"
    )
    latencies: list[float] = []
    rng = random.Random(seed)
    started = time.monotonic()
    directory = Path(tempfile.mkdtemp(prefix="sp-soak-"))
    path = directory / "s.sock"
    seen: set[int] = set()
    try:
        async with snakepool.Pool(ADAPTER, name="warm", size=1, pythonpath=[STRESS_DIR]) as warm:
            await warm.call("echo", {"value": 1})
        gc.collect()
        fds_before = num_fds()
        pool = snakepool.Pool(
            ADAPTER,
            name=POOL,
            size=workers,
            worker_concurrency=worker_concurrency,
            pythonpath=[STRESS_DIR],
            queue_size=10_000,
        )
        async with pool, anyio.create_task_group() as tg:
            server = SocketServer(
                {POOL: pool}, socket_path=path, max_inflight_per_client=INFLIGHT_LIMIT
            )
            await tg.start(server.serve)
            pids = {w.pid for w in pool.statistics().workers}
            seen.update(p for p in pids if p)
            rss_base = rss_mb()
            rss_peak = rss_base
            stop = anyio.Event()

            async def sample_rss() -> None:
                nonlocal rss_peak
                while True:
                    rss_peak = max(rss_peak, rss_mb())
                    await anyio.sleep(0.1)

            async def good_client() -> None:
                async with snakepool.connect(path) as client:
                    general = client[POOL]
                    i = 0
                    while not stop.is_set():
                        i += 1
                        what = "call"
                        t0 = time.perf_counter()
                        try:
                            with anyio.fail_after(60):
                                if i % 10 == 0:
                                    what = "stream"
                                    got = [x async for x in general.stream("count", {"n": 5})]
                                    assert got == [0, 1, 2, 3, 4], got
                                elif i % 25 == 0:
                                    what = "session"
                                    async with general.session() as s:
                                        await s.variables.define("v", "int", i)
                                        await s.variables.set("v", i + 1)
                                        got = await s.call("probe", {"var": "v", "key": "k"})
                                        assert got["var"] == i + 1, got
                                else:
                                    value = {"i": i, "b": rng.randbytes(rng.randint(0, 512))}
                                    got = await general.call("echo", {"value": value})
                                    assert got == value, (got, value)
                            report.count(f"good_{what}s")
                            latencies.append(time.perf_counter() - t0)
                        except Exception as exc:
                            report.error(f"good client: {type(exc).__name__} in {what}", exc)
                            report.violate(
                                f"the good client's {what} {i} failed: {type(exc).__name__}: {exc}"
                            )

            tg.start_soon(sample_rss)
            tg.start_soon(good_client)
            hostile = Hostile(path, report, rng, hold)
            for r in range(rounds):
                async with anyio.create_task_group() as attackers:
                    attacks = hostile.attacks()
                    if patient and r == 0:
                        attacks.append(hostile.never_reads_until_dropped)
                    for attack in attacks:
                        attackers.start_soon(_guarded, attack, report)
                report.count("rounds")
                # Every hostile connection has ended on the server side too.
                await _poll(lambda: server.clients <= 1, DROP_WITHIN)
                if server.clients > 1:
                    report.violate(
                        f"round {r}: {server.clients - 1} hostile connections still open on the server"
                    )
                stats = pool.statistics()
                if stats.ready_workers != stats.size:
                    report.violate(f"round {r}: {stats.ready_workers}/{stats.size} workers ready")
            stop.set()
            # Let the good client finish its last request and leave.
            await _poll(lambda: server.clients == 0, DROP_WITHIN)
            stats = pool.statistics()
            now = {w.pid for w in stats.workers}
            seen.update(p for p in now if p)
            restarts = sum(w.restarts for w in stats.workers)
            report.counts["worker_restarts"] = restarts
            if restarts or now != pids:
                report.violate(f"workers were restarted: {restarts} restarts, pids {pids} -> {now}")
            if stats.queued or any(w.inflight for w in stats.workers):
                report.violate(
                    f"calls of gone clients left in the pool: queued={stats.queued} "
                    f"inflight={[w.inflight for w in stats.workers]}"
                )
            report.info["sessions left live"] = stats.sessions
            report.info["pool counted"] = f"completed={stats.completed} failed={dict(stats.failed)}"
            report.info["rss"] = f"{rss_base:.0f} MiB at start, peak {rss_peak:.0f} MiB"
            if rss_peak - rss_base > rss_limit_mb:
                report.violate(
                    f"RSS grew by {rss_peak - rss_base:.0f} MiB (limit {rss_limit_mb:g} MiB)"
                )
            if latencies:
                latencies.sort()
                report.info["good client latency"] = (
                    f"p50 {latencies[len(latencies) // 2] * 1e3:.1f} ms, "
                    f"p99 {latencies[int(len(latencies) * 0.99)] * 1e3:.1f} ms, "
                    f"max {latencies[-1] * 1e3:.1f} ms over {len(latencies)} requests"
                )
            if not report.counts.get("good_calls"):
                report.violate("the good client made no progress")
            tg.cancel_scope.cancel()
        gc.collect()
        check_fds(report, fds_before, num_fds())
    finally:
        await check_no_orphans(report, seen)
        shutil.rmtree(directory, ignore_errors=True)
    report.elapsed = time.monotonic() - started
    return report


async def _poll(condition: Callable[[], bool], timeout: float) -> bool:
    """Wait until ``condition()`` holds (True) or ``timeout`` passes (False)."""
    with anyio.move_on_after(timeout):
        while True:
            if condition():
                return True
            await anyio.sleep(0.02)
    return False


async def _guarded(attack: Callable[[], Awaitable[None]], report: SoakReport) -> None:
    name = getattr(attack, "__name__", repr(attack))
    try:
        with anyio.fail_after(SEND_TIMEOUT + 60):
            await attack()
        report.count(f"attack_{name}")
    except Exception as exc:
        report.violate(f"attack {name} went wrong on the client side: {type(exc).__name__}: {exc}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--worker-concurrency", type=int, default=4)
    parser.add_argument(
        "--no-patient",
        action="store_true",
        help="skip the client that waits for the server's 30 s send timeout",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hold", type=float, default=1.0)
    parser.add_argument("--rss-limit-mb", type=float, default=256.0)
    parser.add_argument("-v", "--verbose", action="store_true", help="show the server's warnings")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.verbose else logging.CRITICAL,
        format="%(relativeCreated)8.0fms %(name)s %(levelname)s %(message)s",
    )
    report = anyio.run(
        lambda: hostile_soak(
            args.rounds,
            workers=args.workers,
            worker_concurrency=args.worker_concurrency,
            seed=args.seed,
            hold=args.hold,
            rss_limit_mb=args.rss_limit_mb,
            patient=not args.no_patient,
        )
    )
    print(report.summary())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
