"""An adapter for tests/test_values.py: what a handler receives, and values it returns.

``Point`` is registered here, so the host (which imports this module) and every
worker (which imports it as its adapter's module) both know its extension type.
"""

from __future__ import annotations

import datetime as dt
import struct
from typing import Any

import snakepool
from snakepool.adapters import Adapter, command

POINT_CODE = 64  # (not a code tests/test_hostile_protocol.py sends as unknown)


class Point:
    """A user type that travels as extension type 64 (two float64s)."""

    __slots__ = ("x", "y")

    def __init__(self, x: float, y: float) -> None:
        self.x, self.y = x, y

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Point) and (self.x, self.y) == (other.x, other.y)

    def __hash__(self) -> int:
        return hash((self.x, self.y))

    def __repr__(self) -> str:
        return f"Point({self.x}, {self.y})"


snakepool.register_value_type(
    Point,
    POINT_CODE,
    lambda p: struct.pack(">dd", p.x, p.y),
    lambda data: Point(*struct.unpack(">dd", data)),
)


def _describe(value: Any) -> Any:
    """What a value is, as the handler sees it (a list of them for a list)."""
    if isinstance(value, list):
        return [_describe(v) for v in value]
    described: dict[str, Any] = {"type": f"{type(value).__module__}.{type(value).__qualname__}"}
    if hasattr(value, "dtype") and hasattr(value, "shape"):
        described.update(dtype=str(value.dtype), shape=list(value.shape))
        if hasattr(value, "flags"):
            described.update(writeable=value.flags.writeable, fortran=value.flags.f_contiguous)
    if isinstance(value, dt.datetime):
        described["utcoffset"] = value.utcoffset()
    return described


class Values(Adapter):
    @command
    def echo(self, value: Any = None) -> Any:
        return value

    @command
    def describe_value(self, value: Any) -> Any:
        """The type (and dtype, shape, flags) of what arrived."""
        return _describe(value)

    @command
    def scaled(self, array: Any, factor: float) -> Any:
        """A new array computed from the argument (numpy in the worker)."""
        return array * factor

    @command
    def later(self, when: dt.datetime, by: dt.timedelta) -> dt.datetime:
        return when + by

    @command
    def epoch(self) -> dt.datetime:
        return dt.datetime(1970, 1, 1)

    @command
    def moved(self, point: Point, dx: float) -> Point:
        return Point(point.x + dx, point.y)
