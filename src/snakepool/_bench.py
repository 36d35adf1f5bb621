"""The side-by-side benchmark behind ``snakepool bench`` and ``stress/bench.py``.

One process run measures, one peer after another and with the same worker
count and the same no-op (an echo of a small int):

* ``snakepool`` -- the ``generic`` adapter's ``echo`` (``worker_concurrency=1``,
  and a second row with ``worker_concurrency=8``);
* ``concurrent.futures.ProcessPoolExecutor``, ``multiprocessing.Pool`` and
  ``loky`` (optional: its row is skipped when it is not installed);
* a raw asyncio loop: length-prefixed MessagePack frames written straight to
  bare worker scripts over their stdin/stdout pipes, with every caller's
  request in flight at once (pipelined) -- the practical limit of the design.

Every peer is driven the same way: one asyncio event loop in the host runs N
caller tasks, each awaiting one call at a time. Executors are awaited through
``asyncio.wrap_future(executor.submit(echo, x))`` (what ``run_in_executor``
does); ``multiprocessing.Pool`` through ``apply_async`` with a callback that
resolves an asyncio future thread-safely.

Metrics: no-op throughput at 1/8/64 concurrent callers, sequential round-trip
p50/p99, pool start-up (snakepool, the raw workers, and bare interpreter
spawns), 1 MiB and 16 MiB ``bytes`` round-trip bandwidth, and the host's RSS
growth over many calls (snakepool only). Nothing here asserts a number: the
targets are reported as PASS/FAIL with their ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import gc
import importlib
import importlib.metadata
import importlib.util
import json
import math
import multiprocessing
import multiprocessing.pool
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import msgpack
import psutil

from ._bench_options import add_arguments
from .pool import Pool

__all__ = [
    "add_arguments",
    "plot_throughput",
    "render_markdown",
    "render_text",
    "run_benchmark",
    "run_from_args",
]

MiB = 2**20
CONCURRENCY = (1, 8, 64)
STARTUP_SIZES = (4, 16, 64)
BANDWIDTH_SIZES = (1 * MiB, 16 * MiB)
#: Peers in the order they run (the fork-based stdlib pools first, before the
#: host has started helper threads).
PEERS = (
    "multiprocessing_pool",
    "process_pool_executor",
    "loky",
    "raw_loop",
    "snakepool",
    "snakepool_c8",
)
LABELS = {
    "snakepool": "snakepool (worker_concurrency=1)",
    "snakepool_c8": "snakepool (worker_concurrency=8)",
    "process_pool_executor": "ProcessPoolExecutor",
    "multiprocessing_pool": "multiprocessing.Pool",
    "loky": "loky",
    "raw_loop": "raw asyncio loop (pipelined)",
}
#: RSS growth below this many MiB over the whole run counts as noise.
RSS_NOISE_MIB = 8.0

Progress = Callable[[str], None]

#: The bare worker of the raw loop: read a frame, answer it, flush, repeat.
RAW_WORKER = """\
import sys
import msgpack
read = sys.stdin.buffer.read
out = sys.stdout.buffer
pack = msgpack.Packer(use_bin_type=True).pack
unpackb = msgpack.unpackb
while True:
    header = read(4)
    if len(header) < 4:
        break
    request = unpackb(read(int.from_bytes(header, "big")))
    reply = pack({"id": request["id"], "result": request["value"]})
    out.write(len(reply).to_bytes(4, "big"))
    out.write(reply)
    out.flush()
"""

#: A bare interpreter: print one byte, then wait for stdin to close.
BARE_INTERPRETER = "import sys; sys.stdout.write('.'); sys.stdout.flush(); sys.stdin.read()"


def _echo(value: Any) -> Any:
    """The no-op every peer runs (module level, so every start method can pickle it)."""
    return value


def _size_key(size: int) -> str:
    return f"{size // MiB} MiB" if size >= MiB else f"{size // 1024} KiB"


def _percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted sequence."""
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


# --- the peers ------------------------------------------------------------------------------


class _Peer:
    """One contender: ``start`` it, ``call`` it many times, ``aclose`` it."""

    how = ""

    async def start(self) -> None:
        raise NotImplementedError

    async def call(self, value: Any) -> Any:
        raise NotImplementedError

    async def aclose(self) -> None:
        raise NotImplementedError


class _SnakepoolPeer(_Peer):
    def __init__(self, workers: int, worker_concurrency: int = 1) -> None:
        self.pool = Pool(
            "generic",
            name="bench",
            size=workers,
            worker_concurrency=worker_concurrency,
            startup_timeout=300.0,
            call_timeout=300.0,
            queue_size=100_000,
        )
        self.how = (
            f"Pool('generic', size={workers}, worker_concurrency={worker_concurrency}); "
            "await pool.call('echo', {'value': x})"
        )

    async def start(self) -> None:
        await self.pool.start()

    async def call(self, value: Any) -> Any:
        return await self.pool.call("echo", {"value": value})

    async def aclose(self) -> None:
        await self.pool.aclose()


class _ExecutorPeer(_Peer):
    """ProcessPoolExecutor or loky: ``asyncio.wrap_future(executor.submit(...))``."""

    def __init__(self, make: Callable[[], concurrent.futures.Executor], how: str) -> None:
        self._make = make
        self.executor: concurrent.futures.Executor | None = None
        self.how = how

    async def start(self) -> None:
        self.executor = self._make()

    async def call(self, value: Any) -> Any:
        assert self.executor is not None
        return await asyncio.wrap_future(self.executor.submit(_echo, value))

    async def aclose(self) -> None:
        executor, self.executor = self.executor, None
        if executor is None:
            return
        shutdown: Any = executor.shutdown
        if type(executor).__module__.startswith("loky"):
            await asyncio.to_thread(shutdown, wait=True, kill_workers=True)
            return
        await asyncio.to_thread(shutdown, wait=True, cancel_futures=True)


class _MultiprocessingPeer(_Peer):
    """``multiprocessing.Pool.apply_async`` resolving an asyncio future from its callback."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.pool: multiprocessing.pool.Pool | None = None
        self.how = (
            f"multiprocessing.Pool({workers}).apply_async(echo, (x,), callback=...) -> "
            "loop.call_soon_threadsafe(future.set_result, ...)"
        )

    async def start(self) -> None:
        self.pool = multiprocessing.Pool(self.workers)

    async def call(self, value: Any) -> Any:
        assert self.pool is not None
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()

        def resolve(result: Any) -> None:
            if not future.done():
                future.set_result(result)

        def fail(exc: BaseException) -> None:
            if not future.done():
                future.set_exception(exc)

        self.pool.apply_async(
            _echo,
            (value,),
            callback=lambda r: loop.call_soon_threadsafe(resolve, r),
            error_callback=lambda e: loop.call_soon_threadsafe(fail, e),
        )
        return await future

    async def aclose(self) -> None:
        pool, self.pool = self.pool, None
        if pool is None:
            return

        def stop() -> None:
            pool.close()
            pool.join()

        try:
            await asyncio.wait_for(asyncio.to_thread(stop), 30.0)
        except (TimeoutError, Exception):
            pool.terminate()
            pool.join()


class _RawWorker(asyncio.SubprocessProtocol):
    """One bare worker's pipes: frames out on stdin, replies parsed from stdout."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.pending: dict[int, asyncio.Future[Any]] = {}
        self.transport: asyncio.SubprocessTransport | None = None
        self.stdin: asyncio.WriteTransport | None = None
        self.exited: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (duck-typed: uvloop's transports do not subclass asyncio's)
        self.transport = cast(asyncio.SubprocessTransport, transport)
        self.stdin = cast(asyncio.WriteTransport, self.transport.get_pipe_transport(0))

    def send(self, request_id: int, value: Any) -> asyncio.Future[Any]:
        assert self.stdin is not None
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if self.exited.done():
            future.set_exception(ConnectionError("the raw worker exited"))
            return future
        self.pending[request_id] = future
        body: bytes = msgpack.packb({"id": request_id, "value": value}, use_bin_type=True)
        self.stdin.write(len(body).to_bytes(4, "big") + body)
        return future

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        if fd != 1:
            return
        buffer = self.buffer
        buffer += data
        start = 0
        available = len(buffer)
        while available - start >= 4:
            length = int.from_bytes(buffer[start : start + 4], "big")
            end = start + 4 + length
            if end > available:
                break
            reply = msgpack.unpackb(bytes(buffer[start + 4 : end]))
            start = end
            future = self.pending.pop(reply["id"], None)
            if future is not None and not future.done():
                future.set_result(reply["result"])
        if start:
            del buffer[:start]

    def process_exited(self) -> None:
        for future in self.pending.values():
            if not future.done():
                future.set_exception(ConnectionError("the raw worker exited"))
        self.pending.clear()
        if not self.exited.done():
            self.exited.set_result(None)

    async def aclose(self) -> None:
        if self.stdin is not None and not self.stdin.is_closing():
            self.stdin.close()
        try:
            await asyncio.wait_for(asyncio.shield(self.exited), 5.0)
        except TimeoutError:
            if self.transport is not None:
                with contextlib.suppress(ProcessLookupError):
                    self.transport.kill()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(self.exited), 5.0)
        if self.transport is not None:
            self.transport.close()


async def _spawn_raw_worker() -> _RawWorker:
    loop = asyncio.get_running_loop()
    _, protocol = await loop.subprocess_exec(
        _RawWorker,
        sys.executable,
        "-c",
        RAW_WORKER,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=None,
    )
    return protocol


class _RawLoopPeer(_Peer):
    """The practical limit: each call is one frame written to the least-loaded worker."""

    def __init__(self, workers: int) -> None:
        self.size = workers
        self.workers: list[_RawWorker] = []
        self._next_id = 0
        self.how = (
            f"{workers} bare `python -c` workers reading 4-byte length + msgpack frames from "
            "stdin and echoing them; the host writes each call to the least-loaded worker's "
            "pipe at once, so every caller's request is in flight (pipelined)"
        )

    async def start(self) -> None:
        spawned = await asyncio.gather(
            *(_spawn_raw_worker() for _ in range(self.size)), return_exceptions=True
        )
        self.workers = [w for w in spawned if isinstance(w, _RawWorker)]
        for failure in spawned:
            if isinstance(failure, BaseException):
                raise failure
        # Ready = each worker answered one frame.
        await asyncio.gather(*(self._call_on(w, None) for w in self.workers))

    def _call_on(self, worker: _RawWorker, value: Any) -> asyncio.Future[Any]:
        self._next_id += 1
        return worker.send(self._next_id, value)

    async def call(self, value: Any) -> Any:
        workers = self.workers
        worker = workers[0]
        for candidate in workers:
            if len(candidate.pending) < len(worker.pending):
                worker = candidate
        return await self._call_on(worker, value)

    async def aclose(self) -> None:
        workers, self.workers = self.workers, []
        await asyncio.gather(*(w.aclose() for w in workers), return_exceptions=True)


def _make_peer(name: str, workers: int) -> _Peer | str:
    """The peer called ``name``, or why it cannot run."""
    if name == "snakepool":
        return _SnakepoolPeer(workers, worker_concurrency=1)
    if name == "snakepool_c8":
        return _SnakepoolPeer(workers, worker_concurrency=8)
    if name == "process_pool_executor":
        return _ExecutorPeer(
            lambda: concurrent.futures.ProcessPoolExecutor(max_workers=workers),
            f"ProcessPoolExecutor(max_workers={workers}); "
            "await asyncio.wrap_future(executor.submit(echo, x)) (= run_in_executor)",
        )
    if name == "multiprocessing_pool":
        return _MultiprocessingPeer(workers)
    if name == "loky":
        if importlib.util.find_spec("loky") is None:
            return "loky is not installed (pip install loky)"
        loky: Any = importlib.import_module("loky")

        def make() -> concurrent.futures.Executor:
            executor: concurrent.futures.Executor = loky.get_reusable_executor(
                max_workers=workers, timeout=600
            )
            return executor

        return _ExecutorPeer(
            make,
            f"loky.get_reusable_executor(max_workers={workers}); "
            "await asyncio.wrap_future(executor.submit(echo, x))",
        )
    if name == "raw_loop":
        return _RawLoopPeer(workers)
    raise ValueError(f"unknown peer {name!r}")


# --- measurements ---------------------------------------------------------------------------


async def _run_calls(
    peer: _Peer,
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


async def _latency(peer: _Peer, calls: int) -> dict[str, float]:
    samples: list[float] = []
    call = peer.call
    for i in range(calls):
        started = time.perf_counter()
        await call(i)
        samples.append(time.perf_counter() - started)
    samples.sort()
    return {
        "p50": _percentile(samples, 0.50) * 1e6,
        "p99": _percentile(samples, 0.99) * 1e6,
        "mean": sum(samples) / len(samples) * 1e6,
    }


#: Alternating throughput rounds per peer (each as long as a point of the table).
_THROUGHPUT_ROUNDS = 5
#: Alternating bandwidth rounds per peer and size (together as many bytes as
#: the peer's own bandwidth measurement).
_BANDWIDTH_ROUNDS = 3
#: Peers whose sequential latency is also measured interleaved (for the target).
INTERLEAVED = ("raw_loop", "snakepool", "snakepool_c8")


async def _interleaved_latency(
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
    peers: dict[str, _Peer] = {}
    samples: dict[str, list[float]] = {name: [] for name in INTERLEAVED}
    rates: dict[str, list[float]] = {name: [] for name in INTERLEAVED}
    moved: dict[str, dict[int, list[float]]] = {name: {} for name in INTERLEAVED}
    try:
        async with asyncio.timeout(phase_timeout):
            for name in INTERLEAVED:
                peer = _make_peer(name, workers)
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
                    taken = await _run_calls(peer, callers, throughput_calls)
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
        result["bandwidth_sizes"] = [_size_key(size) for size in bandwidth_sizes]
    for name, values in samples.items():
        values.sort()
        result[name] = {
            "p50": _percentile(values, 0.50) * 1e6,
            "p99": _percentile(values, 0.99) * 1e6,
        }
        if rates[name]:
            result[name]["throughput"] = _percentile(sorted(rates[name]), 0.50)
        for size, mb_s in moved[name].items():
            result[name][_bandwidth_field(_size_key(size))] = _percentile(sorted(mb_s), 0.50)
        progress(f"interleaved rounds, {LABELS[name]}: p50 {result[name]['p50']:.0f} us")
    return result


def _bandwidth_field(size_key: str) -> str:
    """The key of a bandwidth (MB/s) in the alternating rounds' results."""
    return f"{size_key} MB/s"


async def _bandwidth(peer: _Peer, size: int, total_bytes: int) -> float:
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


async def _measure_peer(
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
        "bandwidth_mb_s": {_size_key(s): None for s in bandwidth_sizes},
    }
    peer = _make_peer(name, workers)
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
        await phase("warm-up", _run_calls(peer, 8, max(200, workers * 100)))
        for callers in concurrency:
            elapsed = await phase(f"throughput@{callers}", _run_calls(peer, callers, calls))
            if elapsed:
                row["throughput"][str(callers)] = calls / elapsed
                progress(f"{LABELS[name]}: {callers} callers: {calls / elapsed:,.0f} calls/s")
        latency = await phase("latency", _latency(peer, latency_calls))
        if latency is not None:
            row["latency_us"] = latency
            progress(f"{LABELS[name]}: sequential p50 {latency['p50']:.0f} us")
        for size in bandwidth_sizes:
            rate = await phase(
                f"bandwidth {_size_key(size)}", _bandwidth(peer, size, bandwidth_bytes)
            )
            row["bandwidth_mb_s"][_size_key(size)] = rate
            if rate is not None:
                progress(f"{LABELS[name]}: {_size_key(size)} round trips: {rate:,.0f} MB/s")
    finally:
        try:
            async with asyncio.timeout(60.0):
                await peer.aclose()
        except Exception as exc:
            errors["close"] = f"{type(exc).__name__}: {exc}"
    return row


def _compile_bytecode() -> str:
    """Write snakepool's .pyc files, as an installed package has them.

    Without them (an editable install with PYTHONDONTWRITEBYTECODE set, say)
    every worker compiles snakepool from source at start, which no bare
    interpreter has to do: start-up would measure the compiler.
    """
    import compileall

    package = os.path.dirname(os.path.abspath(__file__))
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
    peer = _RawLoopPeer(n)
    started = time.perf_counter()
    try:
        await peer.start()
        return time.perf_counter() - started
    finally:
        await peer.aclose()


async def _startup(
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


async def _rss_growth(
    workers: int, rss_calls: int, callers: int, phase_timeout: float, progress: Progress
) -> dict[str, Any]:
    """Host RSS before and after ``rss_calls`` no-op calls (after a warm-up), snakepool only."""
    peer = _SnakepoolPeer(workers)
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
            await _run_calls(peer, callers, warmup)
            gc.collect()
            result["warmup_calls"] = warmup
            result["before_mib"] = before = _rss_mib()
            progress(f"RSS: {before:.1f} MiB after {warmup:,} warm-up calls; {rss_calls:,} more")
            elapsed = await _run_calls(peer, callers, rss_calls, every=sample)
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


# --- targets, machine, whole run --------------------------------------------------------------


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def _targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    peers = result["peers"]
    startup = result["startup"]
    checks: list[dict[str, Any]] = []

    def add(name: str, value: float | None, op: str, threshold: float, detail: str) -> None:
        passed = (
            None if value is None else (value >= threshold if op == ">=" else value <= threshold)
        )
        checks.append(
            {"target": name, "ratio": value, "op": op, "threshold": threshold, "passed": passed, "detail": detail}
        )  # fmt: skip

    top = str(max(result["config"]["concurrency"]))
    interleaved = result.get("interleaved_latency_us") or {}

    def against_raw(
        key: str, what: str, field: str | None, block: float | None, op: str, limit: float,
        detail: str,
    ) -> None:  # fmt: skip
        """A target against the raw loop: from the alternating rounds where they
        measured ``field``, else from the peers' own blocks."""
        who = LABELS[key]
        if field is not None and field in interleaved.get(key, {}) and "raw_loop" in interleaved:
            ratio = _ratio(interleaved[key][field], interleaved["raw_loop"][field])
            add(f"{who}: {what} raw asyncio loop (interleaved rounds)", ratio, op, limit,
                f"{detail}, medians of alternating rounds")  # fmt: skip
        else:
            add(f"{who}: {what} {LABELS['raw_loop']}", block, op, limit, detail)

    for key in ("snakepool", "snakepool_c8"):
        sp = peers[key]
        who = LABELS[key]
        for other, threshold in (
            ("process_pool_executor", 4.0),
            ("multiprocessing_pool", 2.0),
        ):
            add(
                f"{who}: no-op throughput at {top} callers vs {LABELS[other]}",
                _ratio(sp["throughput"].get(top), peers[other]["throughput"].get(top)),
                ">=",
                threshold,
                "snakepool calls/s / peer calls/s",
            )
        raw = peers["raw_loop"]
        against_raw(
            key,
            f"no-op throughput at {top} callers vs",
            "throughput" if str(interleaved.get("callers")) == top else None,
            _ratio(sp["throughput"].get(top), raw["throughput"].get(top)),
            ">=",
            0.6,
            "snakepool calls/s / raw calls/s",
        )
        against_raw(
            key,
            "sequential p50 vs",
            "p50",
            _ratio(sp["latency_us"]["p50"], raw["latency_us"]["p50"]),
            "<=",
            1.5,
            "snakepool p50 / raw p50",
        )
        for size_key in sp["bandwidth_mb_s"]:
            against_raw(
                key,
                f"{size_key} bandwidth vs",
                _bandwidth_field(size_key),
                _ratio(sp["bandwidth_mb_s"][size_key], raw["bandwidth_mb_s"][size_key]),
                ">=",
                0.5,
                "snakepool MB/s / raw MB/s",
            )
    sizes = [str(n) for n in result["config"]["startup_sizes"]]
    n = "16" if "16" in sizes else (sizes[-1] if sizes else None)
    if n is not None:
        add(
            f"snakepool: {n} workers ready vs {n} bare interpreter spawns",
            _ratio(startup["snakepool"].get(n), startup["bare"].get(n)),
            "<=",
            2.0,
            "snakepool start-up / bare spawns",
        )
    rss = result["rss"]
    add(
        f"snakepool: host RSS growth over {rss['calls']:,} calls (MiB, noise = {RSS_NOISE_MIB:g} MiB)",
        rss["growth_mib"],
        "<=",
        RSS_NOISE_MIB,
        "MiB after - MiB before (not a ratio)",
    )
    return checks


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _event_loop_name() -> str:
    policy = type(asyncio.get_event_loop_policy()).__module__
    if policy.startswith("uvloop"):
        return f"uvloop {version_of('uvloop')}"
    return "asyncio"


def version_of(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count() or 0

    return {
        "cpu": model,
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable,
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "start_method": multiprocessing.get_start_method(),
        "event_loop": _event_loop_name(),
        "load_average_start": _load_average(),
        "versions": {
            name: version_of(name) for name in ("snakepool", "msgpack", "anyio", "loky", "psutil")
        },
    }


def _children() -> list[str]:
    found = []
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            found.append(f"{child.pid} {' '.join(child.cmdline())[:120]}")
    return found


async def run_benchmark(
    workers: int = 2,
    calls: int | None = None,
    quick: bool = False,
    rss_calls: int | None = None,
    *,
    latency_calls: int | None = None,
    concurrency: Sequence[int] = CONCURRENCY,
    startup_sizes: Sequence[int] | None = None,
    startup_repeats: int | None = None,
    bandwidth_sizes: Sequence[int] = BANDWIDTH_SIZES,
    bandwidth_bytes: int | None = None,
    rss_callers: int = 64,
    peers: Sequence[str] = PEERS,
    phase_timeout: float | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Run every peer, one after another, and return the results as plain data.

    ``calls`` is the number of calls per throughput point (default 20,000;
    quick: 2,000); ``rss_calls`` the calls of the host-RSS run (default
    1,000,000; quick: 50,000). Every phase runs under ``phase_timeout``; a
    phase that fails or times out leaves ``None`` and a note in ``errors``.
    """
    calls = calls if calls is not None else (2_000 if quick else 20_000)
    rss_calls = rss_calls if rss_calls is not None else (50_000 if quick else 1_000_000)
    latency_calls = latency_calls if latency_calls is not None else min(calls, 5_000)
    startup_sizes = tuple(startup_sizes if startup_sizes is not None else STARTUP_SIZES)
    startup_repeats = startup_repeats if startup_repeats is not None else (1 if quick else 3)
    bandwidth_bytes = bandwidth_bytes if bandwidth_bytes is not None else (
        32 * MiB if quick else 256 * MiB
    )  # fmt: skip
    phase_timeout = phase_timeout if phase_timeout is not None else (120.0 if quick else 900.0)
    say: Progress = progress if progress is not None else (lambda _line: None)
    began = time.perf_counter()
    bytecode = _compile_bytecode()
    result: dict[str, Any] = {
        "config": {
            "workers": workers,
            "calls": calls,
            "latency_calls": latency_calls,
            "concurrency": list(concurrency),
            "startup_sizes": list(startup_sizes),
            "startup_repeats": startup_repeats,
            "bandwidth_sizes": [_size_key(s) for s in bandwidth_sizes],
            "bandwidth_bytes": bandwidth_bytes,
            "rss_calls": rss_calls,
            "rss_callers": rss_callers,
            "quick": quick,
        },
        "machine": {**machine_info(), "bytecode": bytecode},
        "peers": {},
    }
    for name in PEERS:
        if name not in peers:
            continue
        say(f"== {LABELS[name]}")
        result["peers"][name] = await _measure_peer(
            name,
            workers,
            calls,
            latency_calls,
            concurrency,
            bandwidth_sizes,
            bandwidth_bytes,
            phase_timeout,
            say,
        )
    if all(name in peers for name in INTERLEAVED):
        say("== sequential latency, interleaved rounds")
        try:
            result["interleaved_latency_us"] = await _interleaved_latency(
                workers,
                latency_calls,
                10,
                phase_timeout,
                say,
                callers=max(concurrency),
                throughput_calls=calls,  # (as many as a point of the table)
                bandwidth_sizes=bandwidth_sizes,
                bandwidth_bytes=bandwidth_bytes,
            )
        except Exception as exc:  # noted, like any failed phase
            result["interleaved_latency_us"] = {"error": f"{type(exc).__name__}: {exc}"}
    say("== start-up")
    result["startup"] = await _startup(startup_sizes, startup_repeats, phase_timeout, say)
    say("== host RSS")
    result["rss"] = await _rss_growth(workers, rss_calls, rss_callers, phase_timeout, say)
    if all(k in result["peers"] for k in ("snakepool", "snakepool_c8", "process_pool_executor", "multiprocessing_pool", "raw_loop")):  # fmt: skip
        result["targets"] = _targets(result)
    else:
        result["targets"] = []
    result["elapsed_s"] = time.perf_counter() - began
    result["machine"]["load_average_end"] = _load_average()
    await asyncio.sleep(0.5)  # give exiting workers a moment before looking
    result["leftover_processes"] = [c for c in _children() if "resource_tracker" not in c]
    return result


# --- rendering ------------------------------------------------------------------------------


def _fmt(value: float | None, spec: str = ",.0f") -> str:
    return "n/a" if value is None else format(value, spec)


def _rows(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    config = result["config"]
    header = [
        "peer",
        *(f"{c} caller{'s' if c > 1 else ''} (calls/s)" for c in config["concurrency"]),
        "seq p50 (us)",
        "seq p99 (us)",
        *(f"{s} (MB/s)" for s in config["bandwidth_sizes"]),
    ]
    rows = []
    for row in result["peers"].values():
        if row["skipped"]:
            rows.append([row["label"], f"skipped: {row['skipped']}"] + [""] * (len(header) - 2))
            continue
        rows.append(
            [
                row["label"],
                *(_fmt(row["throughput"][str(c)]) for c in config["concurrency"]),
                _fmt(row["latency_us"]["p50"]),
                _fmt(row["latency_us"]["p99"]),
                *(_fmt(row["bandwidth_mb_s"][s]) for s in config["bandwidth_sizes"]),
            ]
        )
    return header, rows


def _startup_rows(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    startup = result["startup"]
    header = ["workers", "bare interpreters (ms)", "snakepool Pool (ms)", "raw-loop workers (ms)", "snakepool / bare"]  # fmt: skip
    rows = []
    for n in result["config"]["startup_sizes"]:
        key = str(n)
        bare, sp, raw = startup["bare"].get(key), startup["snakepool"].get(key), startup["raw_loop"].get(key)  # fmt: skip
        ratio = _ratio(sp, bare)
        rows.append(
            [
                key,
                _fmt(None if bare is None else bare * 1000),
                _fmt(None if sp is None else sp * 1000),
                _fmt(None if raw is None else raw * 1000),
                _fmt(ratio, ".2f") + ("x" if ratio is not None else ""),
            ]
        )
    return header, rows


def _verdict(check: dict[str, Any]) -> str:
    if check["passed"] is None:
        return "N/A"
    return "PASS" if check["passed"] else "FAIL"


def _text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows, strict=True)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append(
            "  ".join(
                (cell.ljust(w) if i == 0 else cell.rjust(w))
                for i, (cell, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    return "\n".join(lines)


def _interleaved_line(result: dict[str, Any]) -> str:
    data = result.get("interleaved_latency_us")
    if not data:
        return "sequential latency, interleaved rounds: not measured"
    if "error" in data:
        return f"sequential latency, interleaved rounds: failed ({data['error']})"
    parts = [
        f"{LABELS[name]} p50 {data[name]['p50']:.0f} us / p99 {data[name]['p99']:.0f} us"
        for name in INTERLEAVED
        if name in data
    ]
    line = (
        f"sequential latency, {data['rounds']} interleaved rounds ({data['calls']:,} calls "
        f"each): " + "; ".join(parts)
    )
    if data.get("callers"):
        rates = [
            f"{LABELS[name]} {data[name]['throughput']:,.0f} calls/s"
            for name in INTERLEAVED
            if "throughput" in data.get(name, {})
        ]
        line += (
            f". Then throughput at {data['callers']} callers, {data['throughput_rounds']} "
            f"alternating rounds ({data['throughput_calls']:,} calls each, median): "
            + "; ".join(rates)
        )
    for size_key in data.get("bandwidth_sizes", []):
        field = _bandwidth_field(size_key)
        moved = [
            f"{LABELS[name]} {data[name][field]:,.0f} MB/s"
            for name in INTERLEAVED
            if field in data.get(name, {})
        ]
        line += (
            f". Then {size_key} bandwidth, {data['bandwidth_rounds']} alternating rounds "
            f"(median): " + "; ".join(moved)
        )
    return line


def _rss_line(rss: dict[str, Any]) -> str:
    if rss["error"]:
        return f"host RSS: failed ({rss['error']})"
    return (
        f"host RSS (snakepool, {rss['callers']} callers): {_fmt(rss['before_mib'], '.1f')} MiB after "
        f"{rss['warmup_calls']:,} warm-up calls -> {_fmt(rss['after_mib'], '.1f')} MiB after "
        f"{rss['calls']:,} more calls ({_fmt(rss['growth_mib'], '+.1f')} MiB, "
        f"{_fmt(rss['seconds'], '.0f')} s)"
    )


def _check_line(check: dict[str, Any]) -> str:
    return (
        f"{_verdict(check):4}  {check['target']}: {_fmt(check['ratio'], '.2f')} "
        f"(target {check['op']} {check['threshold']:g})"
    )


def render_text(result: dict[str, Any]) -> str:
    """The tables, the RSS line and the target checks, for a terminal."""
    machine = result["machine"]
    parts = [
        f"snakepool bench: {result['config']['workers']} workers, {machine['usable_cpus']} usable CPUs "
        f"({machine['cpu']}), Python {machine['python']}, start method {machine['start_method']}, "
        f"event loop {machine.get('event_loop', 'asyncio')}, "
        f"load average {machine['load_average_start']} -> {machine.get('load_average_end')}",
        "",
        _text_table(*_rows(result)),
        "",
        _text_table(*_startup_rows(result)),
        "",
        _interleaved_line(result),
        "",
        _rss_line(result["rss"]),
        "",
        "targets:",
        *(f"  {_check_line(c)}" for c in result["targets"]),
    ]
    notes = _notes(result)
    if notes:
        parts += ["", "notes:", *(f"  {n}" for n in notes)]
    parts.append(f"\n(total {result['elapsed_s']:.0f} s)")
    return "\n".join(parts)


def _notes(result: dict[str, Any]) -> list[str]:
    notes = []
    for row in result["peers"].values():
        for key, error in row["errors"].items():
            notes.append(f"{row['label']}: {key}: {error}")
    for key, error in result["startup"]["errors"].items():
        notes.append(f"start-up {key}: {error}")
    if result["leftover_processes"]:
        notes.append(f"processes left behind: {result['leftover_processes']}")
    return notes


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |"]
    lines.append("|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|")
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def render_markdown(
    result: dict[str, Any], plot: str | None = None, command: str | None = None
) -> str:
    """The results as a Markdown section (machine, command, tables, plot, targets)."""
    machine = result["machine"]
    config = result["config"]
    command = command or (
        f"python stress/bench.py --workers {config['workers']} --calls {config['calls']} "
        f"--rss-calls {config['rss_calls']}"
    )
    lines = [
        "## Machine",
        "",
        f"- CPU: {machine['cpu']}, {machine['cpu_count']} logical CPUs ({machine['usable_cpus']} usable)",
        f"- memory: {machine['memory_gib']} GiB",
        f"- {machine['implementation']} {machine['python']} on {machine['platform']}",
        f"- multiprocessing start method: {machine['start_method']}",
        f"- event loop: {machine.get('event_loop', 'asyncio')}",
        f"- load average (1, 5, 15 min) at the start: {machine['load_average_start']}, "
        f"at the end: {machine.get('load_average_end')}",
        "- versions: " + ", ".join(f"{k} {v or 'missing'}" for k, v in machine["versions"].items()),
        "",
        "## Reproduce",
        "",
        "```sh",
        command,
        "```",
        "",
        f"{config['workers']} workers for every peer; {config['calls']:,} calls per throughput point "
        f"(after a warm-up), {config['latency_calls']:,} sequential calls for the latency percentiles, "
        f"{config['bandwidth_bytes'] // MiB} MiB of payload per bandwidth size, start-up as the median "
        f"of {config['startup_repeats']} run(s).",
        "",
        "## Results",
        "",
        _md_table(*_rows(result)),
        "",
        "Throughput: N caller tasks on one asyncio loop, each awaiting one no-op call at a time. "
        "Bandwidth: sequential round trips of a `bytes` payload, payload MB (10^6 bytes) per second "
        "in each direction.",
        "",
    ]
    if plot:
        lines += [f"![no-op throughput vs concurrent callers]({plot})", ""]
    lines += [
        "### Start-up",
        "",
        _md_table(*_startup_rows(result)),
        "",
        "snakepool: until `async with Pool('generic', size=n)` is entered (every worker has "
        "imported its adapter and said hello). Bare: n `python -c` interpreters spawned at once, "
        "until each has printed one byte. Raw loop: n bare msgpack workers, until each has "
        "answered one frame.",
        "",
        "### Against the raw loop, interleaved",
        "",
        _interleaved_line(result)
        + ". The peers above are measured one after another, minutes apart; these "
        "rounds alternate between the raw loop and snakepool, so both see the same "
        "machine, and the targets against the raw loop use them.",
        "",
        "### Host memory",
        "",
        _rss_line(result["rss"]),
        "",
        "## Targets",
        "",
        _md_table(
            ["target", "ratio", "required", "result"],
            [
                [c["target"], _fmt(c["ratio"], ".2f"), f"{c['op']} {c['threshold']:g}", _verdict(c)]
                for c in result["targets"]
            ],
        ),
        "",
        "## How each peer is driven",
        "",
        *(
            f"- **{row['label']}**: {row['how'] or row['skipped']}"
            for row in result["peers"].values()
        ),
        "",
    ]
    notes = _notes(result)
    if notes:
        lines += ["## Notes from the run", "", *(f"- {n}" for n in notes), ""]
    return "\n".join(lines)


def plot_throughput(result: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """A PNG of no-op throughput against concurrent callers, one line per peer (matplotlib)."""
    matplotlib: Any = importlib.import_module("matplotlib")
    matplotlib.use("Agg")
    plt: Any = importlib.import_module("matplotlib.pyplot")
    concurrency = result["config"]["concurrency"]
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    styles = {"raw_loop": "--", "snakepool": "-", "snakepool_c8": "-"}
    for name, row in result["peers"].items():
        if row["skipped"]:
            continue
        points = [(c, row["throughput"][str(c)]) for c in concurrency]
        points = [(c, v) for c, v in points if v is not None]
        if not points:
            continue
        xs, ys = zip(*points, strict=True)
        ax.plot(
            xs,
            ys,
            styles.get(name, ":"),
            marker="o",
            linewidth=2.5 if name.startswith("snakepool") else 1.5,
            label=row["label"],
        )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(concurrency)
    ax.set_xticklabels([str(c) for c in concurrency])
    ax.set_xlabel("concurrent callers")
    ax.set_ylabel("no-op calls per second (log)")
    machine = result["machine"]
    ax.set_title(
        f"No-op throughput, {result['config']['workers']} workers, "
        f"{machine['usable_cpus']} CPUs, Python {machine['python']}"
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.fspath(path))
    plt.close(fig)


# --- command line -----------------------------------------------------------------------------


def _command(args: argparse.Namespace, prog: str) -> str:
    """The command line that reproduces a run with these options."""
    words = [prog, "--workers", str(args.workers)]
    if args.quick:
        words.append("--quick")
    if getattr(args, "uvloop", False):
        words.append("--uvloop")
    for option, value in (
        ("--calls", args.calls),
        ("--rss-calls", args.rss_calls),
        ("--json", args.json),
        ("--plot", args.plot),
        ("--markdown", args.markdown),
    ):
        if value is not None:
            words += [option, str(value)]
    return " ".join(words)


def run_from_args(args: argparse.Namespace, *, prog: str = "python stress/bench.py") -> int:
    """Run the benchmark from parsed options; print the table and the target checks."""
    if args.workers < 1:
        print("bench: --workers must be at least 1", file=sys.stderr)
        return 2
    if args.uvloop:
        if importlib.util.find_spec("uvloop") is None:
            print("bench: --uvloop needs uvloop, which is not installed", file=sys.stderr)
            return 2
        uvloop: Any = importlib.import_module("uvloop")
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        print(
            "bench: --plot needs matplotlib, which is not installed (pip install matplotlib)",
            file=sys.stderr,
        )
        return 2

    def progress(line: str) -> None:
        print(f"  {line}", file=sys.stderr, flush=True)

    result = asyncio.run(
        run_benchmark(
            workers=args.workers,
            calls=args.calls,
            quick=args.quick,
            rss_calls=args.rss_calls,
            progress=progress,
        )
    )
    print(render_text(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if args.plot:
        plot_throughput(result, args.plot)
    if args.markdown:
        plot = None
        if args.plot:
            try:
                plot = os.path.relpath(args.plot, Path(args.markdown).resolve().parent)
            except ValueError:
                plot = args.plot
        text = render_markdown(result, plot=plot, command=_command(args, prog))
        Path(args.markdown).write_text(text + "\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bench", description="snakepool against its peers, side by side."
    )
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))
