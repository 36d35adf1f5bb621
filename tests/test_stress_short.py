"""Short versions of the soaks in stress/ (the long ones: ``tox -e stress``).

Each runs real worker processes, kills some, and asserts the soak's report
lists no violation (its summary is the assertion message).
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

import pytest

pytestmark = pytest.mark.anyio

STRESS_DIR = Path(__file__).resolve().parents[1] / "stress"


def soak(name: str) -> ModuleType:
    """Import ``stress/<name>.py`` (stress/ is not a package; its scripts import each other)."""
    if str(STRESS_DIR) not in sys.path:
        sys.path.insert(0, str(STRESS_DIR))
    return importlib.import_module(name)


async def test_chaos_soak_short() -> None:
    report = await soak("chaos_soak").chaos_soak(calls=2_000, kill_every=150, workers=4, seed=1)
    assert report.ok, report.summary()
    assert report.counts["resolved"] == 2_000
    assert report.counts["kills"] >= 5, report.summary()


async def test_session_soak_short() -> None:
    report = await soak("session_soak").session_soak(
        sessions=40, calls_per_session=10, kill_every=40, workers=3, seed=1
    )
    assert report.ok, report.summary()
    assert report.counts["sessions"] == 40
    assert report.counts["kills"] >= 2, report.summary()


async def test_hostile_soak_short() -> None:
    report = await soak("hostile_soak").hostile_soak(3, workers=2, seed=1, hold=0.3)
    assert report.ok, report.summary()
    assert report.counts["good_calls"] > 0
    assert report.counts["hostile_dropped"] >= 3 * 7, report.summary()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/<pid>/task")
async def test_cpu_per_call_measures_every_peer() -> None:
    probe = soak("cpu_per_call")
    found = await probe.measure(rounds=1, sequential=50, calls=640)
    assert set(found) == set(probe.PEERS)
    for row in found.values():
        assert len(row["latency"]) == 50 and row["throughput"][0] > 0
        assert row["seq_host"][0] > 0 and row["host"][0] > 0
        assert row["seq_workers"][0] > 0 and row["workers"][0] > 0  # the workers' CPU was seen
    assert "snakepool (worker_concurrency=8)" in probe.report(found)


async def test_pacing_probe_reports_every_horizon() -> None:
    from snakepool.pool import _pacing

    probe = soak("pacing")
    chosen = _pacing.AHEAD_HORIZON
    try:
        rates = await probe.throughput([0.001, 0.004], rounds=1, calls=640)
        waits = await probe.mixed([0.001, 0.004], rounds=1, short=0.005, calls=320)
    finally:
        probe._set_horizon(chosen)
    assert set(rates) == set(waits) == {0.001, 0.004}
    for rate, share in rates.values():
        assert rate > 0 and 0 <= share <= 1
    for p50, p99, count in waits.values():
        assert 0.005 <= p50 <= p99 and count > 0  # every short call slept 5 ms at least
