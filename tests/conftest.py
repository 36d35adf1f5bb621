"""Shared fixtures: the anyio backend, and a check that no test leaves a process behind."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:  # workers import the test adapters from here
    sys.path.insert(0, str(TESTS_DIR))

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from snakepool import testing  # noqa: E402
from snakepool.testing import free_port as free_port  # noqa: E402
from snakepool.testing import stop_redis_server as stop_redis_server  # noqa: E402
from waiting import wait_for as wait_for  # noqa: E402  (re-exported: older tests import it here)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _children() -> dict[int, str]:
    found = {}
    for child in psutil.Process().children(recursive=True):
        try:
            found[child.pid] = " ".join(child.cmdline())
        except psutil.Error:
            continue
    return found


#: Processes that outlive single tests on purpose (the session's redis-server).
SHARED_PROCESSES: set[int] = set()


@pytest.fixture(autouse=True)
def no_leftover_processes() -> Iterator[None]:
    """Every process a test starts must be gone shortly after it ends."""
    before = set(_children())
    yield

    def new() -> dict[int, str]:
        return {
            pid: cmd
            for pid, cmd in _children().items()
            if pid not in before and pid not in SHARED_PROCESSES
        }

    deadline = time.monotonic() + 10.0
    leftover = new()
    while leftover and time.monotonic() < deadline:
        time.sleep(0.05)
        leftover = new()
    for pid in leftover:
        with contextlib.suppress(psutil.Error):
            psutil.Process(pid).kill()
    assert not leftover, f"test left processes behind: {leftover}"


# --- a clock moved by hand (the breaker's and the pacing's unit tests) --------------------


class FakeClock:
    """A monotonic clock that moves only when a test sets ``now``."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


# --- a private directory, and the environment of a CLI run in it -----------------------------


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A fresh directory with a short path (Unix socket paths are limited)."""
    directory = Path(tempfile.mkdtemp(prefix="sp-"))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def env(workdir: Path) -> dict[str, str]:
    """The environment of a ``snakepool`` command run by a test: the test adapters
    importable, its runtime directory in ``workdir``, no inherited socket or
    terminal size."""
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join([str(TESTS_DIR), *sys.path])
    environment["SNAKEPOOL_RUNTIME_DIR"] = str(workdir / "run")
    for name in ("SNAKEPOOL_SOCKET", "COLUMNS", "LINES"):
        environment.pop(name, None)
    return environment


# --- Redis (session store tests) ------------------------------------------------------------


def start_redis_server(port: int, timeout: float = 10.0) -> subprocess.Popen[bytes]:
    """``snakepool.testing.start_redis_server``; the test is skipped where none is installed."""
    try:
        return testing.start_redis_server(port, timeout=timeout)
    except FileNotFoundError as exc:
        pytest.skip(f"{exc}; CI installs it")


@pytest.fixture(scope="session")
def redis_server() -> Iterator[str]:
    """A ``redis-server`` for the whole test session; yields its URL."""
    port = free_port()
    process = start_redis_server(port)
    SHARED_PROCESSES.add(process.pid)
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        stop_redis_server(process)
        SHARED_PROCESSES.discard(process.pid)


@pytest.fixture(params=["memory", "redis"])
def store(request: pytest.FixtureRequest) -> Iterator[str]:
    """Each session store a pool can use: ``"memory"``, and the test Redis's URL."""
    if request.param == "memory":
        yield "memory"
    else:
        yield request.getfixturevalue("redis_url")


@pytest.fixture
def redis_url(redis_server: str) -> str:
    """The session's Redis URL, its database emptied first."""
    redis = pytest.importorskip(
        "redis", reason="redis-py is not installed: pip install -e '.[dev]'"
    )
    client = redis.Redis.from_url(redis_server)
    try:
        client.flushdb()
    finally:
        client.close()
    return redis_server
