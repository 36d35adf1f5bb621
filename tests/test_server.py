"""The socket server and its Python client, with real workers and hostile clients."""

from __future__ import annotations

import shutil
import stat
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

import snakepool
from server_wire import serving
from snakepool import RemoteError, UnknownCommand
from snakepool.server import SocketServer
from waiting import wait_until

pytestmark = pytest.mark.anyio

ADAPTER = "sp_adapters:Stateful"


@pytest.fixture
def socket_path() -> Iterator[Path]:
    # Unix socket paths must be short (108 bytes): pytest's tmp_path can be too long.
    directory = Path(tempfile.mkdtemp(prefix="sp-"))
    yield directory / "s.sock"
    shutil.rmtree(directory, ignore_errors=True)


async def test_client_has_the_pool_api(socket_path: Path) -> None:
    async with snakepool.Pool(ADAPTER, size=2, name="general") as pool:
        server = SocketServer({"general": pool}, socket_path=socket_path)
        async with anyio.create_task_group() as tg:
            await tg.start(server.serve)
            assert stat.S_IMODE(socket_path.stat().st_mode) == 0o600
            async with snakepool.connect(socket_path) as client:
                assert client.pools == ["general"]
                general = client["general"]
                assert (await general.call("whoami"))["session"] is None
                assert [i async for i in general.stream("count_to", {"n": 3})] == [0, 1, 2]
                await general.cast("whoami")
                with pytest.raises(UnknownCommand, match="nope"):
                    await general.call("nope")
                with pytest.raises(RemoteError, match="missing a required argument"):
                    await general.call("var")
                with pytest.raises(KeyError, match="no pool named 'other'"):
                    await client["other"].call("whoami")
                async with general.session() as session:
                    await session.variables.define("temperature", "float", 0.5, {"max": 1.0})
                    await session.variables.set("temperature", 0.8)
                    assert await session.call("var", {"name": "temperature"}) == 0.8
                    with pytest.raises(ValueError, match="above max"):
                        await session.variables.set("temperature", 5.0)
                    assert await session.variables.get("temperature") == 0.8
                status = await client.status()
                assert status["general"]["size"] == 2
                assert (
                    await general.call("echo", {"value": b"\x00\xff" * 1000}) == b"\x00\xff" * 1000
                )
            tg.cancel_scope.cancel()
    assert not socket_path.exists()


async def test_leaving_a_remote_stream_early_cancels_it(socket_path: Path) -> None:
    async with snakepool.Pool(ADAPTER, size=1, name="general") as pool:
        server = SocketServer({"general": pool}, socket_path=socket_path)
        async with anyio.create_task_group() as tg:
            await tg.start(server.serve)
            async with snakepool.connect(socket_path) as client:
                async for item in client["general"].stream("count_to", {"n": 1_000_000}):
                    if item == 10:
                        break
                await wait_until(lambda: pool.statistics().workers[0].inflight == 0)
                assert await client["general"].call("echo", {"value": 1}) == 1
            tg.cancel_scope.cancel()


async def test_cancelling_the_awaiting_task_cancels_the_call_on_the_server(
    socket_path: Path,
) -> None:
    """``task.cancel()``, ``asyncio.timeout`` or anyio's ``move_on_after`` around a
    call send a ``cancel``: the worker stops, the connection lets go of it."""
    never = socket_path.parent / "never-released"
    async with (
        snakepool.Pool(ADAPTER, size=1, name="general") as pool,
        serving(pool, socket_path=socket_path) as server,
        snakepool.connect(socket_path) as client,
    ):
        general = client["general"]
        for _ in range(2):
            with anyio.move_on_after(30) as scope:
                async with anyio.create_task_group() as calls:
                    calls.start_soon(general.call, "hold", {"release": str(never)})
                    await wait_until(lambda: pool.statistics().workers[0].inflight == 1)
                    scope.cancel()
            await wait_until(lambda: pool.statistics().workers[0].inflight == 0)
            await wait_until(lambda: server.statistics().connections[0].in_flight == 0)
        assert await general.call("echo", {"value": 1}) == 1


async def test_the_python_clients_errors_name_what_was_wrong(socket_path: Path) -> None:
    async with (
        snakepool.Pool(ADAPTER, size=1, name="general") as pool,
        serving(pool, socket_path=socket_path),
    ):
        client = snakepool.connect(socket_path)
        async with client:
            general = client["general"]
            # The server's own refusals carry their kind ``k`` too.
            with pytest.raises(KeyError) as unknown:
                await client["other"].call("echo")
            assert unknown.value.kind == "unknown_pool"  # type: ignore[attr-defined]
            async with general.session() as session:
                with pytest.raises(KeyError) as undefined:
                    await session.variables.set("nothing", 1)
                assert undefined.value.kind == "undefined_variable"  # type: ignore[attr-defined]
                with pytest.raises(TypeError, match="names must be a list of variable names"):
                    await session.variables.get_many("abc")  # type: ignore[arg-type]
            # Checked here, named as the caller wrote them (not as their wire fields).
            with pytest.raises(ValueError, match=r"^timeout must be a number > 0 or None, got 0$"):
                await general.call("echo", timeout=0)
            with pytest.raises(TypeError, match=r"args must be a mapping .* not list"):
                await general.call("echo", [1])  # type: ignore[arg-type]
            assert await general.call("echo", {"value": 2}) == 2
        # Closed by its owner, not by the server: it says so.
        with pytest.raises(ConnectionError, match="this client was closed"):
            await general.call("echo", {"value": 3})
        async with client:  # (and entered again, it connects again)
            assert await client["general"].call("echo", {"value": 4}) == 4


async def _raw(socket_path: Path) -> anyio.abc.SocketStream:
    return await anyio.connect_unix(socket_path)


def _frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


async def test_hostile_clients_are_dropped_alone(socket_path: Path) -> None:
    import msgpack

    async with snakepool.Pool(ADAPTER, size=2, name="general") as pool:
        server = SocketServer({"general": pool}, socket_path=socket_path, max_inflight_per_client=8)
        async with anyio.create_task_group() as tg:
            await tg.start(server.serve)
            async with snakepool.connect(socket_path) as good:
                # garbage
                garbage = await _raw(socket_path)
                await garbage.send(b"\x00\x00\x00\x05GARBAGE-NOT-MSGPACK")
                reply = await garbage.receive()
                assert b"error" in reply
                # a 4 GiB length prefix: refused from the header, nothing buffered
                huge = await _raw(socket_path)
                await huge.send(_frame(msgpack.packb({"t": "hello", "v": 1})))
                await huge.receive()
                await huge.send(b"\xff\xff\xff\xff" + b"x" * 1000)
                reply = await huge.receive()
                assert b"over max_frame_bytes" in reply
                # a flood beyond the in-flight limit: held back (in order), every call served
                flood = await _raw(socket_path)
                await flood.send(_frame(msgpack.packb({"t": "hello", "v": 1})))
                await flood.receive()
                burst = b"".join(
                    _frame(
                        msgpack.packb(
                            {"t": "call", "i": i, "p": "general", "c": "nap", "a": {"seconds": 0.2}}
                        )
                    )
                    for i in range(1, 41)
                )
                await flood.send(burst)
                unpacker = msgpack.Unpacker()
                answers: list[dict[str, object]] = []
                with anyio.fail_after(20):
                    buffer = b""
                    while len(answers) < 40:
                        buffer += await flood.receive()
                        while (
                            len(buffer) >= 4
                            and len(buffer) >= 4 + struct.unpack(">I", buffer[:4])[0]
                        ):
                            size = struct.unpack(">I", buffer[:4])[0]
                            answers.append(msgpack.unpackb(buffer[4 : 4 + size]))
                            buffer = buffer[4 + size :]
                assert sorted(a["i"] for a in answers if a["t"] == "result") == list(range(1, 41))
                [mine] = [c for c in server.statistics().connections if c.calls == 40]
                assert mine.held_back >= 40 - 8 and mine.held == 0
                del unpacker
                # a client that disconnects mid-call: its call is cancelled in the pool
                quitter = await _raw(socket_path)
                await quitter.send(_frame(msgpack.packb({"t": "hello", "v": 1})))
                await quitter.receive()
                await quitter.send(
                    _frame(
                        msgpack.packb(
                            {"t": "call", "i": 1, "p": "general", "c": "nap", "a": {"seconds": 30}}
                        )
                    )
                )
                await wait_until(lambda: sum(w.inflight for w in pool.statistics().workers) >= 1)
                await quitter.aclose()
                await wait_until(lambda: sum(w.inflight for w in pool.statistics().workers) == 0)
                for stream in (garbage, huge, flood):
                    await stream.aclose()
                # the well-behaved client and the pool never noticed
                assert (await good["general"].call("whoami"))["session"] is None
                assert pool.statistics().ready_workers == 2
            tg.cancel_scope.cancel()


async def test_tcp_needs_loopback_and_a_token(socket_path: Path) -> None:
    async with snakepool.Pool(ADAPTER, size=1, name="general") as pool:
        with pytest.raises(ValueError, match="not a loopback address"):
            SocketServer({"general": pool}, socket_path=None, tcp=("0.0.0.0", 0))
        server = SocketServer({"general": pool}, socket_path=None, tcp=("127.0.0.1", 0))
        async with anyio.create_task_group() as tg:
            await tg.start(server.serve)
            assert server.tcp_port
            with pytest.raises(ConnectionError, match="valid token"):
                async with snakepool.connect(
                    tcp=("127.0.0.1", server.tcp_port), token="wrong"
                ) as client:
                    await client["general"].call("whoami")
            async with snakepool.connect(
                tcp=("127.0.0.1", server.tcp_port), token=server.token
            ) as client:
                assert (await client["general"].call("whoami"))["session"] is None
            tg.cancel_scope.cancel()


async def test_the_socket_appears_private_and_leaves_no_staging(socket_path: Path) -> None:
    # The socket must be 0600 from the moment its name exists (the CLI's
    # clients poll for the name), and binding it leaves nothing else behind.
    from snakepool.server._server import _private_unix_listener

    listener = await _private_unix_listener(socket_path)
    try:
        assert stat.S_IMODE(socket_path.stat().st_mode) == 0o600
        assert stat.S_ISSOCK(socket_path.stat().st_mode)
        assert sorted(p.name for p in socket_path.parent.iterdir()) == ["s.sock"]
        with pytest.raises(OSError, match=r"another server is already listening on .*s\.sock"):
            await _private_unix_listener(socket_path)
        assert sorted(p.name for p in socket_path.parent.iterdir()) == ["s.sock"]
        async with await anyio.connect_unix(socket_path) as stream:
            async with await listener.accept() as accepted:  # type: ignore[attr-defined]
                await stream.send(b"ping")
                assert await accepted.receive() == b"ping"
    finally:
        await listener.aclose()


async def test_a_second_server_on_a_live_socket_is_refused(socket_path: Path) -> None:
    async with snakepool.Pool(ADAPTER, size=1, name="general") as pool:
        first = SocketServer({"general": pool}, socket_path=socket_path)
        async with anyio.create_task_group() as tg:
            await tg.start(first.serve)
            second = SocketServer({"general": pool}, socket_path=socket_path)
            with pytest.raises(OSError, match="another server is already listening"):
                await second.serve()
            async with snakepool.connect(socket_path) as client:
                assert (await client["general"].call("whoami"))["session"] is None
            tg.cancel_scope.cancel()
    assert not socket_path.exists()
