"""The measurements: throughput, latency, bandwidth, alternating rounds, start-up
and the host's RSS. Each returns plain data; nothing here judges a number."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import psutil

from ..pool import Pool
from ._common import (
    INTERLEAVED,
    LABELS,
    MiB,
    Peer,
    Progress,
    bandwidth_field,
    percentile,
    size_label,
)
from ._peers import SnakepoolPeer, make_peer
from ._raw import RawLoopPeer

#: A bare interpreter: print one byte, then wait for stdin to close.
BARE_INTERPRETER = "import sys; sys.stdout.write('.'); sys.stdout.flush(); sys.stdin.read()"


async def run_calls(
    peer: Peer,
    callers: int,
    total: int,
    value: Any = 1,
    every: Callable[[int], None] | None = None,
) -> float:
    """Make ``total`` calls from ``callers`` concurrent tasks; seconds taken."""
    remaining = total
    done = 0

    async def caller() -> None:
        nonlocal remaining, done
        call = peer.call
        while remaining > 0:
            remaining -= 1
            result = await call(value)
            if result != value:
                raise AssertionError(f"echo returned {result!r}, expected {value!r}")
            done += 1
            if every is not None:
                every(done)

    started = time.perf_counter()
    async with asyncio.TaskGroup() as tg:
        for _ in range(min(callers, total)):
            tg.create_task(caller())
    return time.perf_counter() - started


async def _latency(peer: Peer, calls: int) -> dict[str, float]:
    samples: list[float] = []
    call = peer.call
    for i in range(calls):
        started = time.perf_counter()
        await call(i)
        samples.append(time.perf_counter() - started)
    samples.sort()
    return {
        "p50": percentile(samples, 0.50) * 1e6,
        "p99": percentile(samples, 0.99) * 1e6,
        "mean": sum(samples) / len(samples) * 1e6,
    }


#: Alternating throughput rounds per peer (each as long as a point of the table).
_THROUGHPUT_ROUNDS = 5
#: Alternating bandwidth rounds per peer and size (together as many bytes as
#: the peer's own bandwidth measurement).
_BANDWIDTH_ROUNDS = 3


async def interleaved_rounds(
    workers: int,
    calls: int,
    rounds: int,
    phase_timeout: float,
    progress: Progress,
    *,
    callers: int = 0,
    throughput_calls: int = 0,
    bandwidth_sizes: Sequence[int] = (),
    bandwidth_bytes: int = 0,
) -> dict[str, Any]:
    """Sequential p50/p99 of the raw loop and snakepool, measured in alternating
    rounds, and (``callers``) their throughput at that many callers, and their
    bandwidth at ``bandwidth_sizes`` (``bandwidth_bytes`` per size), likewise.

    This machine's speed drifts by tens of percent over minutes (a shared
    VM), and peers measured one after another minutes apart inherit that
    drift. Here every peer runs ``rounds`` short rounds, in turn, so each
    sees the same machine; the targets against the raw loop use these numbers
    (the throughput of a peer is the median of its rounds).
    """
    peers: dict[str, Peer] = {}
    samples: dict[str, list[float]] = {name: [] for name in INTERLEAVED}
    rates: dict[str, list[float]] = {name: [] for name in INTERLEAVED}
    moved: dict[str, dict[int, list[float]]] = {name: {} for name in INTERLEAVED}
    try:
        async with asyncio.timeout(phase_timeout):
            for name in INTERLEAVED:
                peer = make_peer(name, workers)
                assert not isinstance(peer, str)
                await peer.start()
                peers[name] = peer
                for i in range(200):  # warm-up
                    await peer.call(i)
            per_round = max(1, calls // rounds)
            for _ in range(rounds):
                for name, peer in peers.items():
                    call = peer.call
                    for i in range(per_round):
                        started = time.perf_counter()
                        await call(i)
                        samples[name].append(time.perf_counter() - started)
            for _ in range(_THROUGHPUT_ROUNDS if callers else 0):  # (after: a burst may linger)
                for name, peer in peers.items():
                    taken = await run_calls(peer, callers, throughput_calls)
                    rates[name].append(throughput_calls / taken)
            for _ in range(_BANDWIDTH_ROUNDS if bandwidth_bytes else 0):
                for size in bandwidth_sizes:
                    share = max(size, bandwidth_bytes // _BANDWIDTH_ROUNDS)
                    for name, peer in peers.items():
                        rate = await _bandwidth(peer, size, share)
                        moved[name].setdefault(size, []).append(rate)
    finally:
        for peer in peers.values():
            with contextlib.suppress(Exception):
                await peer.aclose()
    result: dict[str, Any] = {"rounds": rounds, "calls": calls}
    if callers:
        result["callers"], result["throughput_calls"] = callers, throughput_calls
        result["throughput_rounds"] = _THROUGHPUT_ROUNDS
    if bandwidth_bytes and bandwidth_sizes:
        result["bandwidth_rounds"] = _BANDWIDTH_ROUNDS
        result["bandwidth_sizes"] = [size_label(size) for size in bandwidth_sizes]
    for name, values in samples.items():
        values.sort()
        result[name] = {
            "p50": percentile(values, 0.50) * 1e6,
            "p99": percentile(values, 0.99) * 1e6,
        }
        if rates[name]:
            result[name]["throughput"] = percentile(sorted(rates[name]), 0.50)
        for size, mb_s in moved[name].items():
            result[name][bandwidth_field(size_label(size))] = percentile(sorted(mb_s), 0.50)
        progress(f"interleaved rounds, {LABELS[name]}: p50 {result[name]['p50']:.0f} us")
    return result


async def _bandwidth(peer: Peer, size: int, total_bytes: int) -> float:
    """Sequential round trips of a ``size``-byte payload; payload MB (1e6) per second."""
    payload = os.urandom(size)
    rounds = max(3, total_bytes // size)
    echoed = await peer.call(payload)  # warm-up (and a correctness check)
    if bytes(echoed) != payload:
        raise AssertionError(f"{size}-byte payload came back changed")
    started = time.perf_counter()
    for _ in range(rounds):
        echoed = await peer.call(payload)
        if len(echoed) != size:
            raise AssertionError(f"{size}-byte payload came back with {len(echoed)} bytes")
    return size * rounds / (time.perf_counter() - started) / 1e6


async def measure_peer(
    name: str,
    workers: int,
    calls: int,
    latency_calls: int,
    concurrency: Sequence[int],
    bandwidth_sizes: Sequence[int],
    bandwidth_bytes: int,
    phase_timeout: float,
    progress: Progress,
) -> dict[str, Any]:
    row: dict[str, Any] = {
        "label": LABELS[name],
        "how": "",
        "skipped": None,
        "errors": {},
        "throughput": {str(c): None for c in concurrency},
        "latency_us": {"p50": None, "p99": None, "mean": None},
        "bandwidth_mb_s": {size_label(s): None for s in bandwidth_sizes},
    }
    peer = make_peer(name, workers)
    if isinstance(peer, str):
        row["skipped"] = peer
        progress(f"{LABELS[name]}: skipped ({peer})")
        return row
    row["how"] = peer.how
    errors: dict[str, str] = row["errors"]

    async def phase(key: str, work: Any) -> Any:
        try:
            async with asyncio.timeout(phase_timeout):
                return await work
        except Exception as exc:
            errors[key] = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            progress(f"{LABELS[name]}: {key} failed: {errors[key]}")
            return None

    try:
        await phase("start", peer.start())
        if "start" in errors:
            return row
        progress(f"{LABELS[name]}: warming up")
        await phase("warm-up", run_calls(peer, 8, max(200, workers * 100)))
        for callers in concurrency:
            elapsed = await phase(f"throughput@{callers}", run_calls(peer, callers, calls))
            if elapsed:
                row["throughput"][str(callers)] = calls / elapsed
                progress(f"{LABELS[name]}: {callers} callers: {calls / elapsed:,.0f} calls/s")
        latency = await phase("latency", _latency(peer, latency_calls))
        if latency is not None:
            row["latency_us"] = latency
            progress(f"{LABELS[name]}: sequential p50 {latency['p50']:.0f} us")
        for size in bandwidth_sizes:
            rate = await phase(
                f"bandwidth {size_label(size)}", _bandwidth(peer, size, bandwidth_bytes)
            )
            row["bandwidth_mb_s"][size_label(size)] = rate
            if rate is not None:
                progress(f"{LABELS[name]}: {size_label(size)} round trips: {rate:,.0f} MB/s")
    finally:
        try:
            async with asyncio.timeout(60.0):
                await peer.aclose()
        except Exception as exc:
            errors["close"] = f"{type(exc).__name__}: {exc}"
    return row


def compile_bytecode() -> str:
    """Write snakepool's .pyc files, as an installed package has them.

    Without them (an editable install with PYTHONDONTWRITEBYTECODE set, say)
    every worker compiles snakepool from source at start, which no bare
    interpreter has to do: start-up would measure the compiler.
    """
    import compileall

    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # (snakepool/)
    try:
        ok = compileall.compile_dir(package, quiet=1)
    except OSError as exc:
        return f"could not write .pyc files ({exc}): workers compile snakepool at start"
    return "snakepool .pyc files present" if ok else "some .pyc files failed to compile"


async def _start_bare(n: int) -> float:
    """Seconds until ``n`` bare interpreters, spawned at once, have each printed a byte."""
    processes: list[asyncio.subprocess.Process] = []
    started = time.perf_counter()
    try:
        for _ in range(n):
            processes.append(
                await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-c",
                    BARE_INTERPRETER,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                )
            )
        await asyncio.gather(*(p.stdout.readexactly(1) for p in processes if p.stdout))
        return time.perf_counter() - started
    finally:
        await _reap(processes)


async def _reap(processes: Sequence[asyncio.subprocess.Process]) -> None:
    for process in processes:
        if process.stdin is not None:
            process.stdin.close()
    for process in processes:
        try:
            await asyncio.wait_for(process.wait(), 10.0)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()


async def _start_snakepool(n: int) -> float:
    """Seconds until ``async with Pool('generic', size=n)`` is entered (every worker ready)."""
    pool = Pool("generic", name="bench-startup", size=n, startup_timeout=300.0)
    started = time.perf_counter()
    async with pool:
        return time.perf_counter() - started


async def _start_raw(n: int) -> float:
    """Seconds until ``n`` raw-loop workers have each answered one frame."""
    peer = RawLoopPeer(n)
    started = time.perf_counter()
    try:
        await peer.start()
        return time.perf_counter() - started
    finally:
        await peer.aclose()


async def measure_startup(
    sizes: Sequence[int], repeats: int, phase_timeout: float, progress: Progress
) -> dict[str, Any]:
    kinds: dict[str, Callable[[int], Any]] = {
        "bare": _start_bare,
        "snakepool": _start_snakepool,
        "raw_loop": _start_raw,
    }
    result: dict[str, Any] = {kind: {} for kind in kinds}
    errors: dict[str, str] = {}
    for n in sizes:
        for kind, start in kinds.items():
            times: list[float] = []
            for _ in range(repeats):
                try:
                    async with asyncio.timeout(phase_timeout):
                        times.append(await start(n))
                except Exception as exc:
                    errors[f"{kind}@{n}"] = f"{type(exc).__name__}: {exc}"
                    break
                await asyncio.sleep(0.2)  # let the previous processes go
            result[kind][str(n)] = sorted(times)[len(times) // 2] if times else None
            if times:
                progress(f"start-up, {n} workers, {kind}: {result[kind][str(n)] * 1000:.0f} ms")
    result["errors"] = errors
    result["repeats"] = repeats
    return result


def _rss_mib() -> float:
    return float(psutil.Process().memory_info().rss) / MiB


async def rss_growth(
    workers: int, rss_calls: int, callers: int, phase_timeout: float, progress: Progress
) -> dict[str, Any]:
    """Host RSS before and after ``rss_calls`` no-op calls (after a warm-up), snakepool only."""
    peer = SnakepoolPeer(workers)
    samples: list[float] = []
    result: dict[str, Any] = {
        "calls": rss_calls,
        "callers": callers,
        "warmup_calls": 0,
        "before_mib": None,
        "after_mib": None,
        "growth_mib": None,
        "samples_mib": samples,
        "seconds": None,
        "error": None,
    }
    step = max(1, rss_calls // 10)

    def sample(done: int) -> None:
        if done % step == 0:
            samples.append(round(_rss_mib(), 2))

    try:
        async with asyncio.timeout(phase_timeout):
            await peer.start()
            warmup = min(50_000, max(1_000, rss_calls // 10))
            await run_calls(peer, callers, warmup)
            gc.collect()
            result["warmup_calls"] = warmup
            result["before_mib"] = before = _rss_mib()
            progress(f"RSS: {before:.1f} MiB after {warmup:,} warm-up calls; {rss_calls:,} more")
            elapsed = await run_calls(peer, callers, rss_calls, every=sample)
            gc.collect()
            result["after_mib"] = after = _rss_mib()
            result["growth_mib"] = after - before
            result["seconds"] = elapsed
            progress(f"RSS: {after:.1f} MiB after {rss_calls:,} calls ({after - before:+.1f} MiB)")
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(60.0):
                await peer.aclose()
    return result
