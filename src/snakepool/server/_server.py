"""The local socket server: every pool of a supervisor, for clients in any language.

Each client connection is an asyncio protocol (:mod:`._connection`): it
decodes requests as they arrive, runs each in its pool, and writes the
answers back, tagged with the request id, in one write per event-loop
iteration. Requests of one session take effect in the order sent; a
connection past its bounds (requests running, bytes held) is held back, not
refused. A client is trusted with nothing: a garbage or oversized frame, one
that would decode into too much memory, a missing token, no ``hello`` within
``hello_timeout``, or a client that takes none of its answers for 30 s gets
an ``error`` frame (when possible) and is dropped alone. Its calls are
cancelled in the pools; other clients and the pools carry on. An unexpected
exception while serving one connection (a bug) closes that connection alone;
it is logged with its traceback and counted in :meth:`SocketServer.statistics`.

Shutting down gracefully: :meth:`SocketServer.drain` makes every new call
and session operation fail with ``PoolClosed`` (the requests in flight carry
on); close the pools (they drain their calls), wait for
:meth:`SocketServer.wait_idle` (every answer handed to its socket), then
cancel ``serve``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import secrets
import socket
import stat
import tempfile
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.abc

from ..pool import Pool
from ._connection import Connection, ConnectionStatistics
from ._wire import DECODE_FACTOR, HELLO_TIMEOUT, MAX_CLIENT_FRAME

__all__ = ["HELLO_TIMEOUT", "ConnectionStatistics", "ServerStatistics", "SocketServer"]

_log = logging.getLogger("snakepool.server")
_ACCEPT_BACKOFF = 0.1  # after a failed accept (out of file descriptors, ...)
_READ_BUFFER_BYTES = 256 * 1024
#: Per connection, by default: requests running at once, and bytes held
#: (requests held back and running, answers the client has not taken).
MAX_INFLIGHT_PER_CLIENT = 256
MAX_BYTES_PER_CLIENT = 16 * 2**20


@dataclass(frozen=True, slots=True)
class ServerStatistics:
    """A snapshot of a :class:`SocketServer` and its connections."""

    clients: int  #: connections open now
    accepted: int  #: connections accepted since the server started
    dropped: int  #: connections closed for breaking the rules (an ``error`` frame, then gone)
    connection_errors: int  #: connections closed by an unexpected error in the server (a bug)
    accept_errors: int  #: failed accepts (e.g. out of file descriptors); the server carried on
    connections: tuple[ConnectionStatistics, ...] = ()  #: each connection open now


class SocketServer:
    """Serves ``pools`` on a Unix socket (mode 0600) and, optionally, on TCP with a token.

    ``hello_timeout``: seconds a new connection has to complete its ``hello``
    (None: no limit). ``decode_factor``: a client frame of n bytes may decode
    into at most ``decode_factor * n`` bytes of objects, plus 1 MiB.
    ``max_inflight_per_client`` and ``max_bytes_per_client`` bound what one
    connection has running and held; past them it is held back (its requests
    wait, then the server stops reading it), never refused.

    The server runs on asyncio (each connection is an asyncio protocol).
    """

    def __init__(
        self,
        pools: Mapping[str, Pool],
        *,
        socket_path: str | os.PathLike[str] | None,
        tcp: tuple[str, int] | None = None,
        allow_remote: bool = False,
        token: str | None = None,
        max_inflight_per_client: int = MAX_INFLIGHT_PER_CLIENT,
        max_bytes_per_client: int = MAX_BYTES_PER_CLIENT,
        max_frame_bytes: int = MAX_CLIENT_FRAME,
        hello_timeout: float | None = HELLO_TIMEOUT,
        decode_factor: int = DECODE_FACTOR,
    ) -> None:
        if socket_path is None and tcp is None:
            raise ValueError("give a socket path, a TCP address, or both")
        if tcp is not None and not allow_remote and not is_loopback(tcp[0]):
            raise ValueError(
                f"TCP address {tcp[0]!r} is not a loopback address; pass allow_remote=True "
                "(--allow-remote) to listen beyond this machine"
            )
        if hello_timeout is not None and not hello_timeout > 0:
            raise ValueError(f"hello_timeout must be positive (or None), not {hello_timeout!r}")
        if decode_factor < 1:
            raise ValueError(f"decode_factor must be at least 1, not {decode_factor!r}")
        for name, bound in (
            ("max_inflight_per_client", max_inflight_per_client),
            ("max_bytes_per_client", max_bytes_per_client),
        ):
            if type(bound) is not int or bound < 1:
                raise ValueError(f"{name} must be an integer >= 1, not {bound!r}")
        self.pools = pools
        self.socket_path = Path(socket_path) if socket_path is not None else None
        self.tcp = tcp
        self.token = token or (secrets.token_urlsafe(32) if tcp is not None else None)
        self.max_inflight_per_client = max_inflight_per_client
        self.max_bytes_per_client = max_bytes_per_client
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
        self._connections: dict[Connection, None] = {}  # (in the order accepted)
        self._changed: asyncio.Event | None = None  # set when a request or connection ends
        #: Where every connection reads into (no buffer allocated per read).
        self._read_buffer = memoryview(bytearray(_READ_BUFFER_BYTES))

    def statistics(self) -> ServerStatistics:
        return ServerStatistics(
            clients=self.clients,
            accepted=self.accepted,
            dropped=self.dropped,
            connection_errors=self.connection_errors,
            accept_errors=self.accept_errors,
            connections=tuple(c.statistics() for c in self._connections),
        )

    @property
    def draining(self) -> bool:
        """Whether :meth:`drain` was called: new calls fail with ``PoolClosed``."""
        return self._draining

    @property
    def requests_in_flight(self) -> int:
        """Requests (calls, streams, session operations) not yet answered, of all
        clients: running, held back, and session casts acknowledged but not yet run."""
        return sum(len(c.inflight) + len(c.held) + len(c.background) for c in self._connections)

    def drain(self) -> None:
        """From now on, answer every new call and session operation with ``PoolClosed``.

        Requests already in flight carry on (their pools decide how long:
        ``Pool.aclose`` drains running calls up to ``drain_grace``); ``status``
        and ``cancel`` still work, and new connections are still accepted (so
        a client learns why instead of finding no socket).
        """
        self._draining = True

    async def wait_idle(self) -> None:
        """Return once no request of any client is in flight (every answer handed
        to its socket)."""
        while self.requests_in_flight:
            self._changed = asyncio.Event()
            await self._changed.wait()
        for connection in self._connections:
            connection.flush()

    def _request_finished(self) -> None:
        if self._changed is not None:
            self._changed.set()

    def _connection_opened(self, connection: Connection) -> None:
        self.clients += 1
        self._connections[connection] = None

    def _connection_closed(self, connection: Connection) -> None:
        if self._connections.pop(connection, False) is None:
            self.clients -= 1
        self._request_finished()

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
                        acceptor = _Acceptor(single)
                        tg.start_soon(self._accept_loop, acceptor, self._handler(needs_token), tg)
                task_status.started()
        finally:
            for connection in list(self._connections):
                connection.close()  # (what is queued still leaves; its calls are cancelled)
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

    async def _accept_loop(self, listener: Any, handler: Any, tg: anyio.abc.TaskGroup) -> None:
        """Accept connections until the listener closes; a failed accept is not the end."""
        accept = listener.accept
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

    def _handler(self, needs_token: bool) -> Callable[[socket.socket], Coroutine[Any, Any, None]]:
        async def handle(sock: socket.socket) -> None:
            loop = asyncio.get_running_loop()
            if sock.family != socket.AF_UNIX:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                peer = _peer_name(sock)
            else:
                peer = "unix"
            connection = Connection(self, self.accepted, peer, needs_token)
            try:
                await loop.connect_accepted_socket(lambda: connection, sock)
            except OSError as exc:  # (the client left at once)
                sock.close()
                _log.debug("snakepool server: a connection ended before it started: %s", exc)

        return handle


class _Acceptor:
    """Accepts plain sockets on a bound listener's socket, to be served by an
    asyncio protocol (far cheaper per request than a byte stream and a task)."""

    def __init__(self, listener: anyio.abc.Listener[Any]) -> None:
        self._socket: socket.socket = listener.extra(anyio.abc.SocketAttribute.raw_socket)

    async def accept(self) -> socket.socket:
        if self._socket.fileno() < 0:
            raise anyio.ClosedResourceError
        sock, _ = await asyncio.get_running_loop().sock_accept(self._socket)
        sock.setblocking(False)
        return sock


def _peer_name(sock: socket.socket) -> str:
    try:
        host, port, *_ = sock.getpeername()
    except (OSError, ValueError):
        return "tcp"
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


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


def is_loopback(host: str) -> bool:
    """``host`` names this machine only (``localhost`` or a loopback address)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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
