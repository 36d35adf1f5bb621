"""The local socket server (``snakepool up``) and its Python client (``snakepool.connect``).

The client side (``connect``, ``Client``, ...) is thin: importing it loads no
pool machinery. ``SocketServer`` (which serves pools) is imported on first use.
"""

from typing import TYPE_CHECKING

from .._lazy import lazy_exports
from .._paths import default_socket_path as default_socket_path
from .._paths import default_token_path as default_token_path
from ._client import Client as Client
from ._client import RemotePool as RemotePool
from ._client import RemoteSession as RemoteSession
from ._client import connect as connect

if TYPE_CHECKING:
    from ._server import ConnectionStatistics as ConnectionStatistics
    from ._server import ServerStatistics as ServerStatistics
    from ._server import SocketServer as SocketServer

_LAZY = {
    "ConnectionStatistics": "._server",
    "ServerStatistics": "._server",
    "SocketServer": "._server",
}


__getattr__ = lazy_exports(__name__, _LAZY)


__all__ = [
    "Client",
    "ConnectionStatistics",
    "RemotePool",
    "RemoteSession",
    "ServerStatistics",
    "SocketServer",
    "connect",
    "default_socket_path",
    "default_token_path",
]
