"""stress/socket_bench.py, shortened: it measures both sides and says so."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/<pid>/task"),
]

STRESS_DIR = Path(__file__).resolve().parents[1] / "stress"


async def test_the_socket_bench_measures_both_side_by_side() -> None:
    if str(STRESS_DIR) not in sys.path:
        sys.path.insert(0, str(STRESS_DIR))
    bench = importlib.import_module("socket_bench")
    args = argparse.Namespace(workers=1, rounds=2, sequential=20, calls=200, callers=8)
    found = await bench.measure(args)
    for name in ("embedded", "socket"):
        row = found[name]
        assert len(row["p50"]) == len(row["rate"]) == 2
        measured = {k: v for k, v in row.items() if name == "socket" or k != "client"}
        assert all(value > 0 for values in measured.values() for value in values), (name, row)
        assert all(t >= h for t, h in zip(row["total"], row["cpu"], strict=True))
    shown = bench.report(found, args)
    assert found["embedded"]["client"] == [0.0, 0.0]  # (no client: the pool is in-process)
    assert "8 in flight (calls/s)" in shown and "socket/embedded" in shown
    for reference in ("bare", "relay"):
        assert len(found[reference]["p50"]) == 2 and all(p > 0 for p in found[reference]["p50"])
    assert "bare socket round trip p50" in shown and "relay round trip p50" in shown
