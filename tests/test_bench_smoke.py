"""The benchmark's code path in a tiny configuration: structure only, never timings.

The benchmark runs in a child interpreter: ``multiprocessing.Pool`` and
``ProcessPoolExecutor`` fork, and loky leaves its resource tracker running
until its host exits, which must not be the test process.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from snakepool import _bench
from snakepool.cli import main as cli_main

TINY = """
import asyncio, json, sys
from snakepool import _bench
result = asyncio.run(_bench.run_benchmark(
    workers=2, calls=50, latency_calls=20, rss_calls=200, concurrency=(1, 8, 64),
    startup_sizes=[2], startup_repeats=1, bandwidth_sizes=[_bench.MiB],
    bandwidth_bytes=2 * _bench.MiB, phase_timeout=60.0,
))
json.dump(result, sys.stdout)
"""


@pytest.fixture(scope="module")
def result() -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-c", TINY], capture_output=True, text=True, timeout=100, check=False
    )
    assert done.returncode == 0, done.stderr
    loaded: dict[str, Any] = json.loads(done.stdout)
    return loaded


def test_every_peer_has_every_metric(result: dict[str, Any]) -> None:
    assert list(result["peers"]) == list(_bench.PEERS)
    for name, row in result["peers"].items():
        if name == "loky" and row["skipped"]:
            assert importlib.util.find_spec("loky") is None
            continue
        assert row["skipped"] is None, name
        assert row["errors"] == {}, (name, row["errors"])
        assert row["how"], name
        assert set(row["throughput"]) == {"1", "8", "64"}, name
        assert all(v > 0 for v in row["throughput"].values()), (name, row["throughput"])
        assert 0 < row["latency_us"]["p50"] <= row["latency_us"]["p99"], name
        assert set(row["bandwidth_mb_s"]) == {"1 MiB"}, name
        assert row["bandwidth_mb_s"]["1 MiB"] > 0, name


def test_interleaved_rounds_alternate_latency_throughput_and_bandwidth(
    result: dict[str, Any],
) -> None:
    interleaved = result["interleaved_latency_us"]
    assert interleaved["callers"] == 64
    for name in _bench.INTERLEAVED:
        assert 0 < interleaved[name]["p50"] <= interleaved[name]["p99"], name
        assert interleaved[name]["throughput"] > 0, name
        assert interleaved[name]["1 MiB MB/s"] > 0, name  # (alternating bandwidth rounds)
    targets = {check["target"] for check in result["targets"]}
    assert any("64 callers vs raw asyncio loop (interleaved rounds)" in t for t in targets)
    assert any("1 MiB bandwidth vs raw asyncio loop (interleaved rounds)" in t for t in targets)


def test_startup_rss_targets_and_cleanup(result: dict[str, Any]) -> None:
    startup = result["startup"]
    assert startup["errors"] == {}
    for kind in ("bare", "snakepool", "raw_loop"):
        assert startup[kind]["2"] > 0, kind
    rss = result["rss"]
    assert rss["error"] is None
    assert rss["calls"] == 200
    assert rss["before_mib"] > 0 and rss["after_mib"] > 0
    assert isinstance(rss["growth_mib"], float)
    targets = {check["target"] for check in result["targets"]}
    for needle in (
        "vs ProcessPoolExecutor",
        "vs multiprocessing.Pool",
        "throughput at 64 callers vs raw asyncio loop",
        "sequential p50",
        "1 MiB bandwidth",
        "workers ready",
        "host RSS growth",
    ):
        assert any(needle in t for t in targets), needle
    assert all(check["passed"] in (True, False) for check in result["targets"])
    assert result["leftover_processes"] == []
    assert result["machine"]["python"]


def test_renderings(result: dict[str, Any], tmp_path: Path) -> None:
    text = _bench.render_text(result)
    markdown = _bench.render_markdown(result, plot="benchmarks.png")
    for label in _bench.LABELS.values():
        assert label in text
        assert label in markdown
    assert "PASS" in text or "FAIL" in text
    assert "![" in markdown and "## Targets" in markdown
    if importlib.util.find_spec("matplotlib") is not None:
        png = tmp_path / "plot.png"
        _bench.plot_throughput(result, png)
        assert png.read_bytes().startswith(b"\x89PNG")


def test_cli_has_the_bench_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["bench", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--quick", "--workers", "--json", "--plot", "--rss-calls", "--markdown"):
        assert option in out


def test_plot_without_matplotlib_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "matplotlib" else real(name, *a),
    )
    assert cli_main(["bench", "--quick", "--plot", "x.png"]) == 2
    assert "matplotlib" in capsys.readouterr().err
