"""The worker template (fork server): real template processes forking real workers."""

from __future__ import annotations

import collections
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import psutil
import pytest

from snakepool import protocol as p
from snakepool.pool._template import (
    ForkedProcess,
    TemplateStartError,
    TemplateUnavailable,
    WorkerTemplate,
)
from waiting import gone, wait_until

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(
        not sys.platform.startswith("linux"), reason="the fork server is Linux-only"
    ),
]

TESTS_DIR = str(Path(__file__).resolve().parent)


async def start_template(
    preload: list[str] | None = None, sys_path: list[str] | None = None
) -> WorkerTemplate:
    return await WorkerTemplate.start(
        python=sys.executable,
        env=dict(os.environ),
        cwd=None,
        preload=preload or [],
        sys_path=[TESTS_DIR, *(sys_path or [])],
        timeout=60,
    )


@pytest.fixture
async def template() -> AsyncIterator[WorkerTemplate]:
    template = await start_template()
    try:
        yield template
    finally:
        await template.aclose()


def worker_env(worker_id: int, **extra: str) -> dict[str, str]:
    return {**os.environ, "SNAKEPOOL_WORKER_ID": str(worker_id), **extra}


class Driver:
    """One forked worker, driven over its pipes with the real protocol."""

    def __init__(self) -> None:
        self.stdin_r, self.stdin_w = os.pipe()
        self.stdout_r, self.stdout_w = os.pipe()
        os.set_blocking(self.stdout_r, False)
        self.conn = p.Connection(p.Role.HOST)
        self.process: ForkedProcess | None = None
        self._ids = iter(range(1, 1_000_000))
        self._inbox: collections.deque[p.Message] = collections.deque()

    async def spawn(self, template: WorkerTemplate, env: dict[str, str]) -> ForkedProcess:
        try:
            # stderr: the test's own fd 2 (pytest shows it when a test fails)
            self.process = await template.spawn(env, self.stdin_r, self.stdout_w, 2)
        finally:
            os.close(self.stdin_r)
            os.close(self.stdout_w)
        return self.process

    async def start(
        self,
        template: WorkerTemplate,
        env: dict[str, str],
        adapter: str = "sp_adapters:Basic",
        config: dict[str, Any] | None = None,
    ) -> p.Hello:
        await self.spawn(template, env)
        self.send(
            p.Init(
                version=p.PROTOCOL_VERSION,
                worker_id=int(env.get("SNAKEPOOL_WORKER_ID", "0")),
                pool="template-test",
                adapter=adapter,
                config=config or {},
                sys_path=[TESTS_DIR],
            )
        )
        hello = await self.receive()
        assert isinstance(hello, p.Hello), hello
        return hello

    def send(self, message: p.Message) -> None:
        os.write(self.stdin_w, self.conn.send(message))

    async def receive(self) -> p.Message:
        with anyio.fail_after(30):
            while True:
                while self._inbox:
                    message = self._inbox.popleft()
                    if not isinstance(message, p.Log):
                        return message
                await anyio.wait_readable(self.stdout_r)
                try:
                    data = os.read(self.stdout_r, 65536)
                except BlockingIOError:
                    continue
                self._inbox.extend(self.conn.receive_data(data))
                if not data:
                    raise EOFError("the worker closed its stdout")

    async def call(self, command: str, **args: Any) -> Any:
        self.send(p.Call(id=next(self._ids), command=command, args=args))
        reply = await self.receive()
        assert isinstance(reply, p.Result), reply
        return reply.value

    def close_stdin(self) -> None:
        if self.stdin_w >= 0:
            os.close(self.stdin_w)
            self.stdin_w = -1

    def close(self) -> None:
        self.close_stdin()
        if self.stdout_r >= 0:
            os.close(self.stdout_r)
            self.stdout_r = -1

    async def wait(self, timeout: float = 10.0) -> int:
        assert self.process is not None
        with anyio.fail_after(timeout):
            return await self.process.wait()


def channels(pid: int) -> set[str]:
    """The sockets and pipes a process holds open (as ``socket:[inode]``)."""
    found = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith(("socket:", "pipe:")):
            found.add(target)
    return found


GENERIC_OS = {"adapter": "generic", "config": {"allow": ["os", "random"]}}


# --- spawning and driving a worker --------------------------------------------------------


async def test_forked_worker_speaks_the_protocol(template: WorkerTemplate) -> None:
    driver = Driver()
    try:
        hello = await driver.start(template, worker_env(3, SP_TEST_MARK="mark-3"), **GENERIC_OS)
        assert driver.process is not None
        assert hello.pid == driver.process.pid
        assert hello.worker_id == 3
        assert await driver.call("echo", value={"a": [1, 2]}) == {"a": [1, 2]}
        assert driver.process.returncode is None
        driver.close_stdin()
        assert await driver.wait() == 0
        assert driver.process.returncode == 0
    finally:
        driver.close()


async def test_worker_gets_its_own_env_group_and_parent(template: WorkerTemplate) -> None:
    driver = Driver()
    try:
        await driver.start(template, worker_env(5, SP_TEST_MARK="mark-5"), **GENERIC_OS)
        assert driver.process is not None
        pid = driver.process.pid

        async def call_os(name: str, *args: Any) -> Any:
            return await driver.call("call", target=f"os:{name}", args=list(args))

        assert await call_os("getenv", "SNAKEPOOL_WORKER_ID") == "5"
        assert await call_os("getenv", "SP_TEST_MARK") == "mark-5"
        assert await call_os("getenv", "SNAKEPOOL_HOST_PID") == str(template.pid)
        assert await call_os("getpgrp") == pid  # its own process group: killpg reaches it
        assert await call_os("getsid", 0) == pid
        assert await call_os("getppid") == template.pid
        assert os.getpgid(template.pid) != pid
        # It holds none of the template's sockets or pipes (control socket,
        # SIGCHLD wakeup pipe, the template's stderr).
        shared = channels(template.pid) & channels(pid)
        assert not shared
    finally:
        driver.close()


async def test_workers_do_not_share_random_state(template: WorkerTemplate) -> None:
    drivers = [Driver(), Driver()]
    try:
        draws = []
        for i, driver in enumerate(drivers):
            await driver.start(template, worker_env(i), **GENERIC_OS)
            draws.append(await driver.call("call", target="random:random", args=[]))
        assert draws[0] != draws[1]
    finally:
        for driver in drivers:
            driver.close()


async def test_preloaded_module_is_inherited(tmp_path: Path) -> None:
    (tmp_path / "sp_preloaded.py").write_text(
        "import os\nIMPORTED_IN = os.getpid()\n\ndef imported_in():\n    return IMPORTED_IN\n"
    )
    template = await start_template(preload=["sp_preloaded"], sys_path=[str(tmp_path)])
    driver = Driver()
    try:
        assert template.modules == ["sp_preloaded"]
        assert template.import_seconds >= 0
        await driver.start(
            template, worker_env(0), adapter="generic", config={"allow": ["sp_preloaded"]}
        )
        # Imported once, in the template: the worker did not import it again.
        assert await driver.call("call", target="sp_preloaded:imported_in") == template.pid
    finally:
        driver.close()
        await template.aclose()


async def test_sixteen_concurrent_spawns(template: WorkerTemplate) -> None:
    drivers = [Driver() for _ in range(16)]
    pids: dict[int, int] = {}

    async def run_one(i: int) -> None:
        hello = await drivers[i].start(template, worker_env(i))
        assert hello.worker_id == i
        assert await drivers[i].call("echo", value=i) == i
        pids[i] = hello.pid

    try:
        async with anyio.create_task_group() as tg:
            for i in range(16):
                tg.start_soon(run_one, i)
        assert len(set(pids.values())) == 16
        for driver in drivers:
            driver.close_stdin()
        assert [await driver.wait() for driver in drivers] == [0] * 16
    finally:
        for driver in drivers:
            driver.close()


# --- exit codes -------------------------------------------------------------------------------


@pytest.mark.parametrize(("how", "code"), [("exit_code", 7), ("sigkill", -signal.SIGKILL)])
async def test_crash_exit_codes(template: WorkerTemplate, how: str, code: int) -> None:
    driver = Driver()
    try:
        await driver.start(template, worker_env(0))
        driver.send(p.Call(id=99, command="fail", args={"how": how}))
        assert await driver.wait() == code
    finally:
        driver.close()


async def test_kill_from_the_host(template: WorkerTemplate) -> None:
    driver = Driver()
    try:
        await driver.start(template, worker_env(0))
        assert driver.process is not None
        driver.process.kill()
        assert await driver.wait() == -signal.SIGKILL
        driver.process.kill()  # after the exit: a no-op
        await driver.process.aclose()
    finally:
        driver.close()


# --- refusing to start ------------------------------------------------------------------------


async def test_preload_that_starts_a_thread_is_refused(tmp_path: Path) -> None:
    (tmp_path / "sp_threaded.py").write_text(
        textwrap.dedent(
            """
            import threading, time
            threading.Thread(target=time.sleep, args=(3600,), name="sneaky-thread", daemon=True).start()
            """
        )
    )
    with pytest.raises(TemplateUnavailable) as info:
        await start_template(preload=["json", "sp_threaded"], sys_path=[str(tmp_path)])
    assert "sp_threaded" in str(info.value)
    assert "sneaky-thread" in str(info.value)


async def test_preload_that_starts_a_native_thread_is_refused(tmp_path: Path) -> None:
    # _thread threads are invisible to threading.enumerate(), like a C
    # extension's: /proc/self/task still counts them.
    (tmp_path / "sp_native_thread.py").write_text(
        "import _thread, time\n_thread.start_new_thread(time.sleep, (3600,))\n"
    )
    with pytest.raises(TemplateUnavailable, match=r"sp_native_thread.*1 native thread"):
        await start_template(preload=["sp_native_thread"], sys_path=[str(tmp_path)])


async def test_slow_preload_times_out(tmp_path: Path) -> None:
    # The message names the module only once the template said it is importing
    # it: 5 s leaves a loaded machine time to get that far (the import never ends).
    (tmp_path / "sp_slow_preload.py").write_text("import time\ntime.sleep(3600)\n")
    with pytest.raises(TemplateUnavailable, match=r"within 5s \(importing sp_slow_preload\)"):
        await WorkerTemplate.start(
            python=sys.executable,
            env=dict(os.environ),
            cwd=None,
            preload=["sp_slow_preload"],
            sys_path=[str(tmp_path)],
            timeout=5,
        )


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("raise ValueError('boom-at-import')", "ValueError: boom-at-import"),
        ("import sp_no_such_module_anywhere", "No module named 'sp_no_such_module_anywhere'"),
    ],
)
async def test_preload_import_error(tmp_path: Path, source: str, expected: str) -> None:
    (tmp_path / "sp_broken_preload.py").write_text(source + "\n")
    with pytest.raises(TemplateStartError) as info:
        await start_template(preload=["sp_broken_preload"], sys_path=[str(tmp_path)])
    assert "sp_broken_preload" in str(info.value)
    assert expected in str(info.value)
    assert info.value.module == "sp_broken_preload"
    assert "Traceback" in info.value.traceback


async def test_missing_preload_module() -> None:
    with pytest.raises(TemplateStartError, match="sp_not_a_module_at_all"):
        await start_template(preload=["sp_not_a_module_at_all"])


async def test_preload_that_kills_the_template(tmp_path: Path) -> None:
    (tmp_path / "sp_fatal.py").write_text(
        "import os, sys\nsys.stderr.write('last words\\n')\nsys.stderr.flush()\nos._exit(5)\n"
    )
    with pytest.raises(TemplateStartError, match=r"sp_fatal.*exit code 5") as info:
        await start_template(preload=["sp_fatal"], sys_path=[str(tmp_path)])
    assert "last words" in str(info.value)  # its stderr's tail


async def test_template_stderr_is_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "sp_chatty.py").write_text("import sys\nprint('chatty-import', file=sys.stderr)\n")
    caplog.set_level(logging.WARNING, logger="snakepool.template")
    template = await start_template(preload=["sp_chatty"], sys_path=[str(tmp_path)])
    try:
        with anyio.fail_after(10):
            while not any("chatty-import" in r.getMessage() for r in caplog.records):
                await anyio.sleep(0.01)
    finally:
        await template.aclose()


async def test_bad_interpreter_is_unavailable() -> None:
    with pytest.raises(TemplateUnavailable, match="cannot start"):
        await WorkerTemplate.start(
            python="/nonexistent/python3",
            env=dict(os.environ),
            cwd=None,
            preload=[],
            sys_path=[],
            timeout=10,
        )


# --- the end ----------------------------------------------------------------------------------


async def test_template_killed_takes_its_workers() -> None:
    template = await start_template()
    drivers = [Driver(), Driver()]
    try:
        for i, driver in enumerate(drivers):
            await driver.start(template, worker_env(i))
        pids = [d.process.pid for d in drivers if d.process is not None]
        os.kill(template.pid, signal.SIGKILL)
        assert [await driver.wait() for driver in drivers] == [-signal.SIGKILL] * 2
        await wait_until(lambda: all(map(gone, pids)), 5.0)
        assert not template.alive
        with pytest.raises(TemplateUnavailable, match="gone"):
            await template.spawn(worker_env(9), 0, 1, 2)
    finally:
        for driver in drivers:
            driver.close()
        await template.aclose()


HOST_SCRIPT = """
import json, os, sys, anyio
sys.path.insert(0, {tests!r})
from test_template import Driver, start_template, worker_env

async def main():
    template = await start_template()
    driver = Driver()
    await driver.start(template, worker_env(0))
    print(json.dumps([template.pid, driver.process.pid]), flush=True)
    await anyio.sleep(3600)

anyio.run(main)
"""


async def test_host_killed_takes_template_and_workers(tmp_path: Path) -> None:
    script = tmp_path / "host.py"
    script.write_text(HOST_SCRIPT.format(tests=TESTS_DIR))
    async with await anyio.open_process([sys.executable, str(script)]) as host:
        assert host.stdout is not None
        with anyio.fail_after(30):
            line = b""
            while not line.endswith(b"\n"):
                line += await host.stdout.receive()
        pids = json.loads(line)
        assert all(psutil.pid_exists(pid) for pid in pids)
        host.kill()  # SIGKILL: no clean-up code runs in the host
        await host.wait()
    await wait_until(lambda: all(map(gone, pids)), 5.0)


async def test_aclose_stops_everything() -> None:
    template = await start_template()
    drivers = [Driver() for _ in range(3)]
    try:
        for i, driver in enumerate(drivers):
            await driver.start(template, worker_env(i))
        pids = [template.pid, *(d.process.pid for d in drivers if d.process is not None)]
        with anyio.fail_after(10):
            await template.aclose()
        assert not template.alive
        assert [await driver.wait() for driver in drivers] == [-signal.SIGKILL] * 3
        await wait_until(lambda: all(map(gone, pids)), 5.0)
        await template.aclose()  # idempotent
        with pytest.raises(TemplateUnavailable):
            await template.spawn(worker_env(9), 0, 1, 2)
    finally:
        for driver in drivers:
            driver.close()


async def test_template_outlives_the_scope_that_started_it() -> None:
    with anyio.CancelScope() as scope:
        template = await start_template()
        scope.cancel()
        await anyio.sleep(1)  # cancelled at once
    driver = Driver()
    try:
        assert template.alive
        await driver.start(template, worker_env(0))
        assert await driver.call("echo", value=1) == 1
    finally:
        driver.close()
        await template.aclose()


def test_warm_start_benchmark_runs() -> None:
    script = Path(TESTS_DIR).parent / "stress" / "warm_start.py"
    done = subprocess.run(
        [sys.executable, str(script), "-n", "1", "--cases", "generic"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "fork from template" in done.stdout


async def test_no_fd_leaks_in_the_host() -> None:
    async def cycle() -> None:
        template = await start_template()
        driver = Driver()
        try:
            await driver.start(template, worker_env(0))
        finally:
            driver.close()
            await template.aclose()

    await cycle()  # the event loop's own lazily opened fds
    before = sorted(os.listdir("/proc/self/fd"))
    for _ in range(3):
        await cycle()
    assert sorted(os.listdir("/proc/self/fd")) == before


async def test_concurrent_aclose_calls() -> None:
    template = await start_template()
    async with anyio.create_task_group() as tg:
        for _ in range(3):
            tg.start_soon(template.aclose)
    assert not template.alive


async def test_cancelled_spawn_leaves_no_worker(template: WorkerTemplate) -> None:
    for _ in range(5):
        driver = Driver()
        try:
            with anyio.CancelScope() as scope:
                scope.cancel()  # cancelled before the reply can arrive
                await driver.spawn(template, worker_env(0))
            assert driver.process is None
        finally:
            driver.close()
    # Whatever got forked was killed on arrival; the fixture's aclose and the
    # leftover-process check confirm nothing survives.
    still_works = Driver()
    try:
        await still_works.start(template, worker_env(1))
    finally:
        still_works.close()


async def test_other_backends_are_refused() -> None:
    pytest.importorskip("trio")

    def run_on_trio() -> None:
        anyio.run(start_template, backend="trio")

    with pytest.raises(TemplateUnavailable, match="asyncio"):
        await anyio.to_thread.run_sync(run_on_trio)
