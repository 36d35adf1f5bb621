"""What decoding a frame will cost, worked out from its bytes before it is decoded.

MessagePack is compact and Python objects are not: one byte (``0x80``) is an
empty map, and an empty ``dict`` takes 64 bytes, so a 4 MiB frame holding a
list of empty maps decodes into about 300 MiB. A peer that is trusted with
nothing (a client of the socket server) must not be able to do that with one
frame. :func:`measure` walks a frame's body without building anything, adds up
an upper bound of the memory its decoded objects will take (CPython's object
sizes, with allocator rounding), and refuses the frame with
:class:`ProtocolError` as soon as that passes the budget, before anything is
allocated. On the way it refuses MessagePack extension types (naming their
type code) and reads the frame's message type (its top-level ``"t"``), so a
frame of an unknown type is refused before it is decoded too.

Sans-IO: bytes in, a string or an exception out.
"""

from __future__ import annotations

import re
import sys
from typing import Final

from ..errors import ProtocolError

__all__ = [
    "MAX_DEPTH",
    "WORST_RATIO",
    "decode_cost",
    "human_size",
    "measure",
    "refuse_extension",
]

#: Containers nested deeper than this are refused (msgpack's own decoder stack).
MAX_DEPTH: Final = 1024
#: More than any one byte of a frame decodes into (a one-entry map in a list: 78 bytes).
WORST_RATIO: Final = 96

# Upper bounds, in bytes, of what one decoded object takes (64-bit CPython
# 3.11+, object header, GC header and allocator rounding included). A slot in a
# list or a dict is charged with its container, so these are the objects alone.
_LIST: Final = 72  # + 8 per item
_INT: Final = 32  # an int outside -5..256 (the cached ones cost nothing)
_BIG_INT: Final = 48  # one that needs 64 bits
_FLOAT: Final = 32
_ASCII_STR: Final = 56  # + 1 per character
_WIDE_STR: Final = 88  # + 4 per UTF-8 byte (one non-ASCII character makes every one 4 bytes)
_BYTES: Final = 48  # + 1 per byte
_INTERNED: Final = 64  # a str map key is interned: one more entry in the (process-wide) table
#: Keys up to this length are remembered so that a repeated key is charged once
#: (the decoder interns str keys: a list of records shares its keys), up to this
#: many distinct ones (later new keys are charged each time, remembering costs too).
_DEDUPE_KEYS_UP_TO: Final = 256
_KEYS_REMEMBERED: Final = 4096

#: One-byte values that allocate nothing: 0..127, nil, false, true, -5..-1.
_FREE_RUN: Final = re.compile(rb"[\x00-\x7f\xc0\xc2\xc3\xfb-\xff]+")
#: One-byte ints -32..-6: a new int object each.
_NEG_RUN: Final = re.compile(rb"[\xe0-\xfa]+")
_FLOAT64_RUN: Final = re.compile(rb"(?:\xcb.{8})+", re.DOTALL)
_UINT16_RUN: Final = re.compile(rb"(?:\xcd..)+", re.DOTALL)
_NON_ASCII: Final = re.compile(rb"[\x80-\xff]")

#: Extension markers (fixext 1..16, ext 8/16/32): where their type code is.
_EXT_AT: Final = {0xD4: 1, 0xD5: 1, 0xD6: 1, 0xD7: 1, 0xD8: 1, 0xC7: 2, 0xC8: 3, 0xC9: 5}


def human_size(n: float) -> str:
    if n >= 2**20:
        return f"{n / 2**20:.1f} MiB"
    if n >= 2**10:
        return f"{n / 2**10:.1f} KiB"
    return f"{n:.0f} bytes"


def refuse_extension(code: int) -> ProtocolError:
    """The error for a MessagePack extension value of type ``code``."""
    what = "-1 (timestamp)" if code == -1 else str(code)
    return ProtocolError(
        f"MessagePack extension type {what} is not supported: "
        "snakepool frames carry no extension types"
    )


def _dict_cost(n: int) -> int:
    """An upper bound of a dict of ``n`` entries (its table as CPython sizes it)."""
    if n == 0:
        return 64
    size = 8
    while size * 2 // 3 < n:
        size *= 2
    index_bytes = 1 if size <= 0x80 else 2 if size <= 0x8000 else 4
    table = size * index_bytes + (size * 2 // 3) * 24
    # A dict that grew to this size held its previous table (half this one) at the end.
    return 64 + 56 + table + (table // 2 if n > 5 else 0)


def _kind(marker: int) -> str:
    """The Python type a value starting with ``marker`` decodes to (for messages)."""
    if marker <= 0x7F or marker >= 0xE0 or 0xCC <= marker <= 0xD3:
        return "int"
    if marker <= 0x8F or marker in (0xDE, 0xDF):
        return "dict"
    if marker <= 0x9F or marker in (0xDC, 0xDD):
        return "list"
    if marker <= 0xBF or marker in (0xD9, 0xDA, 0xDB):
        return "str"
    if marker in (0xC4, 0xC5, 0xC6):
        return "bytes"
    if marker in (0xCA, 0xCB):
        return "float"
    if marker == 0xC0:
        return "NoneType"
    if marker in (0xC2, 0xC3):
        return "bool"
    return "MessagePack extension value" if marker in _EXT_AT else "byte 0xc1 (never used)"


def _undecodable(why: str) -> ProtocolError:
    return ProtocolError(f"undecodable MessagePack frame ({why})")


def _tables() -> tuple[bytes, tuple[int, ...], bytes]:
    """Per marker byte: what it starts (``_WHAT``), its cost and size if fixed-size."""
    what = bytearray(256)
    cost = [0] * 256
    size = bytearray(256)
    for b in range(256):
        if b <= 0x7F or b >= 0xE0:  # fixints
            what[b], size[b], cost[b] = _FIXED, 1, _INT if 0xE0 <= b <= 0xFA else 0
        elif b <= 0x8F or b in (0xDE, 0xDF):
            what[b] = _MAP
        elif b <= 0x9F or b in (0xDC, 0xDD):
            what[b] = _ARRAY
        elif b <= 0xBF or b in (0xD9, 0xDA, 0xDB):
            what[b] = _STR
        elif b in (0xC4, 0xC5, 0xC6):
            what[b] = _BIN
        elif b in _EXT_AT:
            what[b] = _EXT
        elif b == 0xC1:
            what[b] = _NEVER_USED
        else:  # nil, false, true, floats, sized ints
            what[b] = _FIXED
            size[b] = {0xC0: 1, 0xC2: 1, 0xC3: 1, 0xCA: 5, 0xCB: 9}.get(b) or (
                1 + (1 << ((b - 0xCC) & 3))
            )
            if b in (0xCA, 0xCB):
                cost[b] = _FLOAT
            elif b in (0xCF, 0xD3):
                cost[b] = _BIG_INT
            elif b not in (0xC0, 0xC2, 0xC3, 0xCC):  # uint8 holds 0..255: cached ints
                cost[b] = _INT  # (int8 is used for -128..-33 only; others are never cached)
    return bytes(what), tuple(cost), bytes(size)


_FIXED, _MAP, _ARRAY, _STR, _BIN, _EXT, _NEVER_USED = range(7)
_WHAT, _COST, _SIZE = _tables()
#: (pattern, stride, cost of each) for runs of one fixed-size kind of value in a list.
_RUNS: Final = {
    **dict.fromkeys([*range(0x80), 0xC0, 0xC2, 0xC3, *range(0xFB, 0x100)], (_FREE_RUN, 1, 0)),
    **dict.fromkeys(range(0xE0, 0xFB), (_NEG_RUN, 1, _INT)),
    0xCB: (_FLOAT64_RUN, 9, _FLOAT),
    0xCD: (_UINT16_RUN, 3, _INT),
}
#: Lists longer than this are looked at for runs.
_RUN_FROM: Final = 8


def measure(data: bytes, start: int, end: int, budget: int | None) -> str | None:
    """Check the frame body ``data[start:end]`` before it is decoded.

    Returns its top-level ``"t"`` when that is a str (else None). Raises
    :class:`ProtocolError` when the body is not one map, is malformed, holds an
    extension type, nests deeper than :data:`MAX_DEPTH`, or would decode into
    more than ``budget`` bytes of objects (None: no limit).
    """
    return _walk(data, start, end, sys.maxsize if budget is None else budget)[0]


def decode_cost(body: bytes) -> int:
    """The bytes of objects that decoding the frame body ``body`` may take, at most."""
    return _walk(body, 0, len(body), sys.maxsize)[1]


def _walk(data: bytes, start: int, end: int, limit: int) -> tuple[str | None, int]:
    if start >= end:
        raise _undecodable("empty body")
    first = data[start]
    if _WHAT[first] != _MAP:
        raise ProtocolError(f"frame holds a {_kind(first)}, not a map")
    what_of, cost_of, size_of, runs = _WHAT, _COST, _SIZE, _RUNS
    pos = start
    cost = end - start  # (the decoder's own bookkeeping: about one byte a byte)
    left = 1  # values still to read in the current container (the root: one)
    in_map = False
    depth = 0
    stack: list[int] = []  # enclosing containers: left << 1 | in_map
    keys_seen: set[bytes] = set()
    tag: str | None = None
    tag_next = False  # the value read next is the top-level "t"
    while True:
        if not left:
            if cost > limit:
                raise _over_budget(end - start, limit)
            if not stack:
                break
            packed = stack.pop()
            left, in_map = packed >> 1, bool(packed & 1)
            depth -= 1
            continue
        if pos >= end:
            raise _undecodable(f"it ends inside a value, at byte {pos - start}")
        b = data[pos]
        what = what_of[b]
        if what == _FIXED:
            if left > _RUN_FROM and not in_map:  # a long list: take a run of these at once
                pattern, stride, each = runs.get(b) or (None, 0, 0)
                if pattern is not None:
                    found = pattern.match(data, pos, min(end, pos + left * stride))
                    count = (found.end() - pos) // stride if found is not None else 0
                    if count:
                        pos += count * stride
                        left -= count
                        cost += count * each
                        continue
            pos += size_of[b]
            cost += cost_of[b]
            left -= 1
            tag_next = False
            continue
        is_key = in_map and not left & 1
        this_is_tag, tag_next = tag_next, False
        left -= 1
        if what == _STR:
            if b <= 0xBF:
                n, a = b & 0x1F, pos + 1
            else:
                width = 1 << (b - 0xD9)
                n, a = int.from_bytes(data[pos + 1 : pos + 1 + width], "big"), pos + 1 + width
            z = a + n
            if z > end:
                raise _undecodable(f"a str of {n} bytes runs past the end of the frame")
            if n == 0 or (n == 1 and data[a] < 0x80):
                size = 0  # the decoder's cached strings
            elif _NON_ASCII.search(data, a, z) is None:
                size = _ASCII_STR + n
            else:
                try:  # (msgpack refuses a str that is not UTF-8: so does this)
                    data[a:z].decode()
                except UnicodeDecodeError:
                    raise _undecodable("a str that is not UTF-8") from None
                size = _WIDE_STR + 4 * n
            if is_key:
                if n <= _DEDUPE_KEYS_UP_TO:
                    key = data[a:z]
                    if key in keys_seen:
                        size = 0
                    else:
                        if len(keys_seen) < _KEYS_REMEMBERED:
                            keys_seen.add(key)
                        size += _INTERNED
                    if depth == 1 and key == b"t":
                        tag, tag_next = None, True  # (the last "t" counts, as in a dict)
                else:
                    size += _INTERNED
            elif this_is_tag:
                try:
                    tag = data[a:z].decode() if n <= 64 else f"(a str of {n} bytes)"
                except UnicodeDecodeError:
                    raise _undecodable("a str that is not UTF-8") from None
            cost += size
            pos = z
        elif what in (_MAP, _ARRAY):
            if b <= 0x9F:
                n, pos = b & 0x0F, pos + 1
            else:
                width = 2 if b in (0xDC, 0xDE) else 4
                n = int.from_bytes(data[pos + 1 : pos + 1 + width], "big")
                pos += 1 + width
            items = 2 * n if what == _MAP else n
            if items > end - pos:
                raise _undecodable(f"a container of {n} items cannot fit in {end - pos} bytes")
            cost += _dict_cost(n) if what == _MAP else _LIST + 8 * n
            if n:
                depth += 1
                if depth > MAX_DEPTH:
                    raise ProtocolError(f"frame nests deeper than {MAX_DEPTH} levels")
                stack.append(left << 1 | in_map)
                left, in_map = items, what == _MAP
        elif what == _BIN:
            width = 1 << (b - 0xC4)
            n = int.from_bytes(data[pos + 1 : pos + 1 + width], "big")
            pos += 1 + width + n
            if pos > end:
                raise _undecodable(f"a bin of {n} bytes runs past the end of the frame")
            if n > 1:
                cost += _BYTES + n  # (b"" and one-byte bytes are cached)
        elif what == _EXT:
            code_at = _EXT_AT[b]
            if pos + code_at >= end:
                raise _undecodable(f"it ends inside a value, at byte {pos - start}")
            code = data[pos + code_at]
            raise refuse_extension(code - 256 if code >= 0x80 else code)
        else:
            raise _undecodable(f"byte 0xc1 (never used) at byte {pos - start}")
        if cost > limit:
            raise _over_budget(end - start, limit)
    if pos != end:
        raise _undecodable(
            f"{end - pos} bytes of extra data after the map"
            if pos < end
            else f"it ends inside a value, at byte {end - start}"
        )
    return tag, cost


def _over_budget(size: int, budget: int) -> ProtocolError:
    return ProtocolError(
        f"frame of {human_size(size)} would decode into more than {human_size(budget)} of "
        "objects (too many small values for its size); refused before decoding it"
    )
