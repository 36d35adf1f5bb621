"""The adapter the socket server's tests run in real workers."""

from __future__ import annotations

from snakepool.adapters import command
from sp_adapters import Stateful

#: The numbers ``note`` saw, in the order its calls ran (one worker's).
_NOTED: list[int] = []


class Served(Stateful):
    """``Stateful`` (variables, holds, streams), and a record of the order calls run in."""

    @command
    def note(self, n: int) -> int:
        _NOTED.append(n)
        return len(_NOTED)

    @command
    def noted(self) -> list[int]:
        return list(_NOTED)
