"""Splitting a byte stream into lines (workers' and templates' stderr)."""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["LineSplitter"]


class LineSplitter:
    """Calls ``on_line`` with each complete line fed in; ``close()`` flushes the rest."""

    __slots__ = ("_on_line", "_partial")

    def __init__(self, on_line: Callable[[bytes], None]) -> None:
        self._on_line = on_line
        self._partial = b""

    def feed(self, data: bytes) -> None:
        *lines, self._partial = (self._partial + data).split(b"\n")
        for line in lines:
            self._on_line(line)

    def close(self) -> None:
        if self._partial:
            partial, self._partial = self._partial, b""
            self._on_line(partial)
