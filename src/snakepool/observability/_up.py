"""``snakepool up --metrics HOST:PORT --dashboard HOST:PORT``: what to serve where.

Everything is checked and bound before any worker starts, so a missing
extra, a taken port or a remote address without a token fails at once, with
a message saying what to do.
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..pool import Pool

if TYPE_CHECKING:
    from ..server._server import SocketServer

__all__ = ["Served", "prepare"]


@dataclass
class Served:
    """An app bound to its socket, to serve while the pools run."""

    what: str  # "metrics" or "dashboard"
    url: str
    sock: socket.socket
    app: Any

    def serve(self) -> Callable[..., Awaitable[None]]:
        from ._http import serve_app

        async def run(*, task_status: Any) -> None:
            await serve_app(self.app, self.sock, task_status=task_status)

        return run


def _need(extra: str, flag: str, modules: tuple[str, ...]) -> None:
    import importlib

    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError:
            raise ValueError(
                f"{flag} needs the {extra!r} extra ({module} is not installed): "
                f"pip install 'snakepool[{extra}]'"
            ) from None


def prepare(
    *,
    metrics: str | None,
    dashboard: str | None,
    pools: Mapping[str, Pool],
    server: SocketServer,
    allow_remote: bool,
) -> list[Served]:
    """Bind what ``--metrics`` and ``--dashboard`` ask for (``ValueError`` or
    ``OSError`` saying what is wrong)."""
    served: list[Served] = []
    try:
        if metrics is not None:
            _need("metrics", "--metrics", ("prometheus_client", "uvicorn"))
            served.append(_bind("metrics", metrics, pools, server, allow_remote))
        if dashboard is not None:
            _need("dashboard", "--dashboard", ("starlette", "uvicorn"))
            served.append(_bind("dashboard", dashboard, pools, server, allow_remote))
    except BaseException:
        for item in served:
            item.sock.close()
        raise
    return served


def _bind(
    what: str, text: str, pools: Mapping[str, Pool], server: SocketServer, allow_remote: bool
) -> Served:
    from ._http import bind, is_loopback, parse_address

    flag = f"--{what}"
    host, port = parse_address(text, flag)
    token = None
    if not is_loopback(host):
        if not allow_remote:
            raise ValueError(
                f"{flag} {text}: {host!r} is not a loopback address; pass --allow-remote "
                "to serve beyond this machine (it then requires the TCP token)"
            )
        if server.token is None:
            raise ValueError(
                f"{flag} {text}: a non-loopback address requires the TCP token: "
                "also pass --tcp HOST:PORT (its token, in the token file, opens the page)"
            )
        token = server.token
    sock = bind(host, port, flag)
    try:
        if what == "metrics":
            from ._http import TokenGate
            from ._metrics import metrics_app

            app = metrics_app(pools, server=server)
            if token is not None:
                app = TokenGate(app, token)
        else:
            from .dashboard import dashboard_app

            app = dashboard_app(pools, server=server, token=token)
    except BaseException:
        sock.close()
        raise
    bound = sock.getsockname()
    shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
    path = "/metrics" if what == "metrics" else "/"
    return Served(what, f"http://{shown}:{bound[1]}{path}", sock, app)
