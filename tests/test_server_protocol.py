"""The client protocol as docs/protocol.md tells it: its worked example, run
against a real ``snakepool up``; the failure kinds a client switches on; the
session operations' arguments and results; per-connection statistics."""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

import snakepool
from server_wire import Raw, frame, snakepool_up
from snakepool.errors import KINDS, RemoteError
from snakepool.protocol import PROTOCOL_VERSION, Call, Connection, Init, Role
from snakepool.server import SocketServer
from snakepool.server._wire import SERVER_KINDS, error_to_wire
from waiting import wait_until

pytestmark = pytest.mark.anyio

PROTOCOL_MD = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"
ADAPTER = "sp_server_adapters:Served"


def _between(marker: str) -> str:
    text = PROTOCOL_MD.read_text()
    return text.split(f"<!-- {marker}: begin -->")[1].split(f"<!-- {marker}: end -->")[0]


def _worked_example() -> list[tuple[str, dict[str, Any]]]:
    """The documented exchange: (direction, map) per line."""
    lines = [
        line for line in _between("worked-example").splitlines() if line.startswith(("→", "←"))
    ]
    assert len(lines) > 20, "the worked example is missing from docs/protocol.md"
    return [(line[0], json.loads(line[1:])) for line in lines]


def test_the_documented_bytes_are_the_first_call() -> None:
    tokens = _between("worked-example-bytes").split()
    shown = bytes(int(t, 16) for t in tokens if re.fullmatch("[0-9a-f]{2}", t))
    first_call = next(m for d, m in _worked_example() if d == "→" and m["t"] == "call")
    assert shown == frame(first_call)
    assert f"these {len(shown)} bytes" in PROTOCOL_MD.read_text()


def test_the_worker_protocol_example_is_what_the_package_sends() -> None:
    text = PROTOCOL_MD.read_text()
    host = Connection(Role.HOST)
    host.send(Init(version=PROTOCOL_VERSION, worker_id=0, pool="default", adapter="generic"))
    call = host.send(Call(id=1, command="echo", args={"value": b"hi"}))
    block = text.split('args={"value": b"hi"})`. The frame is')[1].split("```")[1]
    shown = bytearray()
    for line in block.splitlines():  # (the hex pairs before each line's comment)
        for token in line.split():
            if not re.fullmatch("[0-9a-f]{2}", token):
                break
            shown.append(int(token, 16))
    assert bytes(shown) == call


async def test_the_documented_example_runs_against_snakepool_up(
    workdir: Path, env: dict[str, str]
) -> None:
    config = '[pools.general]\nadapter = "generic"\nsize = 1\n'
    with snakepool_up(workdir, env, config) as up:
        sock = up.socket
        raw = await Raw.unix(sock)
        try:
            for number, (direction, message) in enumerate(_worked_example(), 1):
                if direction == "→":
                    await raw.send(message)
                else:
                    got = await raw.next(timeout=15, waiting_for=f"line {number}")
                    assert got == message, f"line {number} of the worked example"
        finally:
            await raw.aclose()


# --- kinds, arguments, results (one server in this process) -----------------------------------


@asynccontextmanager
async def serving(**options: Any) -> AsyncIterator[tuple[SocketServer, Path]]:
    directory = Path(tempfile.mkdtemp(prefix="sp-"))
    try:
        async with snakepool.Pool(ADAPTER, size=1, name="general") as pool:
            server = SocketServer({"general": pool}, socket_path=directory / "s.sock", **options)
            async with anyio.create_task_group() as tg:
                await tg.start(server.serve)
                yield server, directory / "s.sock"
                tg.cancel_scope.cancel()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_server_kinds_are_documented_and_apart_from_the_error_kinds() -> None:
    text = PROTOCOL_MD.read_text()
    for kind in [*SERVER_KINDS, *KINDS]:
        assert f"`{kind}`" in text, kind
    assert not set(SERVER_KINDS) & set(KINDS)


async def test_every_failure_carries_a_kind_to_switch_on() -> None:
    async with serving() as (_, sock):
        raw = await Raw.unix(sock)
        await raw.hello()
        call = {"t": "call", "p": "general"}
        session = {"t": "session", "p": "general", "s": "k-1"}
        requests: dict[int, tuple[dict[str, Any], str]] = {
            1: ({**call, "c": "echo", "a": {"x": 1}}, "bad_arguments"),
            2: ({**call, "c": "count_to", "a": {"n": 2}}, "wrong_mode"),
            3: ({**call, "c": "echo", "m": "stream"}, "wrong_mode"),
            4: ({**call, "c": "nope"}, "unknown_command"),
            5: ({**call, "p": "other", "c": "echo"}, "unknown_pool"),
            6: ({**call, "c": 7}, "bad_request"),
            7: ({**call, "c": "echo", "a": [1]}, "bad_request"),
            8: ({**call, "c": "echo", "o": -1}, "bad_request"),
            9: ({**call, "c": "echo", "m": "later"}, "bad_request"),
            10: ({**call, "c": "echo", "m": "cast", "o": 1}, "bad_request"),
            11: ({**call, "c": "echo", "s": "../x"}, "invalid_session_id"),
            12: ({**session, "op": "get", "a": {"name": "t"}}, "session_not_found"),
            13: ({**session, "op": "open", "a": {"tll": 5}}, "bad_request"),
            14: ({**session, "op": "open", "a": {"ttl": -5}}, "bad_request"),
            15: ({**session, "op": "destroy"}, "bad_request"),
            16: ({**call, "c": "echo", "a": {"value": 1}, "m": "stream", "w": 0}, "bad_request"),
            17: ({**call, "p": 5, "c": "echo"}, "bad_request"),  # (a name must be a string)
            18: ({**session, "s": "", "op": "open"}, "invalid_session_id"),  # (not a new id)
            19: ({**call, "c": "echo", "m": ""}, "bad_request"),
        }
        await raw.send(*({**message, "i": i} for i, (message, _) in requests.items()))
        answers = await raw.answers(len(requests))
        for i, (_, kind) in requests.items():
            assert answers[i]["t"] == "failure" and answers[i]["k"] == kind, (i, answers[i])
        assert answers[1]["y"] == "BadArguments" and answers[1]["rt"] == "TypeError"
        assert "got an unexpected keyword argument 'x'" in answers[1]["e"]
        assert "'c' (the command) must be a non-empty string" in answers[6]["e"]
        assert "it takes: ttl" in answers[13]["e"]
        assert "'p' (the pool's name) must be a string" in answers[17]["e"]
        # nil is an absent optional field; an infinite timeout is no limit.
        fine = {**call, "c": "echo", "a": {"value": 1}}
        await raw.send({**fine, "i": 20, "m": None, "o": None, "s": None, "w": None},
                       {**fine, "i": 21, "o": float("inf")})  # fmt: skip
        answers = await raw.answers(2)
        assert answers[20] == {"t": "result", "i": 20, "r": 1}, answers[20]
        assert answers[21] == {"t": "result", "i": 21, "r": 1}, answers[21]
        await raw.aclose()


@pytest.mark.parametrize("remote_type", ["KeyError", "ValueError", "LookupError"])
def test_a_remote_errors_message_has_one_shape_whatever_its_type(remote_type: str) -> None:
    """``e`` of a ``remote_error``: type, message and traceback, a KeyError's too
    (its ``str`` is otherwise the repr of its key)."""
    error = RemoteError(remote_type, "'missing'", "Traceback (most recent call last): ...\n")
    wire = error_to_wire(3, error)
    assert wire["e"] == (
        f"{remote_type}: 'missing'\n--- remote traceback ---\n"
        "Traceback (most recent call last): ..."
    )
    assert (wire["k"], wire["rt"], wire["rm"]) == ("remote_error", remote_type, "'missing'")
    # A KeyError of the server's own: its text, not the repr of it.
    assert error_to_wire(4, KeyError("no pool named 'x'"), "unknown_pool")["e"] == (
        "no pool named 'x'"
    )


async def test_the_python_client_raises_the_classes_of_those_kinds() -> None:
    async with serving() as (_, sock), snakepool.connect(sock) as client:
        general = client["general"]
        with pytest.raises(snakepool.BadArguments) as bad:
            await general.call("echo", {"x": 1})
        assert isinstance(bad.value, TypeError) and bad.value.kind == "bad_arguments"
        with pytest.raises(snakepool.WrongMode):
            await general.call("count_to", {"n": 2})
        with pytest.raises(snakepool.WrongMode):
            async for _ in general.stream("echo"):
                pass
        with pytest.raises(KeyError, match="no pool named 'other'"):
            await client["other"].call("echo")


async def test_session_operations_take_their_documented_arguments() -> None:
    async with serving() as (_, sock), snakepool.connect(sock) as client:
        general = client["general"]
        session = general.session("ops-1", ttl=60)
        assert (await session.open()).id == "ops-1"
        variables = session.variables
        await variables.define("t", "float", 0.5, {"min": 0.0, "max": 1.0})
        await variables.define("t", "float", 0.5, {"min": 0.0, "max": 1.0})  # (same: no-op)
        await variables.define("mode", "choice", "a", {"choices": ["a", "b"]})
        assert await variables.get("t") == 0.5
        assert await variables.get("undefined") is None  # get: nil, not a failure
        assert await variables.get("undefined", "fallback") == "fallback"
        await variables.set_many({"t": 0.25, "mode": "b"})
        assert await variables.get_many(["t", "mode", "undefined"]) == {"t": 0.25, "mode": "b"}
        with pytest.raises(KeyError, match="not defined"):
            await variables.set("undefined", 1)  # set: undefined_variable
        with pytest.raises(ValueError, match="above max"):
            await variables.set("t", 3.0)  # invalid_value; nothing changes
        with pytest.raises(ValueError, match="above max"):
            await variables.set_many({"mode": "a", "t": 3.0})  # all or nothing
        assert await variables.get_many(["t", "mode"]) == {"t": 0.25, "mode": "b"}
        assert await session.call("var", {"name": "mode"}) == "b"
        fresh = await general.session().open()
        assert fresh.id is not None and re.fullmatch(r"[0-9a-f]{32}", fresh.id)
        await session.close()
        await session.close()  # (again: nil)
        with pytest.raises(snakepool.SessionExpired):
            await variables.get("t")
        with pytest.raises(snakepool.SessionExpired, match="use a new id"):
            await general.session("ops-1").open()  # (a spent id stays spent)
        await general.session("never-opened").close()  # (nil: close never fails)


async def test_each_connection_has_its_statistics() -> None:
    async with serving(max_inflight_per_client=4) as (server, sock):
        async with snakepool.connect(sock) as first, snakepool.connect(sock) as second:
            await first["general"].call("echo", {"value": "x" * 1000})
            for _ in range(3):
                await second["general"].call("echo", {"value": 1})
            shown = await first.server_statistics()
            assert shown["clients"] == 2 and shown["accepted"] == 2
            one, two = shown["connections"]
            assert (one["id"], one["peer"], one["calls"], one["in_flight"]) == (1, "unix", 2, 1)
            assert one["bytes_in"] > 1000 and one["bytes_out"] > 1000
            assert two["calls"] == 3 and two["in_flight"] == 0 and two["bytes_in"] < 1000
            for row in (one, two):
                assert row["held"] == row["held_back"] == row["streams_paused"] == 0
                assert not row["reading_paused"] and not row["writing_paused"]
            assert [c.calls for c in server.statistics().connections] == [2, 3]
        await wait_until(lambda: server.statistics().clients == 0)
        assert server.statistics().connections == ()


async def test_status_has_the_documented_keys() -> None:
    statistics = _between("statistics")
    documented = set(re.findall(r"`([a-z_0-9]+)`", statistics))
    async with serving() as (_, sock), snakepool.connect(sock) as client:
        await client["general"].call("echo", {"value": 1})
        status = (await client.status())["general"]
        shown = await client.server_statistics()
    keys = {*status, *status["workers"][0], *shown, *shown["connections"][0]}
    assert keys <= documented, f"undocumented: {sorted(keys - documented)}"


def test_cast_acknowledgement_is_documented() -> None:
    text = " ".join(PROTOCOL_MD.read_text().split())
    assert "What the cast then does is never reported" in text
    assert "per-item inactivity timeout" in text


async def test_a_cast_is_answered_nil_and_its_failure_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with serving() as (_, sock), snakepool.connect(sock) as client:
        general = client["general"]
        assert await general.cast("nope") is None
        async with general.session("cast-1") as session:
            assert await session.cast("nope") is None
            await wait_until(lambda: "a cast of 'nope' failed" in caplog.text)
        with pytest.raises(snakepool.InvalidSessionId):
            await general.cast("echo", session="../x")
