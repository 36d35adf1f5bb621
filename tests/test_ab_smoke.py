"""stress/ab.py in a tiny configuration: structure and cleanup only, never timings.

It runs as a child interpreter, as it would from the command line: its own
children import snakepool from temporary git worktrees, which must be gone
afterwards (the autouse fixture checks that no process is left behind).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
AB = REPO / "stress" / "ab.py"
#: Each scenario's metrics, by their key in the JSON and (the start of) their title.
METRICS = {
    "both": {
        "plain_calls_s": "plain calls/s, 64 callers",
        "plain_p50_us": "sequential p50 (generic echo)",
        "plain_cpu_us": "CPU per plain call",
        "session_calls_s": "session calls/s, 64 sessions",
        "session_p50_us": "sequential p50, one session",
        "session_pool_plain_calls_s": "plain calls/s on the session pool",
        "session_over_plain": "session/plain calls/s, per round",
    },
    "socket": {
        "socket_calls_s": "calls/s through snakepool up, 64 callers",
        "socket_p50_us": "sequential p50 through snakepool up",
        "socket_server_cpu_us": "CPU per call of the snakepool up process",
    },
}


def _worktrees() -> str:
    return subprocess.run(
        ["git", "-C", str(REPO), "worktree", "list", "--porcelain"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout


@pytest.mark.slow
@pytest.mark.parametrize("scenario", sorted(METRICS))
def test_ab_runs_a_scenario_and_removes_its_worktrees(tmp_path: Path, scenario: str) -> None:
    before = _worktrees()
    out = tmp_path / "ab.json"
    command = [sys.executable, str(AB), "HEAD", "--rounds", "1", "--calls", "200"]
    ab = subprocess.Popen(
        [*command, "--scenario", scenario, "--json", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        stdout, stderr = ab.communicate(timeout=100)
    except subprocess.TimeoutExpired:
        ab.terminate()  # SIGTERM: ab.py stops its child and removes its worktrees
        stdout, stderr = ab.communicate(timeout=30)
        pytest.fail(f"stress/ab.py took over 100 s:\n{stdout}{stderr}")
    assert ab.returncode == 0, stdout + stderr
    titles = METRICS[scenario].values()
    for title in titles:
        assert title in stdout, (title, stdout)
    assert stdout.count("new vs old (medians):") == len(titles), stdout
    assert "old: snakepool from " in stdout and "new: snakepool from " in stdout

    result: dict[str, Any] = json.loads(out.read_text())
    assert set(result["metrics"]) == set(METRICS[scenario])
    for name, metric in result["metrics"].items():
        assert len(metric["old"]) == len(metric["new"]) == 1, name
        assert metric["old_median"] > 0 and metric["new_median"] > 0, name
        assert metric["new_over_old"] > 0, name
    workdir = result["workdir"]
    for side in ("old", "new"):  # each side's host and workers imported its own tree
        assert result[side]["host_file"].startswith(f"{workdir}/{side}/src/"), result[side]
        assert result[side]["worker_file"] == result[side]["host_file"], result[side]
    assert not Path(workdir).exists()
    assert _worktrees() == before


@pytest.mark.slow
def test_ab_paired_runs_both_versions_side_by_side_and_cleans_up(tmp_path: Path) -> None:
    before = _worktrees()
    out = tmp_path / "ab.json"
    command = [sys.executable, str(AB), "HEAD", "--rounds", "1", "--calls", "256", "--paired"]
    ab = subprocess.run(
        [*command, "--json", str(out)], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert ab.returncode == 0, ab.stdout + ab.stderr
    result: dict[str, Any] = json.loads(out.read_text())
    assert set(result["metrics"]) == {
        "plain_calls_s",
        "plain_p50_us",
        "plain_cpu_us",
        "plain_host_cpu_us",
    }
    for name, metric in result["metrics"].items():
        assert len(metric["old"]) == len(metric["new"]) == 1, name
        assert metric["old_median"] > 0 and metric["new_median"] > 0, name
    for side in ("old", "new"):  # each side imported its own tree
        assert result[side]["host_file"].startswith(f"{result['workdir']}/{side}/src/")
    assert not Path(result["workdir"]).exists()
    assert _worktrees() == before
