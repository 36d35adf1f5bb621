"""Where snakepool keeps per-user runtime files (light: workers, the socket
client and the CLI import it, never the pool)."""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path

__all__ = ["default_socket_path", "default_token_path", "ensure_private_dir", "runtime_dir"]


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


def default_socket_path() -> Path:
    """``$SNAKEPOOL_SOCKET``, else ``snakepool.sock`` in the per-user runtime directory."""
    explicit = os.environ.get("SNAKEPOOL_SOCKET")
    return Path(explicit) if explicit else runtime_dir() / "snakepool.sock"


def default_token_path() -> Path:
    """Where ``snakepool up --tcp`` writes its token (the runtime directory's ``token``)."""
    return runtime_dir() / "token"


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` (mode 0700) or check that it is this user's, and private.

    In a shared /tmp another user could otherwise create it first and read
    tokens or plant a socket. Missing parents are made 0700 too (``mkdir
    (parents=True)`` would make them 0755). A directory of this user that is
    merely too open (made by a library's ``makedirs``, or an older snakepool)
    is tightened to 0700; one of another user, or not a directory, is refused.
    """
    missing: list[Path] = []
    probe = path
    while not os.path.lexists(probe) and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    for directory in reversed(missing):
        with contextlib.suppress(FileExistsError):
            directory.mkdir(mode=0o700)
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise OSError(
            f"{path} is not a directory of this user (owner uid {info.st_uid}, "
            f"mode {stat.S_IMODE(info.st_mode):o}); remove it, or set SNAKEPOOL_RUNTIME_DIR"
        )
    if info.st_mode & 0o077:
        os.chmod(path, 0o700)
    return path
