"""The local socket server: every pool of a supervisor, for clients in any language.

One task per client connection reads frames and starts one task per request;
answers go back on the same connection, tagged with the request id. A client
is trusted with nothing: a garbage or oversized frame, one that would decode
into too much memory, a flood beyond its in-flight limit, a missing token, no
``hello`` within ``hello_timeout``, or a client that stops reading gets an
``error`` frame (when possible) and is dropped alone. Its calls are cancelled
in the pools; other clients and the pools carry on. An unexpected exception
while serving one connection (a bug) closes that connection alone; it is
logged with its traceback and counted in :meth:`SocketServer.statistics`.

Shutting down gracefully: :meth:`SocketServer.drain` makes every new call
and session operation fail with ``PoolClosed`` (the requests in flight carry
on); close the pools (they drain their calls), wait for
:meth:`SocketServer.wait_idle` (every answer sent), then cancel ``serve``.
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import logging
import os
import secrets
import stat
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import anyio.to_thread

from ..errors import PoolClosed, PoolOverloaded, ProtocolError, SessionExpired, SessionNotFound
from ..observability._remote import OBSERVE_REQUESTS, observe
from ..pool import Pool
from ..protocol import NEED_DATA, Sentinel
from ._wire import (
    CLIENT_PROTOCOL_VERSION,
    DECODE_FACTOR,
    HELLO_TIMEOUT,
    MAX_CLIENT_FRAME,
    error_to_wire,
    jsonable,
    new_decoder,
    new_encoder,
)

__all__ = ["HELLO_TIMEOUT", "ServerStatistics", "SocketServer"]

_log = logging.getLogger("snakepool.server")
_READ_CHUNK = 256 * 1024
_SEND_TIMEOUT = 30.0  # a client that does not read for this long is dropped
_HELLO_FRAME_BYTES = 64 * 1024
_ACCEPT_BACKOFF = 0.1  # after a failed accept (out of file descriptors, ...)
#: Frames this large are measured and decoded in a worker thread, so that one
#: client's big frame (about 0.1 s a MiB of small values) holds up nobody else.
_DECODE_IN_THREAD = 512 * 1024
_SESSION_OPS = frozenset({"open", "close", "define", "get", "set", "get_many", "set_many"})


class _Drop(Exception):
    """This client must go (with ``message`` in an ``error`` frame)."""


@dataclass(frozen=True, slots=True)
class ServerStatistics:
    """A snapshot of a :class:`SocketServer`'s connections."""

    clients: int  #: connections open now
    accepted: int  #: connections accepted since the server started
    dropped: int  #: connections closed for breaking the rules (an ``error`` frame, then gone)
    connection_errors: int  #: connections closed by an unexpected error in the server (a bug)
    accept_errors: int  #: failed accepts (e.g. out of file descriptors); the server carried on


class SocketServer:
    """Serves ``pools`` on a Unix socket (mode 0600) and, optionally, on TCP with a token.

    ``hello_timeout``: seconds a new connection has to complete its ``hello``
    (None: no limit). ``decode_factor``: a client frame of n bytes may decode
    into at most ``decode_factor * n`` bytes of objects, plus 1 MiB.
    """

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
        hello_timeout: float | None = HELLO_TIMEOUT,
        decode_factor: int = DECODE_FACTOR,
    ) -> None:
        if socket_path is None and tcp is None:
            raise ValueError("give a socket path, a TCP address, or both")
        if tcp is not None and not allow_remote and not _is_loopback(tcp[0]):
            raise ValueError(
                f"TCP address {tcp[0]!r} is not a loopback address; pass allow_remote=True "
                "(--allow-remote) to listen beyond this machine"
            )
        if hello_timeout is not None and not hello_timeout > 0:
            raise ValueError(f"hello_timeout must be positive (or None), not {hello_timeout!r}")
        if decode_factor < 1:
            raise ValueError(f"decode_factor must be at least 1, not {decode_factor!r}")
        self.pools = pools
        self.socket_path = Path(socket_path) if socket_path is not None else None
        self.tcp = tcp
        self.token = token or (secrets.token_urlsafe(32) if tcp is not None else None)
        self.max_inflight_per_client = max_inflight_per_client
        self.max_frame_bytes = max_frame_bytes
        self.hello_timeout = hello_timeout
        self.decode_factor = decode_factor
        self.clients = 0
        self.accepted = 0
        self.dropped = 0
        self.connection_errors = 0
        self.accept_errors = 0
        self.tcp_port: int | None = None
        self._socket_id: tuple[int, int] | None = None  # (st_dev, st_ino) of our socket
        self._listeners: list[tuple[anyio.abc.Listener[Any], bool]] | None = None
        self._draining = False
        self._connections: set[_Client] = set()
        self._changed: anyio.Event | None = None  # set when a request or connection ends

    def statistics(self) -> ServerStatistics:
        return ServerStatistics(
            clients=self.clients,
            accepted=self.accepted,
            dropped=self.dropped,
            connection_errors=self.connection_errors,
            accept_errors=self.accept_errors,
        )

    @property
    def draining(self) -> bool:
        """Whether :meth:`drain` was called: new calls fail with ``PoolClosed``."""
        return self._draining

    @property
    def requests_in_flight(self) -> int:
        """Requests (calls, streams, session operations) not yet answered, all clients."""
        return sum(len(client.inflight) for client in self._connections)

    def drain(self) -> None:
        """From now on, answer every new call and session operation with ``PoolClosed``.

        Requests already in flight carry on (their pools decide how long:
        ``Pool.aclose`` drains running calls up to ``drain_grace``); ``status``
        and ``cancel`` still work, and new connections are still accepted (so
        a client learns why instead of finding no socket).
        """
        self._draining = True

    async def wait_idle(self) -> None:
        """Return once no request of any client is in flight (answers sent)."""
        while self.requests_in_flight:
            self._changed = anyio.Event()
            await self._changed.wait()

    def _request_finished(self) -> None:
        if self._changed is not None:
            self._changed.set()

    async def bind(self) -> None:
        """Create the listeners (the socket file appears), without accepting yet.

        Connections made before :meth:`serve` runs wait in the backlog. Raises
        ``OSError`` naming the socket path or the TCP address when it cannot
        listen there (another server holds it, the port is taken, ...).
        Idempotent; :meth:`serve` binds first if this was not called.
        """
        if self._listeners is not None:
            return
        listeners: list[tuple[anyio.abc.Listener[Any], bool]] = []  # (listener, needs a token)
        try:
            if self.socket_path is not None:
                listeners.append((await self._unix_listener(self.socket_path), False))
            if self.tcp is not None:
                host, port = self.tcp
                try:
                    tcp_listener = await anyio.create_tcp_listener(local_host=host, local_port=port)
                except OSError as exc:
                    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
                    raise _named(exc, f"cannot listen on TCP {where}") from exc
                listeners.append((tcp_listener, True))
                self.tcp_port = int(tcp_listener.extra(anyio.abc.SocketAttribute.local_port))
        except BaseException:
            with anyio.CancelScope(shield=True):
                for listener, _ in listeners:
                    await listener.aclose()
                self._remove_our_socket()
            raise
        self._listeners = listeners

    async def aclose(self) -> None:
        """Close the listeners and remove our socket (``serve`` does this when it ends)."""
        listeners, self._listeners = self._listeners or [], None
        with anyio.CancelScope(shield=True):
            for listener, _ in listeners:
                await listener.aclose()
            self._remove_our_socket()

    async def serve(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen until cancelled; ``task_status.started()`` once every listener is bound."""
        try:
            await self.bind()
            assert self._listeners is not None
            async with anyio.create_task_group() as tg:
                for listener, needs_token in self._listeners:
                    for single in getattr(listener, "listeners", [listener]):  # (MultiListener)
                        tg.start_soon(self._accept_loop, single, self._handler(needs_token), tg)
                task_status.started()
        finally:
            await self.aclose()

    def _remove_our_socket(self) -> None:
        """Unlink the socket path if it is still the socket this server bound."""
        if self.socket_path is None or self._socket_id is None:
            return
        with contextlib.suppress(OSError):
            there = os.lstat(self.socket_path)
            if (there.st_dev, there.st_ino) == self._socket_id:
                self.socket_path.unlink()
        self._socket_id = None

    async def _accept_loop(
        self, listener: anyio.abc.Listener[Any], handler: Any, tg: anyio.abc.TaskGroup
    ) -> None:
        """Accept connections until the listener closes; a failed accept is not the end."""
        accept = listener.accept  # type: ignore[attr-defined]
        while True:
            try:
                stream = await accept()
            except anyio.ClosedResourceError:
                return  # (the server is stopping)
            except anyio.BrokenResourceError as exc:
                _log.error("snakepool server: a listener broke, it accepts no more: %s", exc)
                return
            except OSError as exc:  # EMFILE, ENFILE, ENOBUFS, ECONNABORTED, ...
                self.accept_errors += 1
                _log.warning("snakepool server: accepting a connection failed: %s", exc)
                await anyio.sleep(_ACCEPT_BACKOFF)
                continue
            self.accepted += 1
            tg.start_soon(handler, stream)

    async def _unix_listener(self, path: Path) -> anyio.abc.Listener[Any]:
        try:
            await _prepare_socket_path(path)
            listener = await _private_unix_listener(path)
        except OSError as exc:
            if str(path) in str(exc):
                raise
            raise _named(exc, f"cannot listen on {path}") from exc
        with contextlib.suppress(OSError):
            bound = os.lstat(path)
            self._socket_id = (bound.st_dev, bound.st_ino)
        return listener

    def _handler(self, needs_token: bool) -> Any:
        async def handle(stream: anyio.abc.ByteStream) -> None:
            self.clients += 1
            client = _Client(self, stream, needs_token)
            self._connections.add(client)
            try:
                await client.run()
            except Exception:  # a bug: this connection alone ends (_Client.run closed it)
                self.connection_errors += 1
                _log.exception(
                    "snakepool server: an unexpected error closed a client connection "
                    "(the server and its other connections carry on)"
                )
            finally:
                self.clients -= 1
                self._connections.discard(client)
                self._request_finished()

        return handle


def _named(exc: OSError, what: str) -> OSError:
    """``exc`` again, its message saying where: ``cannot listen on X: Address in use``."""
    named = OSError(f"{what}: {exc.strerror or exc}")
    named.errno = exc.errno
    return named


async def _prepare_socket_path(path: Path) -> None:
    """Make ``path`` free for a new socket, or refuse, saying what is there.

    Missing parent directories are created with mode 0700. Only a stale socket
    (one nobody answers on) is removed; a live one, a regular file, a
    directory, a symbolic link or anything else is left alone and refused.
    """
    _make_private_parents(path.parent)
    try:
        there = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(there.st_mode):
        raise FileExistsError(
            f"cannot listen on {path}: {_what_is(there.st_mode)} is there, not a socket; "
            "it is left alone (remove it yourself or choose another socket path)"
        )
    if await _answers(path):
        raise OSError(f"another server is already listening on {path}")
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # a stale socket of a server that died


#: What may sit at a socket path instead of a socket, in words.
_FILE_KINDS = (
    (stat.S_ISREG, "a regular file"),
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISLNK, "a symbolic link"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def _what_is(mode: int) -> str:
    return next((name for test, name in _FILE_KINDS if test(mode)), "something that is not a file")


def _make_private_parents(directory: Path) -> None:
    """Create ``directory`` and any missing parents with mode 0700 (never looser)."""
    missing: list[Path] = []
    current = directory
    while not os.path.lexists(current):
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    if not current.is_dir():  # (follows a symlink to a directory, as mkdir does)
        raise NotADirectoryError(
            f"cannot put a socket under {directory}: {current} is not a directory"
        )
    for new in reversed(missing):
        try:
            os.mkdir(new, 0o700)
        except FileExistsError:
            if not new.is_dir():
                raise NotADirectoryError(
                    f"cannot put a socket under {directory}: {new} is not a directory"
                ) from None
            continue  # made by someone else meanwhile: theirs, left as it is
        os.chmod(new, 0o700)  # (mkdir's mode is narrowed by the umask, never widened)


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
        self.decoder = new_decoder(
            min(_HELLO_FRAME_BYTES, server.max_frame_bytes), decode_factor=server.decode_factor
        )
        self.encoder = new_encoder(server.max_frame_bytes)
        self.send_lock = anyio.Lock()
        self.inflight: dict[int, anyio.CancelScope] = {}
        self.greeted = False
        self.hello_scope = anyio.CancelScope()  # the hello deadline, cancelled at hello

    async def run(self) -> None:
        """Serve the connection until the client leaves or is dropped.

        An unexpected exception is re-raised once the connection is closed (the
        server's handler logs and counts it); nothing else escapes.
        """
        drop: _Drop | None = None
        failure: BaseException | None = None
        async with self.stream:
            try:
                async with anyio.create_task_group() as tg:
                    self.tg = tg
                    if self.server.hello_timeout is not None:
                        tg.start_soon(self._hello_deadline, self.server.hello_timeout)
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
            except* Exception as unexpected:
                failure = unexpected
            if failure is not None:
                drop = _Drop("internal server error; the connection is closed (see the server log)")
            elif drop is not None:
                self.server.dropped += 1
                _log.warning("snakepool server: dropping a client: %s", drop)
            if drop is not None:
                with anyio.move_on_after(1.0, shield=True), contextlib.suppress(Exception):
                    await self.stream.send(self.encoder.encode({"t": "error", "e": str(drop)}))
        if failure is not None:
            raise failure

    async def _hello_deadline(self, timeout: float) -> None:
        with self.hello_scope:
            await anyio.sleep(timeout)
            if not self.greeted:
                raise _Drop(f"no hello within {timeout:g}s")

    async def _read_loop(self) -> None:
        while True:
            try:
                data = await self.stream.receive(_READ_CHUNK)
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                return
            self.decoder.feed(data)
            while True:
                try:
                    if self.decoder.whole_frame_bytes >= _DECODE_IN_THREAD:
                        # Measuring and decoding it takes a while: not on the event loop.
                        frame = await anyio.to_thread.run_sync(
                            self.decoder.next_frame, abandon_on_cancel=True
                        )
                    else:
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
        if kind not in ("call", "status", "session") and kind not in OBSERVE_REQUESTS:
            raise _Drop(f"unknown message type {kind!r}")
        if request_id in self.inflight:
            raise _Drop(f"request id {request_id} is already in flight")
        if self.server.draining and kind != "status":
            await self._send(error_to_wire(request_id, PoolClosed(_draining_message(frame))))
            return
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
        version = frame.get("v")
        if type(version) is not int or version != CLIENT_PROTOCOL_VERSION:
            raise _Drop(
                f"hello 'v' must be the integer client protocol version "
                f"{CLIENT_PROTOCOL_VERSION}; got {_shown(version)} ({type(version).__name__})"
            )
        if self.needs_token:
            token = frame.get("k")
            expected = (self.server.token or "").encode()
            # Bytes, not str: compare_digest refuses a str that is not ASCII.
            if not isinstance(token, str) or not hmac.compare_digest(
                token.encode("utf-8", "surrogatepass"), expected
            ):
                raise _Drop("a valid token is required on TCP")
        self.greeted = True
        self.hello_scope.cancel()
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
                    elif kind in OBSERVE_REQUESTS:  # logs, subscribe (snakepool.observability)
                        await self._observe(request_id, kind, frame)
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
            self.server._request_finished()

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

    async def _observe(self, request_id: int, kind: str, frame: dict[str, Any]) -> None:
        """``logs``/``subscribe``: items until done (``end``) or cancelled."""
        items = observe(kind, frame, self.server.pools, lambda: self.server.draining)
        async with contextlib.aclosing(items):
            async for item in items:
                await self._send({"t": "item", "i": request_id, "r": item})
        await self._send({"t": "end", "i": request_id})

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


def _draining_message(frame: dict[str, Any]) -> str:
    name = frame.get("p")
    pool = f"pool {name!r}" if isinstance(name, str) else "every pool"
    return f"{pool} is closed: the server is shutting down (draining the calls in flight)"


def _shown(value: Any) -> str:
    """``repr(value)``, cut short: it goes into a message."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


async def _answers(path: Path) -> bool:
    """Whether a server answers on the socket ``path`` (False: a stale socket).

    Only a refused connection means stale; anything else (no permission, ...)
    is raised: that socket may well be alive, and it is not ours to remove.
    """
    try:
        stream = await anyio.connect_unix(path)
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except OSError as exc:
        raise OSError(
            f"cannot tell whether a server listens on {path} ({exc}); it is left alone"
        ) from None
    await stream.aclose()
    return True
