"""The local socket server: every pool of a supervisor, for clients in any language.

One task per client connection reads frames and starts one task per request;
answers go back on the same connection, tagged with the request id. A client
is trusted with nothing: a garbage or oversized frame, a flood beyond its
in-flight limit, a missing token, or a client that stops reading gets an
``error`` frame (when possible) and is dropped alone. Its calls are cancelled
in the pools; other clients and the pools carry on.
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import logging
import os
import secrets
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import anyio
import anyio.abc

from ..errors import PoolOverloaded, ProtocolError, SessionExpired, SessionNotFound
from ..pool import Pool
from ..protocol import NEED_DATA, Sentinel
from ._wire import (
    CLIENT_PROTOCOL_VERSION,
    MAX_CLIENT_FRAME,
    error_to_wire,
    jsonable,
    new_decoder,
    new_encoder,
)

__all__ = ["SocketServer"]

_log = logging.getLogger("snakepool.server")
_READ_CHUNK = 256 * 1024
_SEND_TIMEOUT = 30.0  # a client that does not read for this long is dropped
_HELLO_FRAME_BYTES = 64 * 1024
_SESSION_OPS = frozenset({"open", "close", "define", "get", "set", "get_many", "set_many"})


class _Drop(Exception):
    """This client must go (with ``message`` in an ``error`` frame)."""


class SocketServer:
    """Serves ``pools`` on a Unix socket (mode 0600) and, optionally, on TCP with a token."""

    def __init__(
        self,
        pools: Mapping[str, Pool],
        *,
        socket_path: str | os.PathLike[str] | None,
        tcp: tuple[str, int] | None = None,
        allow_remote: bool = False,
        token: str | None = None,
        max_inflight_per_client: int = 256,
        max_frame_bytes: int = MAX_CLIENT_FRAME,
    ) -> None:
        if socket_path is None and tcp is None:
            raise ValueError("give a socket path, a TCP address, or both")
        if tcp is not None and not allow_remote and not _is_loopback(tcp[0]):
            raise ValueError(
                f"TCP address {tcp[0]!r} is not a loopback address; pass allow_remote=True "
                "(--allow-remote) to listen beyond this machine"
            )
        self.pools = pools
        self.socket_path = Path(socket_path) if socket_path is not None else None
        self.tcp = tcp
        self.token = token or (secrets.token_urlsafe(32) if tcp is not None else None)
        self.max_inflight_per_client = max_inflight_per_client
        self.max_frame_bytes = max_frame_bytes
        self.clients = 0
        self.tcp_port: int | None = None

    async def serve(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen until cancelled; ``task_status.started()`` once every listener is bound."""
        listeners: list[anyio.abc.Listener[Any]] = []
        if self.socket_path is not None:
            listeners.append(await self._unix_listener(self.socket_path))
        if self.tcp is not None:
            tcp_listener = await anyio.create_tcp_listener(
                local_host=self.tcp[0], local_port=self.tcp[1]
            )
            self.tcp_port = int(tcp_listener.extra(anyio.abc.SocketAttribute.local_port))
            listeners.append(tcp_listener)
        try:
            async with anyio.create_task_group() as tg:
                for listener in listeners:
                    needs_token = listener is not listeners[0] or self.socket_path is None
                    tg.start_soon(listener.serve, self._handler(needs_token))
                task_status.started()
        finally:
            with anyio.CancelScope(shield=True):
                for listener in listeners:
                    await listener.aclose()
                if self.socket_path is not None:
                    with contextlib.suppress(OSError):
                        self.socket_path.unlink()

    async def _unix_listener(self, path: Path) -> anyio.abc.Listener[Any]:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if path.exists():
            if await _answers(path):
                raise OSError(f"another server is already listening on {path}")
            path.unlink()  # a stale socket of a server that died
        return await _private_unix_listener(path)

    def _handler(self, needs_token: bool) -> Any:
        async def handle(stream: anyio.abc.ByteStream) -> None:
            self.clients += 1
            try:
                await _Client(self, stream, needs_token).run()
            finally:
                self.clients -= 1

        return handle


_SUN_PATH_MAX = 108  # sockaddr_un.sun_path on Linux, with its NUL


async def _private_unix_listener(path: Path) -> anyio.abc.Listener[Any]:
    """Listen on ``path``, a socket that no other user can reach at any moment.

    Binding creates the socket with the umask's mode, and anyio's ``mode=``
    changes it only after: a window in which the socket is looser than 0600.
    So the socket is bound and narrowed in a private directory beside ``path``
    and only then linked into place. ``link`` (not ``rename``) fails if a
    server that started alongside already took ``path``, as ``bind`` would.
    """
    staging = Path(tempfile.mkdtemp(prefix=".sp-", dir=path.parent))
    staged = staging / "s"
    if len(os.fsencode(staged)) >= _SUN_PATH_MAX:
        # The staged name would not fit where ``path`` does: bind in place.
        # ``path``'s directory is this user's 0700 runtime directory unless
        # the caller chose another, so the short window reaches no one there.
        staging.rmdir()
        return await anyio.create_unix_listener(path, mode=0o600)
    try:
        listener = await anyio.create_unix_listener(staged, mode=0o600)
        try:
            os.link(staged, path)
        except FileExistsError:
            await listener.aclose()
            raise OSError(f"another server is already listening on {path}") from None
        except BaseException:
            await listener.aclose()
            raise
        return listener
    finally:
        with contextlib.suppress(OSError):
            staged.unlink()
        with contextlib.suppress(OSError):
            staging.rmdir()


class _Client:
    """One client connection."""

    def __init__(
        self, server: SocketServer, stream: anyio.abc.ByteStream, needs_token: bool
    ) -> None:
        self.server = server
        self.stream = stream
        self.needs_token = needs_token
        # Until it has said hello (with its token), a client gets small frames only.
        self.decoder = new_decoder(min(_HELLO_FRAME_BYTES, server.max_frame_bytes))
        self.encoder = new_encoder(server.max_frame_bytes)
        self.send_lock = anyio.Lock()
        self.inflight: dict[int, anyio.CancelScope] = {}
        self.greeted = False

    async def run(self) -> None:
        drop: _Drop | None = None
        async with self.stream:
            try:
                async with anyio.create_task_group() as tg:
                    self.tg = tg
                    await self._read_loop()
                    tg.cancel_scope.cancel()  # the client left: cancel its calls
            except* _Drop as dropped:
                drop = dropped.exceptions[0]  # type: ignore[assignment]
            except* (
                anyio.BrokenResourceError,
                anyio.ClosedResourceError,
                anyio.EndOfStream,
                OSError,
            ):
                pass  # the client went away
            if drop is not None:
                _log.warning("snakepool server: dropping a client: %s", drop)
                with anyio.move_on_after(1.0, shield=True), contextlib.suppress(Exception):
                    await self.stream.send(self.encoder.encode({"t": "error", "e": str(drop)}))

    async def _read_loop(self) -> None:
        while True:
            try:
                data = await self.stream.receive(_READ_CHUNK)
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                return
            self.decoder.feed(data)
            while True:
                try:
                    frame = self.decoder.next_frame()
                except ProtocolError as exc:
                    raise _Drop(f"protocol error: {exc}") from None
                if frame is NEED_DATA or isinstance(frame, Sentinel):
                    break
                await self._on_frame(frame)

    async def _on_frame(self, frame: dict[str, Any]) -> None:
        kind = frame.get("t")
        if not self.greeted:
            await self._greet(frame)
            return
        request_id = frame.get("i")
        if not isinstance(request_id, int) or isinstance(request_id, bool):
            raise _Drop(f"{kind!r} frame without an integer request id 'i'")
        if kind == "cancel":
            scope = self.inflight.get(request_id)
            if scope is not None:
                scope.cancel()
            return
        if kind not in ("call", "status", "session"):
            raise _Drop(f"unknown message type {kind!r}")
        if request_id in self.inflight:
            raise _Drop(f"request id {request_id} is already in flight")
        if len(self.inflight) >= self.server.max_inflight_per_client:
            await self._send(
                error_to_wire(
                    request_id,
                    PoolOverloaded(
                        f"this connection already has {len(self.inflight)} requests in flight "
                        f"(limit {self.server.max_inflight_per_client})"
                    ),
                )
            )
            return
        scope = anyio.CancelScope()
        self.inflight[request_id] = scope
        self.tg.start_soon(self._serve_request, request_id, kind, frame, scope)

    async def _greet(self, frame: dict[str, Any]) -> None:
        if frame.get("t") != "hello":
            raise _Drop("the first message must be 'hello'")
        if frame.get("v") != CLIENT_PROTOCOL_VERSION:
            raise _Drop(
                f"client protocol version {frame.get('v')!r} is not {CLIENT_PROTOCOL_VERSION}"
            )
        if self.needs_token:
            token = frame.get("k")
            expected = self.server.token or ""
            if not isinstance(token, str) or not hmac.compare_digest(token, expected):
                raise _Drop("a valid token is required on TCP")
        self.greeted = True
        self.decoder = self.decoder.with_limit(self.server.max_frame_bytes)
        await self._send(
            {"t": "welcome", "v": CLIENT_PROTOCOL_VERSION, "pools": sorted(self.server.pools)}
        )

    async def _serve_request(
        self, request_id: int, kind: str, frame: dict[str, Any], scope: anyio.CancelScope
    ) -> None:
        try:
            with scope:
                try:
                    if kind == "call":
                        await self._call(request_id, frame)
                    elif kind == "status":
                        stats = {
                            name: jsonable(p.statistics()) for name, p in self.server.pools.items()
                        }
                        await self._send({"t": "result", "i": request_id, "r": stats})
                    else:
                        await self._session(request_id, frame)
                except (_Drop, anyio.BrokenResourceError, anyio.ClosedResourceError):
                    raise
                except Exception as exc:
                    await self._send(error_to_wire(request_id, exc))
            if scope.cancelled_caught:  # cancelled by the client: tell it so
                with contextlib.suppress(Exception):
                    await self._send({"t": "failure", "i": request_id, "y": "Cancelled", "g": "application",
                                      "e": "cancelled by the client"})  # fmt: skip
        finally:
            self.inflight.pop(request_id, None)

    def _pool(self, frame: dict[str, Any]) -> Pool:
        name = frame.get("p")
        pool = self.server.pools.get(name) if isinstance(name, str) else None
        if pool is None:
            raise KeyError(
                f"no pool named {name!r} (pools: {', '.join(sorted(self.server.pools))})"
            )
        return pool

    async def _call(self, request_id: int, frame: dict[str, Any]) -> None:
        pool = self._pool(frame)
        command, args = frame.get("c"), frame.get("a")
        timeout, session, mode = frame.get("o"), frame.get("s"), frame.get("m", "call")
        if mode == "stream":
            async with pool.stream(command, args, timeout=timeout, session=session) as items:  # type: ignore[arg-type]
                async for item in items:
                    await self._send({"t": "item", "i": request_id, "r": item})
            await self._send({"t": "end", "i": request_id})
        elif mode == "cast":
            await pool.cast(command, args, session=session)  # type: ignore[arg-type]
            await self._send({"t": "result", "i": request_id, "r": None})
        elif mode == "call":
            value = await pool.call(command, args, timeout=timeout, session=session)  # type: ignore[arg-type]
            await self._send({"t": "result", "i": request_id, "r": value})
        else:
            raise ValueError(f"unknown call mode {mode!r}; one of call, stream, cast")

    async def _session(self, request_id: int, frame: dict[str, Any]) -> None:
        pool = self._pool(frame)
        op, session_id, args = frame.get("op"), frame.get("s"), frame.get("a") or {}
        if op not in _SESSION_OPS:
            raise ValueError(
                f"unknown session operation {op!r}; one of {', '.join(sorted(_SESSION_OPS))}"
            )
        if not isinstance(args, dict):
            raise TypeError("session operation arguments 'a' must be a map")
        result: Any = None
        if op == "open":
            session = pool.session(session_id or None, ttl=args.get("ttl"))
            await session.open()
            result = session.id
        elif not isinstance(session_id, str):
            raise ValueError(f"session operation {op!r} needs a session id 's'")
        elif op == "close":
            await pool.session(session_id).close()
        else:
            await _require_live(pool, session_id)  # a typo must not create a session
            result = await getattr(pool.session(session_id).variables, op)(**args)
        await self._send({"t": "result", "i": request_id, "r": result})

    async def _send(self, message: dict[str, Any]) -> None:
        try:
            frame = self.encoder.encode(message)
        except (TypeError, ProtocolError) as exc:
            request_id = message.get("i", 0)
            frame = self.encoder.encode(
                error_to_wire(request_id, TypeError(f"the answer cannot be sent: {exc}"))
            )
        async with self.send_lock:
            with anyio.move_on_after(_SEND_TIMEOUT) as waited:
                await self.stream.send(frame)
            if waited.cancelled_caught:
                raise _Drop(f"the client did not read for {_SEND_TIMEOUT:g}s")


async def _require_live(pool: Pool, session_id: str) -> None:
    status = await pool._sessions_manager().store.status(session_id)
    if status == "expired":
        raise SessionExpired(f"session {session_id!r} expired or was closed")
    if status != "live":
        raise SessionNotFound(f"no session {session_id!r}; open one first")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def _answers(path: Path) -> bool:
    try:
        stream = await anyio.connect_unix(path)
    except OSError:
        return False
    await stream.aclose()
    return True
