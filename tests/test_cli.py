"""The snakepool command, run as a real subprocess: up, call, status, doctor, new-adapter."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

SNAKEPOOL = [sys.executable, "-m", "snakepool.cli"]


def run(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*SNAKEPOOL, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        stdin=subprocess.DEVNULL,
    )


def test_up_call_status_and_a_clean_stop(workdir: Path, env: dict[str, str]) -> None:
    config = workdir / "pools.toml"
    config.write_text(
        textwrap.dedent("""\
            [pools.fast]
            adapter = "generic"
            size = 2

            [pools.state]
            adapter = "sp_adapters:Stateful"
            size = 1
            """)
    )
    sock = workdir / "s.sock"
    up = subprocess.Popen(
        [*SNAKEPOOL, "up", "--config", str(config), "--socket", str(sock)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    try:
        deadline = time.monotonic() + 60
        while not sock.exists():
            assert up.poll() is None, up.stdout.read() if up.stdout else ""
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.05)
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600

        done = run(
            "call", "--socket", str(sock), "fast", "echo", '{"value": {"a": [1, 2]}}', env=env
        )
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == {"a": [1, 2]}

        streamed = run(
            "call", "--socket", str(sock), "--stream", "fast", "count", '{"n": 3}', env=env
        )
        assert streamed.stdout.split() == ["0", "1", "2"]
        unstreamed = run("call", "--socket", str(sock), "fast", "count", '{"n": 3}', env=env)
        assert unstreamed.returncode == 1
        assert unstreamed.stderr.splitlines()[-1] == (
            "snakepool call: call a stream command with --stream, a plain one without"
        )

        failed = run("call", "--socket", str(sock), "fast", "echo", '{"nope": 1}', env=env)
        assert failed.returncode != 0
        assert failed.stderr.startswith("TypeError: command 'echo'")

        bad_json = run("call", "--socket", str(sock), "fast", "echo", "{not json", env=env)
        assert bad_json.returncode == 2
        assert "not valid JSON" in bad_json.stderr

        status = run("status", "--socket", str(sock), "--json", env=env)
        assert status.returncode == 0, status.stderr
        shown = json.loads(status.stdout)
        assert set(shown["pools"]) == {"fast", "state"}
        [own] = shown["server"]["connections"]  # (this status command's own connection)
        assert own["calls"] == 2 and own["in_flight"] == 1 and own["peer"] == "unix"
        table = run("status", "--socket", str(sock), env=env)
        assert "fast" in table.stdout and "READY" in table.stdout

        up.send_signal(signal.SIGTERM)
        assert up.wait(timeout=60) == 0
        assert not sock.exists()
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()


def test_call_without_a_server_says_how_to_start_one(workdir: Path, env: dict[str, str]) -> None:
    done = run("call", "--socket", str(workdir / "none.sock"), "general", "ping", env=env)
    assert done.returncode == 1
    assert "snakepool up" in done.stderr


def test_up_refuses_a_bad_config_before_starting_anything(
    workdir: Path, env: dict[str, str]
) -> None:
    config = workdir / "bad.toml"
    config.write_text('[pools.general]\nadapter = "generic"\nsise = 2\n')
    done = run("up", "--config", str(config), "--socket", str(workdir / "s.sock"), env=env)
    assert done.returncode == 2
    assert "sise" in done.stderr
    assert "bad.toml:3:" in done.stderr  # file:line


def test_up_refuses_a_remote_tcp_address_without_allow_remote(
    workdir: Path, env: dict[str, str]
) -> None:
    done = run("up", "--socket", str(workdir / "s.sock"), "--tcp", "0.0.0.0:0", env=env)
    assert done.returncode == 2
    assert "--allow-remote" in done.stderr


def test_new_adapter_scaffold_runs(workdir: Path, env: dict[str, str]) -> None:
    done = run("new-adapter", "greeter", "--directory", str(workdir), env=env)
    assert done.returncode == 0, done.stderr
    root = workdir / "greeter"
    assert (root / "pyproject.toml").exists()
    assert (root / "tests" / "test_adapter.py").exists()
    again = run("new-adapter", "greeter", "--directory", str(workdir), env=env)
    assert again.returncode == 1
    assert "already exists" in again.stderr
    script = textwrap.dedent("""\
        import anyio, snakepool
        async def main():
            async with snakepool.Pool("greeter.adapter:GreeterAdapter", size=1, adapter_config={"greeting": "hi"}) as pool:
                print(await pool.call("greet", {"name": "Ada"}))
        anyio.run(main)
        """)
    child_env = dict(env, PYTHONPATH=os.pathsep.join([str(root), env["PYTHONPATH"]]))
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=child_env
    )
    assert out.stdout.strip() == "hi, Ada", out.stderr
    bad = run("new-adapter", "Not-Valid", "--directory", str(workdir), env=env)
    assert bad.returncode == 2


def test_doctor_reports_the_machine(workdir: Path, env: dict[str, str]) -> None:
    done = run("doctor", "--socket", str(workdir / "none.sock"), env=env, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "adapter     generic: worker pid" in done.stdout
    assert "no server running" in done.stdout


def test_the_token_file_is_private_whole_and_replaces_a_loose_one(tmp_path: Path) -> None:
    from snakepool.cli import _write_private

    token = tmp_path / "token"
    token.write_text("an old token from an earlier run, longer than the new one")
    token.chmod(0o644)
    _write_private(token, "fresh")
    assert token.read_text() == "fresh"
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["token"]
