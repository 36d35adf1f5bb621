"""The local socket server (``snakepool up``) and its Python client (``snakepool.connect``)."""

from ._client import Client as Client
from ._client import RemotePool as RemotePool
from ._client import RemoteSession as RemoteSession
from ._client import connect as connect
from ._client import default_socket_path as default_socket_path
from ._client import default_token_path as default_token_path
from ._server import ServerStatistics as ServerStatistics
from ._server import SocketServer as SocketServer

__all__ = [
    "Client",
    "RemotePool",
    "RemoteSession",
    "ServerStatistics",
    "SocketServer",
    "connect",
    "default_socket_path",
    "default_token_path",
]
