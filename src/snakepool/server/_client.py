"""``snakepool.connect()``: a Python client for the socket server, with the Pool API.

``async with snakepool.connect() as client: await client["general"].call("echo", {...})``
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import anyio
import anyio.abc
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from .._paths import default_socket_path, default_token_path
from ..errors import ProtocolError
from ..protocol import NEED_DATA, Sentinel
from ._wire import CLIENT_PROTOCOL_VERSION, error_from_wire, new_decoder, new_encoder

# (thin: this module imports no pool machinery, nor tenacity or psutil)
__all__ = [
    "Client",
    "RemotePool",
    "RemoteSession",
    "connect",
    "default_socket_path",
    "default_token_path",
]


def connect(
    path: str | os.PathLike[str] | None = None,
    *,
    tcp: tuple[str, int] | None = None,
    token: str | None = None,
) -> Client:
    """A client for a ``snakepool up`` server; use it with ``async with``."""
    return Client(path, tcp=tcp, token=token)


class Client:
    """One connection to a server; ``client[pool]`` gives a pool's API."""

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        tcp: tuple[str, int] | None = None,
        token: str | None = None,
    ) -> None:
        self.path = Path(path) if path is not None else (None if tcp else default_socket_path())
        self.tcp = tcp
        self.token = token
        self.pools: list[str] = []
        self._ids = itertools.count(1)
        self._encoder = new_encoder()
        self._decoder = new_decoder()
        self._replies: dict[int, MemoryObjectSendStream[dict[str, Any]]] = {}
        self._stream: anyio.abc.ByteStream | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._send_lock = anyio.Lock()
        self._broken: BaseException | None = None

    async def __aenter__(self) -> Self:
        try:
            if self.tcp is not None:
                self._stream = await anyio.connect_tcp(*self.tcp)
            else:
                assert self.path is not None
                self._stream = await anyio.connect_unix(self.path)
        except OSError as exc:
            where = f"{self.tcp[0]}:{self.tcp[1]}" if self.tcp else str(self.path)
            raise ConnectionError(
                f"no snakepool server at {where} ({exc}); start one with 'snakepool up'"
            ) from None
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        try:
            self._tg.start_soon(self._read_loop)
            hello: dict[str, Any] = {"t": "hello", "v": CLIENT_PROTOCOL_VERSION}
            token = self.token
            if self.tcp is not None and token is None and default_token_path().exists():
                token = default_token_path().read_text().strip()
            if token is not None:
                hello["k"] = token
            welcome = await self._exchange(0, hello)
        except BaseException:
            await self.aclose()  # (not under another scope: the group must exit in order)
            raise
        self.pools = list(welcome.get("pools", []))
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._stream is not None:
            await self._stream.aclose()
        if self._tg is not None:
            self._tg.cancel_scope.cancel()
            await self._tg.__aexit__(None, None, None)
            self._tg = None

    def __getitem__(self, pool: str) -> RemotePool:
        return RemotePool(self, pool)

    async def status(self) -> dict[str, Any]:
        """Every pool's statistics, as maps."""
        reply = await self._exchange(next(self._ids), {"t": "status"})
        result: dict[str, Any] = reply["r"]
        return result

    def logs(
        self, pool: str, worker: int | None = None, *, last: int = 100, follow: bool = False
    ) -> AsyncIterator[dict[str, Any]]:
        """The last lines of a pool's workers (or one worker), then, with
        ``follow``, each new one: maps with pool, worker, time, level, line, dropped."""
        message: dict[str, Any] = {"t": "logs", "p": pool, "n": last, "f": follow}
        if worker is not None:
            message["w"] = worker
        return self._items(message)

    def subscribe(
        self,
        names: list[str] | None = None,
        *,
        pools: list[str] | None = None,
        buffer: int = 1000,
    ) -> AsyncIterator[dict[str, Any]]:
        """Events as they happen (``names``: names or patterns such as ``worker.*``):
        maps with name, pool, worker, time, data, dropped. Leave the loop to stop."""
        message: dict[str, Any] = {"t": "subscribe", "b": buffer}
        if names is not None:
            message["e"] = names
        if pools is not None:
            message["p"] = pools
        return self._items(message)

    async def _items(self, message: dict[str, Any]) -> AsyncIterator[Any]:
        """Send a request answered by ``item`` frames (then ``end``); leaving the
        loop early cancels it on the server."""
        request_id = next(self._ids)
        replies = self._open_reply(request_id)
        message["i"] = request_id
        finished = False
        try:
            await self._send(message)
            async for reply in replies:
                if reply.get("t") == "item":
                    yield reply.get("r")
                    continue
                finished = True
                _unwrap(reply)
                return
            raise ConnectionError(str(self._broken or "the server closed the connection"))
        finally:
            self._replies.pop(request_id, None)
            replies.close()
            if not finished:
                await self._cancel(request_id)

    # --- the wire ------------------------------------------------------------------

    async def _send(self, message: dict[str, Any]) -> None:
        if self._broken is not None or self._stream is None:
            raise ConnectionError(str(self._broken or "the connection to the server is closed"))
        frame = self._encoder.encode(message)
        async with self._send_lock:
            await self._stream.send(frame)

    def _open_reply(self, request_id: int) -> MemoryObjectReceiveStream[dict[str, Any]]:
        send, receive = anyio.create_memory_object_stream[dict[str, Any]](math.inf)
        self._replies[request_id] = send
        return receive

    async def _exchange(self, request_id: int, message: dict[str, Any]) -> dict[str, Any]:
        """Send one request and wait for its one answer (raises a failure as an exception)."""
        replies = self._open_reply(request_id)
        try:
            if request_id:
                message["i"] = request_id
            await self._send(message)
            try:
                reply = await replies.receive()
            except anyio.EndOfStream:
                raise ConnectionError(
                    str(self._broken or "the server closed the connection")
                ) from None
        except BaseException:
            if request_id and request_id in self._replies:
                await self._cancel(request_id)
            raise
        finally:
            self._replies.pop(request_id, None)
            replies.close()
        return _unwrap(reply)

    async def _cancel(self, request_id: int) -> None:
        with (
            anyio.CancelScope(shield=True),
            anyio.move_on_after(1.0),
            contextlib.suppress(Exception),
        ):
            await self._send({"t": "cancel", "i": request_id})

    async def _read_loop(self) -> None:
        assert self._stream is not None
        try:
            while True:
                try:
                    data = await self._stream.receive(256 * 1024)
                except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                    self._broken = ConnectionError("the server closed the connection")
                    return
                self._decoder.feed(data)
                while True:
                    frame = self._decoder.next_frame()
                    if frame is NEED_DATA or isinstance(frame, Sentinel):
                        break
                    self._route(frame)
        except ProtocolError as exc:
            self._broken = exc
        finally:
            for stream in self._replies.values():
                stream.close()

    def _route(self, frame: dict[str, Any]) -> None:
        kind = frame.get("t")
        if kind in ("welcome", "denied"):
            target = self._replies.get(0)
        elif kind == "error":
            self._broken = ConnectionError(f"the server dropped this client: {frame.get('e')}")
            for stream in self._replies.values():
                stream.close()
            return
        else:
            target = self._replies.get(frame.get("i", -1))
        if target is not None:
            target.send_nowait(frame)


def _unwrap(reply: dict[str, Any]) -> dict[str, Any]:
    if reply.get("t") == "failure":
        raise error_from_wire(reply)
    return reply


class RemotePool:
    """One pool of a server: ``call``, ``stream``, ``cast``, ``session``."""

    def __init__(self, client: Client, name: str) -> None:
        self.client = client
        self.name = name

    async def call(
        self,
        command: str,
        args: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
        session: str | None = None,
    ) -> Any:
        message = self._call_message(command, args, "call", timeout, session)
        return (await self.client._exchange(next(self.client._ids), message))["r"]

    async def cast(
        self, command: str, args: Mapping[str, Any] | None = None, *, session: str | None = None
    ) -> None:
        message = self._call_message(command, args, "cast", None, session)
        await self.client._exchange(next(self.client._ids), message)

    async def stream(
        self,
        command: str,
        args: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
        session: str | None = None,
    ) -> AsyncIterator[Any]:
        """Items of a stream command; leaving the loop early cancels it on the server."""
        message = self._call_message(command, args, "stream", timeout, session)
        async for item in self.client._items(message):
            yield item

    def _call_message(
        self,
        command: str,
        args: Mapping[str, Any] | None,
        mode: str,
        timeout: float | None,
        session: str | None,
    ) -> dict[str, Any]:
        message: dict[str, Any] = {
            "t": "call",
            "p": self.name,
            "c": command,
            "a": dict(args or {}),
            "m": mode,
        }
        if timeout is not None:
            message["o"] = timeout
        if session is not None:
            message["s"] = session
        return message

    def session(self, session_id: str | None = None, *, ttl: float | None = None) -> RemoteSession:
        return RemoteSession(self, session_id, ttl)

    async def statistics(self) -> dict[str, Any]:
        result: dict[str, Any] = (await self.client.status())[self.name]
        return result


class RemoteSession:
    """A session of a remote pool; ``async with`` opens and closes it."""

    def __init__(self, pool: RemotePool, session_id: str | None, ttl: float | None) -> None:
        self.pool = pool
        self.id = session_id
        self.ttl = ttl
        self.variables = _RemoteVariables(self)

    async def _op(self, op: str, **args: Any) -> Any:
        if self.id is None and op != "open":
            await self.open()
        message = {"t": "session", "p": self.pool.name, "op": op, "s": self.id, "a": args}
        return (await self.pool.client._exchange(next(self.pool.client._ids), message))["r"]

    async def open(self) -> Self:
        self.id = await self._op("open", **({"ttl": self.ttl} if self.ttl else {}))
        return self

    async def call(self, command: str, args: Mapping[str, Any] | None = None, **kwargs: Any) -> Any:
        if self.id is None:
            await self.open()
        return await self.pool.call(command, args, session=self.id, **kwargs)

    async def stream(
        self, command: str, args: Mapping[str, Any] | None = None, **kwargs: Any
    ) -> AsyncIterator[Any]:
        if self.id is None:
            await self.open()
        async for item in self.pool.stream(command, args, session=self.id, **kwargs):
            yield item

    async def close(self) -> None:
        if self.id is not None:
            await self._op("close")

    async def __aenter__(self) -> Self:
        return await self.open()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


class _RemoteVariables:
    def __init__(self, session: RemoteSession) -> None:
        self._session = session

    async def define(
        self, name: str, type: str, initial: Any, constraints: Mapping[str, Any] | None = None
    ) -> None:
        await self._session._op(
            "define", name=name, type=type, initial=initial, constraints=constraints
        )

    async def get(self, name: str, default: Any = None) -> Any:
        return await self._session._op("get", name=name, default=default)

    async def set(self, name: str, value: Any, metadata: Mapping[str, Any] | None = None) -> None:
        await self._session._op("set", name=name, value=value, metadata=metadata)

    async def get_many(self, names: list[str]) -> dict[str, Any]:
        result: dict[str, Any] = await self._session._op("get_many", names=names)
        return result

    async def set_many(self, values: Mapping[str, Any]) -> None:
        await self._session._op("set_many", values=dict(values))
