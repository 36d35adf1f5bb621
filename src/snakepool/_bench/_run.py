"""A whole run: every peer and phase in turn, the targets, the machine."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import multiprocessing
import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil

from ._common import (
    BANDWIDTH_SIZES,
    CONCURRENCY,
    INTERLEAVED,
    LABELS,
    PEERS,
    RSS_NOISE_MIB,
    STARTUP_SIZES,
    MiB,
    Progress,
    bandwidth_field,
    ratio_of,
    size_label,
)
from ._measure import (
    compile_bytecode,
    interleaved_rounds,
    measure_peer,
    measure_startup,
    rss_growth,
)


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
            ratio = ratio_of(interleaved[key][field], interleaved["raw_loop"][field])
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
                ratio_of(sp["throughput"].get(top), peers[other]["throughput"].get(top)),
                ">=",
                threshold,
                "snakepool calls/s / peer calls/s",
            )
        raw = peers["raw_loop"]
        against_raw(
            key,
            f"no-op throughput at {top} callers vs",
            "throughput" if str(interleaved.get("callers")) == top else None,
            ratio_of(sp["throughput"].get(top), raw["throughput"].get(top)),
            ">=",
            0.6,
            "snakepool calls/s / raw calls/s",
        )
        against_raw(
            key,
            "sequential p50 vs",
            "p50",
            ratio_of(sp["latency_us"]["p50"], raw["latency_us"]["p50"]),
            "<=",
            1.5,
            "snakepool p50 / raw p50",
        )
        for size_key in sp["bandwidth_mb_s"]:
            against_raw(
                key,
                f"{size_key} bandwidth vs",
                bandwidth_field(size_key),
                ratio_of(sp["bandwidth_mb_s"][size_key], raw["bandwidth_mb_s"][size_key]),
                ">=",
                0.5,
                "snakepool MB/s / raw MB/s",
            )
    sizes = [str(n) for n in result["config"]["startup_sizes"]]
    n = "16" if "16" in sizes else (sizes[-1] if sizes else None)
    if n is not None:
        add(
            f"snakepool: {n} workers ready vs {n} bare interpreter spawns",
            ratio_of(startup["snakepool"].get(n), startup["bare"].get(n)),
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
    bytecode = compile_bytecode()
    result: dict[str, Any] = {
        "config": {
            "workers": workers,
            "calls": calls,
            "latency_calls": latency_calls,
            "concurrency": list(concurrency),
            "startup_sizes": list(startup_sizes),
            "startup_repeats": startup_repeats,
            "bandwidth_sizes": [size_label(s) for s in bandwidth_sizes],
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
        result["peers"][name] = await measure_peer(
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
            result["interleaved_latency_us"] = await interleaved_rounds(
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
    result["startup"] = await measure_startup(startup_sizes, startup_repeats, phase_timeout, say)
    say("== host RSS")
    result["rss"] = await rss_growth(workers, rss_calls, rss_callers, phase_timeout, say)
    if all(k in result["peers"] for k in ("snakepool", "snakepool_c8", "process_pool_executor", "multiprocessing_pool", "raw_loop")):  # fmt: skip
        result["targets"] = _targets(result)
    else:
        result["targets"] = []
    result["elapsed_s"] = time.perf_counter() - began
    result["machine"]["load_average_end"] = _load_average()
    await asyncio.sleep(0.5)  # give exiting workers a moment before looking
    result["leftover_processes"] = [c for c in _children() if "resource_tracker" not in c]
    return result
