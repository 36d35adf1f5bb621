"""Where snakepool keeps per-user runtime files (light: workers import it too)."""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

__all__ = ["ensure_private_dir", "runtime_dir"]


def runtime_dir() -> Path:
    """Per-user runtime directory: ``$SNAKEPOOL_RUNTIME_DIR``, else ``$XDG_RUNTIME_DIR/snakepool``,
    else ``<tmp>/snakepool-<uid>``."""
    explicit = os.environ.get("SNAKEPOOL_RUNTIME_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isdir(xdg):
        return Path(xdg) / "snakepool"
    return Path(tempfile.gettempdir()) / f"snakepool-{os.getuid()}"


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` (mode 0700) or check that it is this user's, and private.

    In a shared /tmp another user could otherwise create it first and read
    tokens or plant a socket.
    """
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise OSError(
            f"{path} is not a private directory of this user (owner uid {info.st_uid}, "
            f"mode {stat.S_IMODE(info.st_mode):o}); remove it, or set SNAKEPOOL_RUNTIME_DIR"
        )
    return path
