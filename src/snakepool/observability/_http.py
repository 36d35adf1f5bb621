"""Serving an ASGI app (metrics, the dashboard) inside ``snakepool up``.

uvicorn runs the app on the server's own event loop, so the app reads the
pools where they live. The socket is bound here first, so an address that is
taken fails with a clear ``OSError`` (uvicorn would exit the process), and
uvicorn's own signal handling is left out: ``snakepool up`` handles SIGINT
and SIGTERM itself.
"""

from __future__ import annotations

import contextlib
import hmac
import socket
from collections.abc import Awaitable, Callable, Generator, MutableMapping
from typing import Any

import anyio
import anyio.abc
import uvicorn

from ..server._server import is_loopback

__all__ = ["TokenGate", "is_loopback", "parse_address", "serve_app"]

_Scope = MutableMapping[str, Any]
_App = Callable[[_Scope, Any, Any], Awaitable[None]]
#: The cookie that keeps a browser's token after ``?token=`` was given once.
TOKEN_COOKIE = "snakepool_token"


def parse_address(text: str, what: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) or a clear ``ValueError``."""
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{what} must look like HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = anyio.Event()

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield  # (the host program handles signals)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        try:
            await super().startup(sockets)
        finally:
            self.ready.set()


def bind(host: str, port: int, what: str) -> socket.socket:
    """A listening socket on ``host:port`` (0: any free port), or an ``OSError``
    naming the address and what it was for."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        raise OSError(exc.errno, f"cannot listen on {where} for {what}: {exc.strerror}") from None
    return sock


async def serve_app(
    app: Any,
    sock: socket.socket,
    *,
    task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on the bound ``sock`` until cancelled (then stop gracefully,
    at most a second); ``task_status.started(port)`` once it accepts."""
    config = uvicorn.Config(
        app,
        lifespan="auto",
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=1,
        ws="none",
    )
    server = _Server(config)
    done = anyio.Event()

    async def run() -> None:
        try:
            with anyio.CancelScope(shield=True):  # (it stops when told, below)
                await server.serve(sockets=[sock])
        finally:
            done.set()
            server.ready.set()  # (if it ended before it started)

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        await server.ready.wait()
        task_status.started(int(sock.getsockname()[1]))
        try:
            await anyio.sleep_forever()
        finally:
            server.should_exit = True
            with anyio.CancelScope(shield=True):
                await done.wait()
            sock.close()


class TokenGate:
    """ASGI middleware: every request needs ``token`` (``Authorization: Bearer``,
    ``?token=``, which a browser then keeps as a cookie, or that cookie)."""

    def __init__(self, app: _App, token: str) -> None:
        self.app = app
        self._token = token.encode()

    async def __call__(self, scope: _Scope, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        given, from_query = self._given(scope)
        if given is None or not hmac.compare_digest(given.encode(), self._token):
            await _refuse(send)
            return
        if not from_query:
            await self.app(scope, receive, send)
            return

        async def send_with_cookie(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                cookie = f"{TOKEN_COOKIE}={given}; Path=/; HttpOnly; SameSite=Strict"
                message = {
                    **message,
                    "headers": [*message["headers"], (b"set-cookie", cookie.encode())],
                }
            await send(message)

        await self.app(scope, receive, send_with_cookie)

    @staticmethod
    def _given(scope: _Scope) -> tuple[str | None, bool]:
        from urllib.parse import parse_qs

        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        if "token" in query:
            return query["token"][0], True
        for name, value in scope.get("headers", ()):
            if name == b"authorization" and value.lower().startswith(b"bearer "):
                return value[7:].decode("latin-1").strip(), False
            if name == b"cookie":
                for part in value.decode("latin-1").split(";"):
                    key, _, found = part.strip().partition("=")
                    if key == TOKEN_COOKIE:
                        return found, False
        return None, False


async def _refuse(send: Any) -> None:
    body = b"a token is required here: add ?token=TOKEN (the TCP token of 'snakepool up')\n"
    await send(
        {
            "type": "http.response.start",
            "status": 401,
            "headers": [(b"content-type", b"text/plain; charset=utf-8")],
        }
    )
    await send({"type": "http.response.body", "body": body})
