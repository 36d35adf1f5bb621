"""Sessions shared through Redis by real host processes (issue 19's guarantee).

Each host is a process of its own (``sp_redis_host.py``: a pool with one worker on
the test Redis, driven one JSON line at a time), so what one host does reaches the
other only through Redis. The stress versions (8 hosts, 100,000 sessions) are in
``stress/redis_sessions.py``; smaller runs of that script are at the end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import TESTS_DIR

REPO = TESTS_DIR.parent
STRESS = REPO / "stress" / "redis_sessions.py"


class Host:
    """A host process: ``ask`` sends a request and returns its answer."""

    def __init__(self, url: str) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(TESTS_DIR), *sys.path])
        self.process = subprocess.Popen(
            [sys.executable, str(TESTS_DIR / "sp_redis_host.py"), url],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )

    def send(self, op: str, **fields: Any) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps({"op": op, **fields}) + "\n")
        self.process.stdin.flush()

    def receive(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        assert line, f"host process exited (status {self.process.wait()})"
        answer: dict[str, Any] = json.loads(line)
        return answer

    def ask(self, op: str, **fields: Any) -> Any:
        self.send(op, **fields)
        answer = self.receive()
        assert "ok" in answer, answer
        return answer["ok"]

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()  # the host closes its pool and exits
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def hosts(redis_url: str) -> Iterator[tuple[Host, Host]]:
    first, second = Host(redis_url), Host(redis_url)
    try:
        yield first, second
    finally:
        first.close()
        second.close()


def test_a_call_on_b_sees_what_a_set_define_and_saved_before_it(
    hosts: tuple[Host, Host],
) -> None:
    a, b = hosts
    a.ask("open", session="s")
    a.ask("define", session="s", name="x", type="int", value=0)
    b.ask("open", session="s")
    assert b.ask("call", session="s", command="var", args={"name": "x"}) == 0  # B's worker holds x
    for i in range(1, 31):
        a.ask("set", session="s", values={"x": i})
        # Nothing but Redis connects the set on A to this call on B.
        assert b.ask("call", session="s", command="var", args={"name": "x"}) == i
    a.ask("set", session="s", values={"x": 100})
    a.ask("define", session="s", name="y", type="str", value="new")
    assert b.ask("call", session="s", command="all_vars") == {"x": 100, "y": "new"}
    # save_state on A (its worker's ctx.save_state): B's worker restores from it first.
    a.ask("call", session="s", command="remember", args={"key": "k", "value": "from A"})
    recalled = b.ask("call", session="s", command="recall", args={"key": "k"})
    assert recalled["value"] == "from A"
    assert recalled["restored_on"] == recalled["pid"]


def test_two_hosts_racing_set_many_leave_one_whole_result(hosts: tuple[Host, Host]) -> None:
    a, b = hosts
    a.ask("open", session="race")
    a.ask("define", session="race", name="a", type="str", value="")
    a.ask("define", session="race", name="b", type="str", value="")
    b.ask("open", session="race")
    a.send("set_many_loop", session="race", count=40, tag="A")
    b.send("set_many_loop", session="race", count=40, tag="B")
    seen = [pair for host in (a, b) for pair in host.receive()["ok"]]
    assert seen and all(first == second for first, second in seen), seen  # never a mix
    final_a = a.ask("call", session="race", command="all_vars")
    final_b = b.ask("call", session="race", command="all_vars")
    assert final_a == final_b
    assert final_a["a"] == final_a["b"] and final_a["a"] in {"A39", "B39"}


def test_watch_on_b_sees_every_update_made_on_a_in_order(hosts: tuple[Host, Host]) -> None:
    a, b = hosts
    a.ask("open", session="w")
    a.ask("define", session="w", name="n", type="int", value=0)
    b.ask("open", session="w")
    assert b.ask("watch", session="w", count=25) == "watching"
    for i in range(1, 26):
        a.ask("set", session="w", values={"n": i})
    assert b.ask("watched") == [["n", i, i + 1] for i in range(1, 26)]


def _stress(*args: str, timeout: float) -> str:
    env = dict(os.environ)
    done = subprocess.run(
        [sys.executable, str(STRESS), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.mark.slow
def test_hosts_calling_while_one_sets_lose_nothing_and_never_go_back(redis_url: str) -> None:
    out = _stress(
        "hosts", "--url", redis_url, "--hosts", "3", "--sessions", "16", "--seconds", "3",
        "--callers", "8", timeout=100,
    )  # fmt: skip
    assert "ok: every call saw a whole set_many" in out, out


@pytest.mark.slow
def test_sessions_made_and_expired_through_one_host_leave_its_memory(redis_url: str) -> None:
    out = _stress(
        "rss", "--url", redis_url, "--sessions", "1500", "--ttl", "2", "--call-every", "20",
        "--rss-limit", "20", timeout=100,
    )  # fmt: skip
    assert "all expired and forgotten" in out, out


def test_stress_script_is_where_the_docs_say(tmp_path: Path) -> None:
    assert STRESS.exists()
