"""The per-user runtime directory stays private, however it came to exist."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from snakepool._paths import ensure_private_dir


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_missing_parents_are_made_private_too(tmp_path: Path) -> None:
    leaf = tmp_path / "runtime" / "runs"
    ensure_private_dir(leaf)
    assert mode(tmp_path / "runtime") == 0o700
    assert mode(leaf) == 0o700


def test_a_directory_of_ours_that_is_too_open_is_tightened(tmp_path: Path) -> None:
    # e.g. a library's makedirs (DSPy's cache) created the runtime directory first
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o755)
    runtime.chmod(0o755)
    ensure_private_dir(runtime)
    assert mode(runtime) == 0o700


def test_something_else_at_the_path_is_refused(tmp_path: Path) -> None:
    (tmp_path / "runtime").write_text("not a directory")
    with pytest.raises(OSError, match="not a directory of this user"):
        ensure_private_dir(tmp_path / "runtime")


def test_a_symlink_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.mkdir()
    (tmp_path / "runtime").symlink_to(target)
    with pytest.raises(OSError, match="not a directory of this user"):
        ensure_private_dir(tmp_path / "runtime")
