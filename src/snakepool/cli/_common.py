"""What the ``snakepool`` commands share: the socket to use, session ids, versions."""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
from pathlib import Path
from typing import TYPE_CHECKING

from .._paths import default_socket_path, ensure_private_dir
from .._session_ids import check_session_id
from ..errors import InvalidSessionId

if TYPE_CHECKING:
    pass

_PACKAGES = ("anyio", "msgpack", "psutil", "tenacity")
_OPTIONAL = ("redis", "dspy")


def _version() -> str:
    try:
        return f"snakepool {importlib.metadata.version('snakepool')}"
    except importlib.metadata.PackageNotFoundError:
        return "snakepool (not installed)"


def _socket(args: argparse.Namespace) -> Path:
    if args.socket:
        return Path(args.socket)
    path = default_socket_path()
    if "SNAKEPOOL_SOCKET" not in os.environ:
        ensure_private_dir(path.parent)  # the per-user runtime directory
    return path


# --- up ---------------------------------------------------------------------------------


def _session_id(text: str) -> str:
    """``--session``: refused here, before any connection, if it breaks the id rule."""
    try:
        return check_session_id(text)
    except InvalidSessionId as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
