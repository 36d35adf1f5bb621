"""``snakepool.connect()``: a Python client for the socket server, with the Pool API.

``async with snakepool.connect() as client: await client["general"].call("echo", {...})``

One connection, shared by every task that uses the client: requests are
written in one write per event-loop iteration, answers are decoded in
batches and handed to the waiting task by request id. Streams take at most
``STREAM_WINDOW`` items ahead of their reader (credit granted as it reads).
The client runs on asyncio.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import os
from collections.abc import AsyncIterator, Coroutine, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self, cast

from .._paths import default_socket_path, default_token_path
from .._timeouts import check_timeout
from ..errors import ProtocolError
from ._wire import CLIENT_PROTOCOL_VERSION, STREAM_WINDOW, error_from_wire, new_decoder, new_encoder

# (thin: this module imports no pool machinery, nor tenacity or psutil)
__all__ = [
    "Client",
    "RemotePool",
    "RemoteSession",
    "connect",
    "default_socket_path",
    "default_token_path",
]

_CLOSED = "the connection to the server is closed"
_CLOSED_BY_CLIENT = "this client was closed (aclose); enter it again to reconnect"
_READ_BUFFER_BYTES = 256 * 1024


def connect(
    path: str | os.PathLike[str] | None = None,
    *,
    tcp: tuple[str, int] | None = None,
    token: str | None = None,
) -> Client:
    """A client for a ``snakepool up`` server; use it with ``async with``."""
    return Client(path, tcp=tcp, token=token)


class _Stream:
    """The frames of one stream request, as they come (at most its window ahead)."""

    __slots__ = ("frames", "waiter")

    def __init__(self) -> None:
        self.frames: collections.deque[dict[str, Any]] = collections.deque()
        self.waiter: asyncio.Future[None] | None = None

    def put(self, frame: dict[str, Any]) -> None:
        self.frames.append(frame)
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class _Connection(asyncio.BufferedProtocol):
    """The socket: frames out (batched), frames in (routed by request id)."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.encoder = new_encoder()
        self.decoder = new_decoder()
        self.waiting: dict[int, asyncio.Future[dict[str, Any]] | _Stream] = {}
        self.broken: BaseException | None = None
        self.closed: asyncio.Future[None] = self.loop.create_future()
        self._out: list[bytes] = []
        self._flush_soon = False
        self._writable: asyncio.Future[None] | None = None  # while the server is not reading
        self._buffer = memoryview(bytearray(_READ_BUFFER_BYTES))  # (none allocated per read)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (duck-typed: uvloop's transports do not subclass asyncio's)
        self.transport = cast(asyncio.Transport, transport)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._buffer

    def buffer_updated(self, nbytes: int) -> None:
        decoder = self.decoder
        try:
            with self._buffer[:nbytes] as data:
                frames = decoder.whole_frames(data)  # (the usual: whole frames, at once)
                if frames is None:
                    decoder.feed(data)
            if frames is not None:
                for frame in frames:
                    self._route(frame)
                return
            while True:
                buffered = decoder.next_frame()
                if type(buffered) is not dict:
                    break
                self._route(buffered)
        except ProtocolError as exc:
            self._break(ConnectionError(f"the server sent something unreadable: {exc}"))
            if self.transport is not None:
                self.transport.abort()

    def _route(self, frame: dict[str, Any]) -> None:
        # (welcome and error carry no request id: 0 is hello's)
        target = self.waiting.get(frame.get("i", 0))
        if type(target) is _Stream:
            target.put(frame)
        elif frame.get("t") == "error":
            self._break(ConnectionError(f"the server dropped this client: {frame.get('e')}"))
        elif isinstance(target, asyncio.Future) and not target.done():
            target.set_result(frame)

    def connection_lost(self, exc: Exception | None) -> None:
        self._break(ConnectionError("the server closed the connection"))
        if not self.closed.done():
            self.closed.set_result(None)
        self.resume_writing()

    def _break(self, why: BaseException) -> None:
        """Every request waiting learns that no answer will come."""
        if self.broken is None:
            self.broken = why
        for target in self.waiting.values():
            if type(target) is _Stream:
                target.put({"t": "broken"})
            elif isinstance(target, asyncio.Future) and not target.done():
                target.set_result({"t": "broken"})

    def pause_writing(self) -> None:
        self._writable = self.loop.create_future()

    def resume_writing(self) -> None:
        writable, self._writable = self._writable, None
        if writable is not None and not writable.done():
            writable.set_result(None)

    # --- sending ----------------------------------------------------------------------

    def send(self, message: dict[str, Any]) -> None:
        """Queue ``message``: everything queued in one loop iteration leaves in one
        write (at once when it is the only request waiting: nothing to share with)."""
        transport = self.transport
        if self.broken is not None or transport is None:
            raise ConnectionError(str(self.broken or _CLOSED))
        frame = self.encoder.encode(message)
        if not self._flush_soon:
            if len(self.waiting) <= 1:
                transport.write(frame)
                return
            self._flush_soon = True
            self.loop.call_soon(self._flush)
        self._out.append(frame)

    async def writable(self) -> None:
        """Return once the server reads again (it holds this client back meanwhile)."""
        while self._writable is not None:
            await asyncio.shield(self._writable)

    def _flush(self) -> None:
        self._flush_soon = False
        out, self._out = self._out, []
        transport = self.transport
        if out and transport is not None and not transport.is_closing():
            transport.write(out[0] if len(out) == 1 else b"".join(out))

    def answer_of(self, reply: dict[str, Any]) -> dict[str, Any]:
        """``reply`` if it is an answer; raises what a ``failure`` stands for."""
        kind = reply.get("t")
        if kind == "failure":
            raise error_from_wire(reply)
        if kind == "broken":
            raise ConnectionError(str(self.broken or _CLOSED))
        return reply


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
        #: The client protocol version the server agreed to.
        self.version: int | None = None
        self._ids = itertools.count(1)
        self._connection: _Connection | None = None

    async def __aenter__(self) -> Self:
        loop = asyncio.get_running_loop()
        connection = _Connection()
        try:
            if self.tcp is not None:
                await loop.create_connection(lambda: connection, *self.tcp)
            else:
                assert self.path is not None
                await loop.create_unix_connection(lambda: connection, str(self.path))
        except OSError as exc:
            where = f"{self.tcp[0]}:{self.tcp[1]}" if self.tcp else str(self.path)
            raise ConnectionError(
                f"no snakepool server at {where} ({exc}); start one with 'snakepool up'"
            ) from None
        self._connection = connection
        try:
            hello: dict[str, Any] = {"t": "hello", "v": CLIENT_PROTOCOL_VERSION}
            token = self.token
            if self.tcp is not None and token is None and default_token_path().exists():
                token = default_token_path().read_text().strip()
            if token is not None:
                hello["k"] = token
            welcome = await self._exchange(hello, request_id=0, whole=True)
        except BaseException:
            await self.aclose()
            raise
        self.pools = list(welcome.get("pools", []))
        self.version = welcome.get("v")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        connection = self._connection
        if connection is None or connection.transport is None:
            return
        # Closed, not broken: later calls say so (not that the server left).
        connection._break(ConnectionError(_CLOSED_BY_CLIENT))
        connection._flush()
        connection.transport.close()
        try:
            await asyncio.wait_for(asyncio.shield(connection.closed), 1.0)
        except TimeoutError:
            connection.transport.abort()

    def __getitem__(self, pool: str) -> RemotePool:
        return RemotePool(self, pool)

    async def status(self) -> dict[str, Any]:
        """Every pool's statistics, as maps."""
        result: dict[str, Any] = await self._exchange({"t": "status"})
        return result

    async def server_statistics(self) -> dict[str, Any]:
        """The server's own statistics, as a map: its counters, and each
        connection open now (this one included) with its own."""
        result: dict[str, Any] = await self._exchange({"t": "connections"})
        return result

    def logs(
        self, pool: str, worker: int | None = None, *, last: int = 100, follow: bool = False
    ) -> AsyncIterator[dict[str, Any]]:
        """The last lines of a pool's workers (or one worker), then, with
        ``follow``, each new one: maps with pool, worker, time, level, line, dropped."""
        message: dict[str, Any] = {"t": "logs", "p": pool, "n": last, "f": follow}
        if worker is not None:
            message["u"] = worker
        return self._items(message)

    def subscribe(
        self,
        names: str | list[str] | None = None,
        *,
        pools: str | list[str] | None = None,
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
        """Send a request answered by ``item`` frames, then ``end`` (a stream,
        ``logs``, ``subscribe``); leaving the loop early cancels it on the server.
        The server sends at most ``STREAM_WINDOW`` items ahead of this loop."""
        connection = self._open()
        request_id = next(self._ids)
        message["i"], message["w"] = request_id, STREAM_WINDOW
        stream = _Stream()
        connection.waiting[request_id] = stream
        finished = False
        taken = 0
        try:
            await connection.writable()
            connection.send(message)
            frames = stream.frames
            while True:
                while not frames:
                    stream.waiter = connection.loop.create_future()
                    await stream.waiter
                frame = frames.popleft()
                if frame.get("t") != "item":
                    finished = True
                    connection.answer_of(frame)  # (raises a failure)
                    return
                yield frame.get("r")
                taken += 1
                if taken >= STREAM_WINDOW // 2:  # the server may send this many more
                    connection.send({"t": "credit", "i": request_id, "n": taken})
                    taken = 0
        finally:
            del connection.waiting[request_id]
            if not finished and connection.broken is None:
                connection.send({"t": "cancel", "i": request_id})

    # --- the wire ------------------------------------------------------------------

    def _open(self) -> _Connection:
        connection = self._connection
        if connection is None:
            raise ConnectionError("the client is not connected: use 'async with connect(...)'")
        return connection

    async def _exchange(
        self, message: dict[str, Any], request_id: int | None = None, *, whole: bool = False
    ) -> Any:
        """Send one request and wait for its one answer: its value ``r`` (or,
        ``whole``, the answer's frame); a failure raises. Cancelled meanwhile,
        it is cancelled on the server too."""
        connection = self._open()
        if request_id is None:
            request_id = message["i"] = next(self._ids)
        reply = connection.loop.create_future()
        connection.waiting[request_id] = reply
        try:
            if connection._writable is not None:
                await connection.writable()
            connection.send(message)
            frame = await reply
        except asyncio.CancelledError:
            # (Task.cancel() cancels the future the task awaits: the reply is then
            # done, and cancelled; one that holds an answer needs no cancel)
            unanswered = not reply.done() or reply.cancelled()
            if request_id and unanswered and connection.broken is None:
                connection.send({"t": "cancel", "i": request_id})
            raise
        finally:
            del connection.waiting[request_id]
        answer = connection.answer_of(frame)
        return answer if whole else answer.get("r")


class RemotePool:
    """One pool of a server: ``call``, ``stream``, ``cast``, ``session``."""

    def __init__(self, client: Client, name: str) -> None:
        self.client = client
        self.name = name

    def call(
        self,
        command: str,
        args: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
        session: str | None = None,
    ) -> Coroutine[Any, Any, Any]:
        """``await pool.call(...)``: the value ``command(**args)`` returned.

        (The request's own coroutine, not one wrapped in another: one
        coroutine per call.)
        """
        if timeout is None and session is None:  # (the usual call, in short)
            message = {"t": "call", "p": self.name, "c": command, "a": _args(args)}
        else:
            message = self._call_message(command, args, "call", timeout, session)
        return self.client._exchange(message)

    async def cast(
        self, command: str, args: Mapping[str, Any] | None = None, *, session: str | None = None
    ) -> None:
        """Returns once the server has the call queued (or, for a session, checked):
        its failures are logged by the server, never raised here."""
        message = self._call_message(command, args, "cast", None, session)
        await self.client._exchange(message)

    async def stream(
        self,
        command: str,
        args: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
        session: str | None = None,
    ) -> AsyncIterator[Any]:
        """Items of a stream command; leaving the loop early cancels it on the server.

        ``timeout`` bounds the wait for each item. The server sends at most
        ``STREAM_WINDOW`` items ahead of this loop.
        """
        message = self._call_message(command, args, "stream", timeout, session)
        async for item in self.client._items(message):
            yield item

    # (the rest of a stream's route is Client._items, shared with logs and subscribe)

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
            "a": _args(args),
            "m": mode,
        }
        check_timeout(timeout)  # (here: its error names ``timeout``, not ``o``)
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


def _args(args: Mapping[str, Any] | None) -> dict[str, Any]:
    if type(args) is dict:
        return args
    if args is not None and not isinstance(args, Mapping):
        raise TypeError(
            f"args must be a mapping of argument names to values, not {type(args).__name__}"
        )
    return dict(args or {})


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
        return await self.pool.client._exchange(message)

    async def open(self) -> Self:
        self.id = await self._op("open", **({"ttl": self.ttl} if self.ttl else {}))
        return self

    def call(
        self, command: str, args: Mapping[str, Any] | None = None, **kwargs: Any
    ) -> Coroutine[Any, Any, Any]:
        """``await session.call(...)``: the pool's call in this session (once it
        is open, the request's own coroutine: one per call)."""
        if self.id is None:
            return self._call_once_open(command, args, kwargs)
        return self.pool.call(command, args, session=self.id, **kwargs)

    async def _call_once_open(
        self, command: str, args: Mapping[str, Any] | None, kwargs: dict[str, Any]
    ) -> Any:
        await self.open()
        return await self.pool.call(command, args, session=self.id, **kwargs)

    async def stream(
        self, command: str, args: Mapping[str, Any] | None = None, **kwargs: Any
    ) -> AsyncIterator[Any]:
        if self.id is None:
            await self.open()
        async for item in self.pool.stream(command, args, session=self.id, **kwargs):
            yield item

    async def cast(self, command: str, args: Mapping[str, Any] | None = None) -> None:
        if self.id is None:
            await self.open()
        await self.pool.cast(command, args, session=self.id)

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
        self,
        name: str,
        type: str,
        initial: Any,
        constraints: Mapping[str, Any] | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        args: dict[str, Any] = {"name": name, "type": type, "initial": initial}
        if constraints is not None:
            args["constraints"] = dict(constraints)
        if metadata is not None:
            args["metadata"] = dict(metadata)
        await self._session._op("define", **args)

    async def get(self, name: str, default: Any = None) -> Any:
        return await self._session._op("get", name=name, default=default)

    async def set(self, name: str, value: Any, metadata: Mapping[str, Any] | None = None) -> None:
        args: dict[str, Any] = {"name": name, "value": value}
        if metadata is not None:
            args["metadata"] = dict(metadata)
        await self._session._op("set", **args)

    async def get_many(self, names: list[str]) -> dict[str, Any]:
        if isinstance(names, str):  # (list("abc") would ask for 'a', 'b' and 'c')
            raise TypeError(f"names must be a list of variable names, not the string {names!r}")
        result: dict[str, Any] = await self._session._op("get_many", names=list(names))
        return result

    async def set_many(self, values: Mapping[str, Any]) -> None:
        await self._session._op("set_many", values=dict(values))
