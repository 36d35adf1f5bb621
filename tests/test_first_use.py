"""First use (issue 15): what a newcomer runs into in the first hour.

A ``BlockingPool`` left open (or interrupted with Ctrl-C) must not hang the
interpreter's exit; a worker's ``print()`` must show without logging set up;
messages must point at the real mistake (argument names, sklearn model ids,
the conformance kit's own kill, misspelt environment overrides).

The exit and output checks run real host scripts in a subprocess, with
their own workers: each script reports the processes it started, and the
test checks that none of them outlives it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

import snakepool
from conftest import TESTS_DIR
from snakepool import RemoteError
from snakepool.pool import ConfigError, Supervisor
from snakepool.testing import SessionExample, check_adapter
from waiting import gone, wait_for

#: How long a script may take to exit once it falls off its end (or gets Ctrl-C).
EXIT_WITHIN = 15.0
#: How long a script may take to start its pool (a loaded machine, 2 CPUs).
START_WITHIN = 90.0

ADAPTER_MODULE = '''
import os
import time
from pathlib import Path

from snakepool.adapters import Adapter, command


class FirstUse(Adapter):
    def setup(self, config):
        self.marker = config.get("teardown_marker")

    def teardown(self):
        if self.marker:
            Path(self.marker, f"teardown-{os.getpid()}").write_text("bye")

    @command
    def add(self, a: int, b: int) -> int:
        """Add two numbers."""
        return a + b

    @command
    def block(self, started: str, limit: float = 120.0) -> None:
        """Busy until the pool kills it: a sync call that ignores cancellation."""
        Path(started).write_text(str(os.getpid()))
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            time.sleep(0.02)

    @command
    def shout(self, text: str) -> str:
        """print() in a handler: it goes to the worker's stderr."""
        print(text)
        return text
'''

#: The top of every host script: Ctrl-C raises KeyboardInterrupt (even where the
#: test runs with SIGINT ignored), and a helper that reports the processes the
#: script started (its workers and the template that starts them).
SCRIPT_HEAD = """
import json, signal, sys
import psutil
signal.signal(signal.SIGINT, signal.default_int_handler)

def report_processes():
    pids = [p.pid for p in psutil.Process().children(recursive=True)]
    print("PROCESSES " + json.dumps(pids), flush=True)
"""


def write_adapter(directory: Path) -> None:
    (directory / "first_use_adapter.py").write_text(ADAPTER_MODULE)


def script_env(directory: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SNAKEPOOL_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(directory), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def reported_processes(stdout: str) -> set[int]:
    found: set[int] = set()
    for line in stdout.splitlines():
        if line.startswith("PROCESSES "):
            found.update(json.loads(line.removeprefix("PROCESSES ")))
    return found


def assert_all_gone(pids: set[int], timeout: float = 10.0) -> None:
    """Every pid in ``pids`` is gone (reaped or a zombie waiting for init) within ``timeout``."""
    wait_for(lambda: all(map(gone, pids)), timeout)


@contextlib.contextmanager
def host_script(directory: Path, body: str) -> Iterator[subprocess.Popen[str]]:
    """Run ``body`` (after SCRIPT_HEAD) as a host script; kill whatever is left at the end."""
    path = directory / "host_script.py"
    path.write_text(SCRIPT_HEAD + textwrap.dedent(body))
    process = subprocess.Popen(
        [sys.executable, str(path)],
        cwd=directory,
        env=script_env(directory),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # (a Ctrl-C in the test's terminal is not its)
    )
    try:
        yield process
    finally:
        if process.poll() is None:  # it hung: take it and what it started down
            for child in psutil.Process(process.pid).children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    child.kill()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.communicate()


def wait_for_file(process: subprocess.Popen[str], path: Path) -> None:
    """Wait until the script created ``path``; fail if it ends first or takes too long."""
    deadline = time.monotonic() + START_WITHIN
    while not path.exists():
        if process.poll() is not None:
            stdout, stderr = process.communicate()
            pytest.fail(f"the script ended early:\nstdout:\n{stdout}\nstderr:\n{stderr[-3000:]}")
        assert time.monotonic() < deadline, f"the script did not get to {path.name}"
        time.sleep(0.02)


def finish(process: subprocess.Popen[str], timeout: float) -> tuple[str, str]:
    try:
        return process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(process.pid).children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    child.kill()
        process.kill()
        stdout, stderr = process.communicate()
        pytest.fail(
            f"the script did not exit within {timeout:g}s\n"
            f"stdout:\n{stdout}\nstderr:\n{stderr[-3000:]}"
        )


# --- item 4: a BlockingPool never closed, or interrupted, does not hang the exit ---------


def test_a_blocking_pool_left_open_is_closed_when_the_script_ends(tmp_path: Path) -> None:
    write_adapter(tmp_path)
    ended = tmp_path / "ended"
    body = f"""
        from pathlib import Path
        from snakepool import BlockingPool

        pool = BlockingPool(
            "first_use_adapter:FirstUse",
            size=2,
            adapter_config={{"teardown_marker": {str(tmp_path)!r}}},
        )
        pool.start()
        assert pool.call("add", {{"a": 1, "b": 2}}) == 3
        workers = [w.pid for w in pool.statistics().workers]
        print("WORKERS " + json.dumps(workers), flush=True)
        report_processes()
        Path({str(ended)!r}).touch()
        # falls off the end without pool.close()
    """
    with host_script(tmp_path, body) as process:
        wait_for_file(process, ended)
        stdout, stderr = finish(process, EXIT_WITHIN)
    assert process.returncode == 0, stderr
    processes = reported_processes(stdout)
    workers = json.loads(next(ln for ln in stdout.splitlines() if ln.startswith("WORKERS "))[8:])
    assert set(workers) <= processes  # (with the template that started them)
    assert_all_gone(processes)
    # Closed as by close(), not merely killed with the host: every worker tore down.
    assert sorted(p.name for p in tmp_path.glob("teardown-*")) == sorted(
        f"teardown-{pid}" for pid in workers
    )


def test_ctrl_c_during_a_call_then_the_end_of_the_script_exits(tmp_path: Path) -> None:
    write_adapter(tmp_path)
    started = tmp_path / "started"
    body = f"""
        from snakepool import BlockingPool

        pool = BlockingPool("first_use_adapter:FirstUse", size=1)
        pool.start()
        report_processes()
        try:
            pool.call("block", {{"started": {str(started)!r}}})
        except KeyboardInterrupt:
            print("INTERRUPTED", flush=True)
        report_processes()
        # falls off the end without pool.close()
    """
    with host_script(tmp_path, body) as process:
        wait_for_file(process, started)  # the call is running in the worker
        process.send_signal(signal.SIGINT)
        stdout, stderr = finish(process, EXIT_WITHIN)
    assert "INTERRUPTED" in stdout, stderr
    assert process.returncode == 0, stderr
    processes = reported_processes(stdout)
    assert int(started.read_text()) in processes
    assert_all_gone(processes)


# --- item 6: a worker's print() shows without logging set up --------------------------------


@pytest.mark.parametrize("configured", [False, True], ids=["no-logging", "basicConfig"])
def test_worker_print_reaches_the_hosts_stderr(tmp_path: Path, configured: bool) -> None:
    write_adapter(tmp_path)
    setup = (
        'import logging\nlogging.basicConfig(level=logging.INFO, format="LOGGED %(name)s: %(message)s")\n'
        if configured
        else ""
    )
    body = (
        setup
        + """
from snakepool import BlockingPool

with BlockingPool("first_use_adapter:FirstUse", size=1) as pool:
    pool.call("shout", {"text": "hello from a handler"})
"""
    )
    with host_script(tmp_path, body) as process:
        _, stderr = finish(process, START_WITHIN)
    assert process.returncode == 0, stderr
    assert stderr.count("hello from a handler") == 1, stderr  # shown, and only once
    if configured:  # the host's logging gets it, as before
        assert "LOGGED snakepool.worker.default.0: hello from a handler" in stderr, stderr
    else:  # no logging: straight to stderr, with the worker's id
        assert "[default/0] hello from a handler" in stderr.splitlines(), stderr


# --- item 8: messages that point at the real mistake -----------------------------------------


@pytest.mark.anyio
async def test_a_wrong_argument_beside_a_missing_one_names_both() -> None:
    async with snakepool.Pool("sp_adapters:Basic", size=1) as pool:
        with pytest.raises(RemoteError) as wrong:
            await pool.call("add", {"a": 1, "c": 2})
        message = wrong.value.remote_message
        assert "missing a required argument: 'b'" in message, message
        assert "unexpected keyword argument 'c'" in message, message
        with pytest.raises(RemoteError, match=r"argument 'bb' \(did you mean 'b'\?\)"):
            await pool.call("add", {"a": 1, "bb": 2})  # a misspelling: the likely name
        with pytest.raises(RemoteError, match="missing 2 required arguments: 'a' and 'b'"):
            await pool.call("add", {})
        assert await pool.call("add", {"a": 1, "b": 2}) == 3  # and the worker is fine
        assert pool.statistics().workers[0].restarts == 0


@pytest.mark.anyio
async def test_sklearn_takes_what_create_model_returned_and_says_what_it_expects() -> None:
    pytest.importorskip("sklearn")
    async with snakepool.Pool("sklearn", size=1) as pool, pool.session() as s:
        model = await s.call("create_model", {"estimator": "LinearRegression"})
        assert isinstance(model, dict)
        fitted = await s.call("fit", {"model_id": model, "X": [[0.0], [1.0]], "y": [1.0, 3.0]})
        assert fitted["model_id"] == model["model_id"]
        assert await s.call("predict", {"model_id": model, "X": [[2.0]]}) == pytest.approx([5.0])
        with pytest.raises(
            TypeError, match=r"model_id must be the id create_model returned.*int 7"
        ):
            await s.call("predict", {"model_id": 7, "X": [[2.0]]})
        with pytest.raises(TypeError, match=r"model_id must be .*got dict \{'estimator'"):
            await s.call("get_params", {"model_id": {"estimator": "Ridge"}})
        with pytest.raises(TypeError, match=r"estimator must be a name such as 'Ridge'.*got dict"):
            await s.call("create_model", {"estimator": model})
        assert await s.call("delete_model", {"model_id": model}) is True
        assert await s.call("list_models") == []


@pytest.mark.anyio
async def test_the_conformance_kits_own_kill_reads_as_planned(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="snakepool")
    report = await check_adapter(
        "sp_adapters:Stateful",
        pythonpath=[str(TESTS_DIR)],
        session_example=SessionExample(
            "remember",
            {"key": "k", "value": 1},
            "recall",
            {"key": "k"},
            project=lambda answer: answer["value"],
        ),
    )
    report.raise_for_failures()
    exits = [r.getMessage() for r in caplog.records if " exited: " in r.getMessage()]
    assert len(exits) == 1, exits
    assert "on purpose" in exits[0] and "session-restore" in exits[0], exits
    assert "crashed" not in exits[0], exits


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in list(os.environ):
        if var.startswith("SNAKEPOOL_"):
            monkeypatch.delenv(var)


@pytest.mark.usefixtures("clean_env")
def test_a_misspelt_environment_override_is_refused(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    pools = {"my-pool": {"adapter": "generic", "size": 2}, "other": {"adapter": "generic"}}

    monkeypatch.setenv("SNAKEPOOL_MY_POOL_SIZ", "3")  # an unknown knob
    with pytest.raises(
        ConfigError, match=r"SNAKEPOOL_MY_POOL_SIZ.*unknown knob 'SIZ' \(did you mean 'SIZE'\?\)"
    ) as info:
        Supervisor(pools)
    assert (info.value.variable, info.value.pool) == ("SNAKEPOOL_MY_POOL_SIZ", "my-pool")
    monkeypatch.delenv("SNAKEPOOL_MY_POOL_SIZ")

    monkeypatch.setenv("SNAKEPOOL_MY_POOL_NAME", "x")  # the one option the env cannot set
    with pytest.raises(ConfigError, match=r"'name' cannot be set from the environment"):
        Supervisor(pools)
    monkeypatch.delenv("SNAKEPOOL_MY_POOL_NAME")

    monkeypatch.setenv("SNAKEPOOL_MYPOOL_SIZE", "3")  # a pool that does not exist, nearly
    with pytest.raises(
        ConfigError, match=r"SNAKEPOOL_MYPOOL_SIZE.*did you mean SNAKEPOOL_MY_POOL_SIZE"
    ) as info:
        Supervisor(pools)
    assert info.value.variable == "SNAKEPOOL_MYPOOL_SIZE"
    monkeypatch.delenv("SNAKEPOOL_MYPOOL_SIZE")

    # Another config's pool (nothing like these): ignored, and said so.
    monkeypatch.setenv("SNAKEPOOL_BILLING_WORKER_CONCURRENCY", "4")
    # Overrides that apply, and snakepool's other variables, pass.
    monkeypatch.setenv("SNAKEPOOL_MY_POOL_SIZE", "3")
    monkeypatch.setenv("SNAKEPOOL_OTHER_CALL_TIMEOUT", "2.5")
    monkeypatch.setenv("SNAKEPOOL_SOCKET", "/tmp/snakepool-test.sock")
    monkeypatch.setenv("SNAKEPOOL_RUNTIME_DIR", "/tmp")
    with caplog.at_level(logging.WARNING, logger="snakepool.supervisor"):
        sup = Supervisor(pools)
    assert sup["my-pool"].config.size == 3 and sup["other"].config.call_timeout == 2.5
    warned = [r.getMessage() for r in caplog.records if r.name == "snakepool.supervisor"]
    assert len(warned) == 1 and "SNAKEPOOL_BILLING_WORKER_CONCURRENCY is ignored" in warned[0]


@pytest.mark.anyio
async def test_a_failing_adapter_import_is_reported_once(caplog: pytest.LogCaptureFixture) -> None:
    """Not once per line per worker per attempt: the start's error carries the output."""
    caplog.set_level(logging.DEBUG, logger="snakepool")
    pool = snakepool.Pool("sp_no_such_module_anywhere:Adapter", size=2)
    try:
        with pytest.raises(snakepool.WorkerStartError) as failed:
            await pool.start()
    finally:
        await pool.aclose()
    assert "sp_no_such_module_anywhere" in str(failed.value)
    worker_lines = [
        r
        for r in caplog.records
        if r.name.startswith("snakepool.worker") and r.levelno >= logging.INFO
    ]
    assert worker_lines == []
    assert not [
        r for r in caplog.records if r.levelno >= logging.WARNING and "exited" in r.getMessage()
    ]
