"""``snakepool up --dashboard/--metrics``, ``snakepool logs`` and ``status``, run as a
user would: a real server subprocess, real HTTP, and the dashboard in a real
headless Chromium (its DevTools protocol, tests/cdp.py).

The browser test skips where no Chromium is installed, except under CI
(``CI=true``), where .ci/run installs Debian's ``chromium`` and a skip would
hide a broken dashboard.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

import snakepool
from cdp import Browser, find_chromium
from conftest import free_port
from waiting import wait_for

SNAKEPOOL = [sys.executable, "-m", "snakepool.cli"]
CONFIG = """\
    [pools.web]
    adapter = "sp_observability:Observed"
    size = 2
    """


class Up:
    """A ``snakepool up`` subprocess; ``stop()`` ends it (SIGTERM, then SIGKILL)."""

    def __init__(self, workdir: Path, env: dict[str, str], *flags: str) -> None:
        config = workdir / "pools.toml"
        config.write_text(textwrap.dedent(CONFIG))
        self.sock = workdir / "s.sock"
        self.output = workdir / "up.log"
        self.env = env
        with self.output.open("w") as out:
            self.process = subprocess.Popen(
                [*SNAKEPOOL, "up", "--config", str(config), "--socket", str(self.sock), *flags],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
            )

    def wait_serving(self) -> None:
        def serving() -> bool:
            assert self.process.poll() is None, self.output.read_text()
            return "snakepool: serving" in self.output.read_text()

        wait_for(serving, timeout=60)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*SNAKEPOOL, *args],
            capture_output=True,
            text=True,
            timeout=60,
            env=self.env,
            stdin=subprocess.DEVNULL,
        )

    def calls(self, n: int, command: str = "echo", **args: object) -> None:
        async def run() -> None:
            async with snakepool.connect(self.sock) as client:
                async with anyio.create_task_group() as tg:
                    for _ in range(n):
                        tg.start_soon(self._call, client, command, args)

        anyio.run(run)

    @staticmethod
    async def _call(client: snakepool.server.Client, command: str, args: dict[str, object]) -> None:
        try:
            await client["web"].call(command, args)
        except snakepool.RemoteError:
            assert command == "fail"

    def pid(self, worker: int) -> int:
        async def run() -> int:
            async with snakepool.connect(self.sock) as client:
                pid: int = (await client.status())["web"]["workers"][worker]["pid"]
                return pid

        return anyio.run(run)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                assert self.process.wait(timeout=60) == 0, self.output.read_text()
            finally:
                if self.process.poll() is None:
                    self.process.kill()
                    self.process.wait()


@pytest.fixture
def up_factory(workdir: Path, env: dict[str, str]) -> Iterator[type[Up]]:
    started: list[Up] = []

    class Started(Up):
        def __init__(self, *flags: str) -> None:
            super().__init__(workdir, env, *flags)
            started.append(self)

    yield Started  # type: ignore[misc]
    for up in started:
        up.stop()


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, str, dict[str, str]]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode(), dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(), dict(exc.headers)


def _chromium() -> str:
    found = find_chromium()
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI must run the dashboard in a browser: chromium is not installed")
        pytest.skip("no chromium installed (apt-get install chromium); CI installs it")
    return found


def test_the_dashboard_in_a_browser(up_factory: type[Up], tmp_path: Path) -> None:
    """It loads without console errors, shows calls as they happen, shows a killed
    worker restarted and its log; a screenshot is written."""
    executable = _chromium()
    port, metrics_port = free_port(), free_port()
    up = up_factory("--dashboard", f"127.0.0.1:{port}", "--metrics", f"127.0.0.1:{metrics_port}")
    up.wait_serving()
    browser = Browser(executable)
    try:
        page = browser.page()
        page.goto(f"http://127.0.0.1:{port}/")
        page.wait_for("document.querySelector('#status').textContent === 'live'")
        done = "Number(document.querySelector('#pools tr[data-pool=web] .completed').textContent)"
        assert page.wait_for(f"{done} >= 0 && 'ready'") == "ready"
        before = page.evaluate(done)

        up.calls(60)
        up.calls(1, "say", text="a line the page shows")
        assert page.wait_for(f"{done} >= {before + 61}")
        page.wait_for(
            "document.querySelector('#log').textContent.includes('a line the page shows')"
        )
        page.wait_for("document.querySelectorAll('#charts polyline[points*=\",\"]').length >= 2")
        page.wait_for(
            "[...document.querySelectorAll('#commands tbody tr')]"
            ".some(r => r.textContent.includes('echo'))"
        )

        pid = up.pid(0)
        os.kill(pid, signal.SIGKILL)
        row = "document.querySelector('#workers tr[data-worker=\"web/0\"]')"
        page.wait_for(
            f"{row}.querySelector('.restarts').textContent === '1'"
            f" && {row}.querySelector('.state').textContent === 'idle'"
            f" && {row}.querySelector('.pid').textContent !== '{pid}'",
            timeout=60,
        )
        page.wait_for(
            "[...document.querySelectorAll('#events li')].some(e => e.textContent.includes('worker.exited'))"
        )
        up.calls(1, "fail")
        page.wait_for("!!document.querySelector('#errors tr[data-category=application]')")

        shot = tmp_path / "dashboard.png"
        page.screenshot(shot)
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
        if os.environ.get("SNAKEPOOL_DASHBOARD_PNG"):  # (docs/dashboard.png is made so)
            shutil.copy(shot, os.environ["SNAKEPOOL_DASHBOARD_PNG"])
        assert page.errors == []
        page.close()
    finally:
        browser.close()

    status, text, _ = get(f"http://127.0.0.1:{metrics_port}/metrics")
    assert status == 200
    assert 'snakepool_calls_total{command="echo",outcome="ok",pool="web"} 60.0' in text
    assert 'snakepool_worker_restarts_total{pool="web",reason="crashed"} 1.0' in text
    assert "snakepool_socket_connections " in text


def test_logs_status_and_a_remote_dashboard_that_needs_the_token(
    up_factory: type[Up], workdir: Path
) -> None:
    port = free_port()
    up = up_factory("--tcp", "127.0.0.1:0", "--allow-remote", "--dashboard", f"0.0.0.0:{port}")
    up.wait_serving()

    # The page and its data need the token (0.0.0.0 is not loopback).
    status, body, _ = get(f"http://127.0.0.1:{port}/api/state")
    assert status == 401 and "token" in body
    token = (workdir / "run" / "token").read_text().strip()
    status, _, headers = get(f"http://127.0.0.1:{port}/?token={token}")
    assert status == 200 and "snakepool_token=" in headers.get("set-cookie", "")
    status, body, _ = get(
        f"http://127.0.0.1:{port}/api/state", {"Cookie": f"snakepool_token={token}"}
    )
    assert status == 200 and json.loads(body)["pools"][0]["name"] == "web"
    assert get(f"http://127.0.0.1:{port}/api/state", {"Authorization": "Bearer nope"})[0] == 401

    # snakepool logs: what the workers wrote, one worker or all; -f follows.
    up.calls(1, "say", text="hello from web")
    wait_for(lambda: "hello from web" in up.cli("logs", "--socket", str(up.sock), "web").stdout)
    shown = up.cli("logs", "--socket", str(up.sock), "web", "-n", "1").stdout
    assert shown.strip().endswith("] hello from web")
    follow = subprocess.Popen(
        [*SNAKEPOOL, "logs", "--socket", str(up.sock), "web", "-f", "-n", "0"],
        stdout=subprocess.PIPE,
        text=True,
        env=up.env,
    )
    try:
        # Follow until a new line shows (a line written before it listened is not shown).
        deadline = time.monotonic() + 30
        assert follow.stdout is not None
        seen = ""
        while "followed line" not in seen:
            assert time.monotonic() < deadline, seen
            up.calls(1, "say", text="followed line")
            seen += _read_available(follow.stdout)
    finally:
        follow.terminate()
        follow.wait(timeout=10)
    bad = up.cli("logs", "--socket", str(up.sock), "nope")
    assert bad.returncode == 1 and "no pool named 'nope'" in bad.stderr

    # snakepool status: a line per worker with its rate, latencies and uptime.
    up.calls(20)
    table = up.cli("status", "--socket", str(up.sock)).stdout
    header = next(line for line in table.splitlines() if line.startswith("WORKER"))
    assert header.split() == [
        "WORKER", "STATE", "PID", "INFLIGHT", "REQUESTS", "RESTARTS", "CALLS/S", "P50", "P99", "UPTIME"
    ]  # fmt: skip
    rows = [line.split() for line in table.splitlines() if line.startswith("web/")]
    assert len(rows) == 2
    assert any(row[7].endswith("ms") for row in rows)  # (a worker that ran calls)


def _read_available(stream: object) -> str:
    """What the follower printed so far, waiting at most a second for a line."""
    import selectors

    selector = selectors.DefaultSelector()
    selector.register(stream, selectors.EVENT_READ)  # type: ignore[arg-type]
    text = ""
    if selector.select(timeout=1.0):
        text = stream.readline()  # type: ignore[attr-defined]
    selector.close()
    return str(text)


def test_up_refuses_a_dashboard_it_could_not_protect(workdir: Path, env: dict[str, str]) -> None:
    cases = {
        ("--dashboard", "0.0.0.0:0"): "pass --allow-remote",
        ("--dashboard", "0.0.0.0:0", "--allow-remote"): "requires the TCP token",
        ("--metrics", "nonsense"): "--metrics must look like HOST:PORT",
    }
    for flags, message in cases.items():
        done = subprocess.run(
            [*SNAKEPOOL, "up", "--socket", str(workdir / "x.sock"), *flags],
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
            env=env,
        )
        assert done.returncode == 2, done.stderr
        assert message in done.stderr
        assert not (workdir / "x.sock").exists()
