"""``snakepool up`` as a new user meets it (issue 15): it drains on SIGINT/SIGTERM,
its live table never hides log lines, start-up failures are one line, and
``snakepool call`` reads bytes back in the form it prints them."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pty
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import termios
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import anyio
import msgpack
import pytest

import snakepool
from conftest import TESTS_DIR, wait_for
from snakepool.server import SocketServer
from waiting import wait_until

SNAKEPOOL = [sys.executable, "-m", "snakepool.cli"]
#: What clears a whole screen (and with it the log lines on it).
FULL_CLEARS = ("\x1b[2J", "\x1bc", "\x1b[H\x1b[J", "\x1b[H\x1b[0J", "\x1b[3J")


def write_config(workdir: Path, adapter: str = "sp_cli_adapters:Draining", size: int = 2) -> Path:
    config = workdir / "pools.toml"
    config.write_text(
        textwrap.dedent(f"""\
            [pools.fast]
            adapter = "{adapter}"
            size = {size}
            pythonpath = [{json.dumps(str(TESTS_DIR))}]
            """)
    )
    return config


def run(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*SNAKEPOOL, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        stdin=subprocess.DEVNULL,
    )


class Up:
    """A ``snakepool up`` subprocess whose output (stdout and stderr) goes to a
    file, or to a pseudo-terminal (``tty=True``) read by a thread."""

    def __init__(self, args: list[str], env: dict[str, str], out: Path, *, tty: bool) -> None:
        self.out = out
        self.tty = tty
        self._buffer = bytearray()
        self._master: int | None = None
        self._reader: threading.Thread | None = None
        if tty:
            master, slave = pty.openpty()
            fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
            self._master = master
            self.process = subprocess.Popen(
                [*SNAKEPOOL, "up", *args],
                stdin=subprocess.DEVNULL,
                stdout=slave,
                stderr=slave,
                env=env,
            )
            os.close(slave)
            self._reader = threading.Thread(target=self._read, daemon=True)
            self._reader.start()
        else:
            with out.open("wb") as sink:
                self.process = subprocess.Popen(
                    [*SNAKEPOOL, "up", *args],
                    stdin=subprocess.DEVNULL,
                    stdout=sink,
                    stderr=subprocess.STDOUT,
                    env=env,
                )

    def _read(self) -> None:
        assert self._master is not None
        while True:
            try:
                data = os.read(self._master, 65536)
            except OSError:  # EIO: every writer closed the terminal
                return
            if not data:
                return
            self._buffer += data

    def output(self) -> str:
        if self.tty:
            return bytes(self._buffer).decode("utf-8", "replace")
        return self.out.read_text(errors="replace")

    def wait_for_output(self, text: str, timeout: float = 60) -> None:
        def seen() -> bool:
            assert self.process.poll() is None or text in self.output(), self.output()
            return text in self.output()

        wait_for(seen, timeout=timeout)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=60)
        finally:
            self.close()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        if self._reader is not None:
            self._reader.join(timeout=10)
        if self._master is not None:
            os.close(self._master)
            self._master = None


@contextlib.contextmanager
def up(
    workdir: Path, env: dict[str, str], *extra: str, tty: bool = False
) -> Iterator[tuple[Up, Path]]:
    sock = workdir / "s.sock"
    config = write_config(workdir)
    server = Up(
        ["--config", str(config), "--socket", str(sock), *extra],
        env,
        workdir / "up.out",
        tty=tty,
    )
    try:
        server.wait_for_output("snakepool: serving")
        yield server, sock
    finally:
        server.close()


async def _call(sock: Path, command: str, args: dict[str, object]) -> object:
    async with snakepool.connect(sock) as client:
        return await client["fast"].call(command, args)


# --- 3. up drains on SIGTERM ------------------------------------------------------------------


def test_sigterm_drains_calls_and_streams_in_flight_then_exits_0(
    workdir: Path, env: dict[str, str]
) -> None:
    release = workdir / "release"
    call_started, stream_started = workdir / "call-started", workdir / "stream-started"
    with up(workdir, env) as (server, sock):
        call_args = {"release": str(release), "started": str(call_started)}
        stream_args = {"release": str(release), "started": str(stream_started), "n": 3}
        call = subprocess.Popen(
            [*SNAKEPOOL, "call", "--socket", str(sock), "fast", "hold_marked", json.dumps(call_args)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
            text=True, env=env,
        )  # fmt: skip
        stream = subprocess.Popen(
            [*SNAKEPOOL, "call", "--socket", str(sock), "--stream", "fast", "hold_stream",
             json.dumps(stream_args)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
            text=True, env=env,
        )  # fmt: skip
        try:
            wait_for(lambda: call_started.exists() and stream_started.exists(), timeout=60)
            server.process.send_signal(signal.SIGTERM)
            server.wait_for_output("draining")

            # A new call while draining: PoolClosed, as an answer on the wire.
            with pytest.raises(snakepool.PoolClosed, match="shutting down") as refused:
                anyio.run(_call, sock, "echo", {"value": 1})
            assert refused.value.category is snakepool.ErrorCategory.CLOSED
            assert server.process.poll() is None  # still draining: the calls hold

            release.touch()
            call_out, call_err = call.communicate(timeout=60)
            assert call.returncode == 0, call_err
            assert json.loads(call_out) == "released"
            stream_out, stream_err = stream.communicate(timeout=60)
            assert stream.returncode == 0, stream_err
            assert stream_out.split() == ["0", "1", "2"]

            assert server.process.wait(timeout=60) == 0, server.output()
            assert not sock.exists()
            assert "snakepool: stopped" in server.output()
        finally:
            release.touch()
            for process in (call, stream):
                if process.poll() is None:
                    process.kill()
                    process.communicate()


@pytest.mark.anyio
async def test_a_draining_server_refuses_new_requests_with_pool_closed(tmp_path: Path) -> None:
    directory = Path(tempfile.mkdtemp(prefix="spfu-"))
    sock, release = directory / "s.sock", tmp_path / "release"
    try:
        async with snakepool.Pool("sp_adapters:Basic", size=1, name="general") as pool:
            server = SocketServer({"general": pool}, socket_path=sock)
            async with anyio.create_task_group() as tg:
                await tg.start(server.serve)
                async with snakepool.connect(sock) as client:
                    general = client["general"]
                    answers: list[object] = []

                    async def hold() -> None:
                        answers.append(await general.call("hold", {"release": str(release)}))

                    tg.start_soon(hold)
                    await wait_until(lambda: pool.statistics().workers[0].inflight == 1)
                    assert server.requests_in_flight == 1
                    before = (await client.server_statistics())["connections"][0]
                    server.drain()
                    with pytest.raises(snakepool.PoolClosed, match="pool 'general' is closed"):
                        await general.call("echo", {"value": 1})
                    with pytest.raises(snakepool.PoolClosed):
                        await general.session().open()
                    with pytest.raises(KeyError, match="no pool named 'nope'"):  # (not "closed")
                        await client["nope"].call("echo", {"value": 1})
                    after = (await client.server_statistics())["connections"][0]
                    assert after["buffered_bytes"] == before["buffered_bytes"]  # (refusals: none)
                    assert (await client.status())["general"]["size"] == 1  # status still works
                    release.touch()
                    with anyio.fail_after(30):
                        await server.wait_idle()
                    await wait_until(lambda: answers)  # (sent; the client reads it next)
                    assert isinstance(answers[0], dict)
                tg.cancel_scope.cancel()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


# --- 6. the live table never hides log lines ---------------------------------------------------


def test_off_a_terminal_there_is_no_escape_sequence_and_log_lines_stay(
    workdir: Path, env: dict[str, str]
) -> None:
    with up(workdir, env) as (server, sock):
        assert anyio.run(_call, sock, "noisy", {"text": "marker-from-the-worker"}) == "quiet"
        server.wait_for_output("marker-from-the-worker")
        assert server.stop() == 0
    output = server.output()
    assert "\x1b" not in output
    assert "client(s) connected, 0 dropped, 0 connection error(s)" in output  # server counters


def screen(data: str) -> list[str]:
    """The lines a terminal shows (scrollback included) after ``data``: enough of
    a terminal for what ``snakepool up`` may write, whole-screen clears included."""
    lines, row, col, i = [""], 0, 0, 0
    while i < len(data):
        if data.startswith("\x1bc", i):
            lines, row, col, i = [""], 0, 0, i + 2
            continue
        match = re.match(r"\x1b\[(\d*)([A-Za-z])", data[i:])
        if match:
            n, code = int(match.group(1) or 0), match.group(2)
            if code in "FA":
                row, col = max(row - (n or 1), 0), 0 if code == "F" else col
            elif code == "H":  # (the top of the screen: here, of everything)
                row, col = 0, 0
            elif code == "J":
                if n == 0:
                    lines[row] = lines[row][:col]
                    del lines[row + 1 :]
                else:
                    lines = [""] * len(lines)
            elif code == "K":
                lines[row] = "" if n == 2 else lines[row][:col]
            i += match.end()
            continue
        char = data[i]
        if char == "\r":
            col = 0
        elif char == "\n":
            row, col = row + 1, 0
            if row == len(lines):
                lines.append("")
        else:
            line = lines[row].ljust(col)
            lines[row] = line[:col] + char + line[col + 1 :]
            col += 1
        i += 1
    return lines


def test_on_a_terminal_the_live_table_keeps_log_lines_above_it(
    workdir: Path, env: dict[str, str]
) -> None:
    with up(workdir, env, tty=True) as (server, sock):
        server.wait_for_output("READY")  # the live table is drawn
        assert anyio.run(_call, sock, "noisy", {"text": "first-marker"}) == "quiet"
        server.wait_for_output("first-marker")
        # The table is redrawn (the call changed it), and again after a second log line.
        mark = len(server.output())
        wait_for(lambda: "READY" in server.output()[mark:], timeout=30)
        assert anyio.run(_call, sock, "noisy", {"text": "second-marker"}) == "quiet"
        server.wait_for_output("second-marker")
        mark = len(server.output())
        wait_for(lambda: "READY" in server.output()[mark:], timeout=30)
        assert server.stop() == 0
    output = server.output()
    for clear in FULL_CLEARS:
        assert clear not in output, f"{clear!r} clears the log lines off the screen"
    shown = screen(output)
    for text in ("snakepool: serving", "first-marker", "second-marker", "snakepool: stopped"):
        assert any(text in line for line in shown), (text, shown)
    assert any("client(s) connected" in line for line in shown), shown  # server counters
    # The log lines scroll above the table; the last table stays at the bottom.
    second = max(n for n, line in enumerate(shown) if "second-marker" in line)
    assert any("READY" in line for line in shown[second:]), shown


def test_no_live_turns_the_table_off_on_a_terminal(workdir: Path, env: dict[str, str]) -> None:
    with up(workdir, env, "--no-live", tty=True) as (server, sock):
        assert anyio.run(_call, sock, "noisy", {"text": "quiet-marker"}) == "quiet"
        server.wait_for_output("quiet-marker")
        assert server.stop() == 0
    assert "\x1b" not in server.output()


# --- 9. start-up failures are one line -------------------------------------------------------


def assert_one_clear_line(done: subprocess.CompletedProcess[str], *names: str) -> None:
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert 1 <= len(lines) <= 3, done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    for name in names:
        assert name in done.stderr, done.stderr


def test_a_socket_another_server_holds_is_one_line(workdir: Path, env: dict[str, str]) -> None:
    sock = workdir / "taken.sock"
    with socket.socket(socket.AF_UNIX) as other:
        other.bind(str(sock))
        other.listen()
        done = run("up", "--config", str(write_config(workdir)), "--socket", str(sock), env=env)
    assert_one_clear_line(done, str(sock), "another server")


def test_a_tcp_port_in_use_is_one_line_naming_the_address(
    workdir: Path, env: dict[str, str]
) -> None:
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        done = run(
            "up", "--config", str(write_config(workdir)), "--socket", str(workdir / "s.sock"),
            "--tcp", f"127.0.0.1:{port}", env=env,
        )  # fmt: skip
    assert_one_clear_line(done, f"127.0.0.1:{port}", "in use")
    assert not (workdir / "s.sock").exists()


def test_a_misspelt_adapter_is_one_line_reported_once(workdir: Path, env: dict[str, str]) -> None:
    config = write_config(workdir, adapter="sp_adapters:Basc", size=2)
    done = run("up", "--config", str(config), "--socket", str(workdir / "s.sock"), env=env)
    assert_one_clear_line(done, "sp_adapters:Basc")
    assert done.stderr.count("failed to start") == 1  # once, not per worker per attempt
    assert not (workdir / "s.sock").exists()
    verbose = run("up", "-v", "--config", str(config), "--socket", str(workdir / "s.sock"), env=env)
    assert verbose.returncode == 1
    assert "Traceback" in verbose.stderr  # -v: everything


# --- 8. call reads bytes in the form it prints them ------------------------------------------


def test_call_reads_bytes_back_in_the_form_it_prints_them(
    workdir: Path, env: dict[str, str]
) -> None:
    with up(workdir, env) as (_, sock):
        sent = '{"value": {"$bytes": "AP9oaQ=="}}'  # b"\x00\xffhi"
        echoed = run("call", "--socket", str(sock), "fast", "echo", sent, env=env)
        assert echoed.returncode == 0, echoed.stderr
        assert json.loads(echoed.stdout) == {"$bytes": "AP9oaQ=="}
        # ... and it travelled as bytes: a command taking bytes gets them.
        digest = run(
            "call", "--socket", str(sock), "fast", "digest", '{"data": {"$bytes": "AP9oaQ=="}}',
            env=env,
        )  # fmt: skip
        assert digest.returncode == 0, digest.stderr
        assert json.loads(digest.stdout)["size"] == 4
        bad = run(
            "call", "--socket", str(sock), "fast", "echo", '{"value": {"$bytes": "no!"}}', env=env
        )
        assert bad.returncode == 2
        assert "base64" in bad.stderr
    helped = run("call", "--help", env=env)
    assert '{"$bytes": "BASE64"}' in helped.stdout


# --- up --hello-timeout --------------------------------------------------------------------


def test_up_hello_timeout_reaches_the_server(workdir: Path, env: dict[str, str]) -> None:
    with up(workdir, env, "--hello-timeout", "0.2") as (_, sock):
        with socket.socket(socket.AF_UNIX) as silent:
            silent.settimeout(30)
            silent.connect(str(sock))
            data = b""
            while chunk := silent.recv(65536):
                data += chunk
        (length,) = struct.unpack(">I", data[:4])
        frame = msgpack.unpackb(data[4 : 4 + length])
        assert frame == {"t": "error", "e": "no hello within 0.2s"}
    refused = run("up", "--socket", str(workdir / "x.sock"), "--hello-timeout", "0", env=env)
    assert refused.returncode == 2
    assert "hello_timeout" in refused.stderr
