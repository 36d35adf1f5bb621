"""Length-prefixed MessagePack framing, with no I/O at all.

A frame is a 4-byte big-endian length followed by that many bytes holding one
MessagePack map. :class:`FrameDecoder` buffers whatever bytes it is given (one
at a time works) and hands out whole maps; :class:`FrameEncoder` does the
reverse. Oversized frames are refused from their header alone, before their
body is buffered. MessagePack extension types are refused (naming their type
code). For a peer trusted with nothing, a decoder with a ``decode_factor``
also refuses, before decoding it, a frame that would decode into more than
that many times its size of Python objects, or whose message type is not one
it expects (see :mod:`._measure`).
"""

from __future__ import annotations

import collections
import enum
import struct
import threading
from collections.abc import Callable, Collection
from typing import Any, Final

import msgpack

from ..errors import ProtocolError
from ._measure import WORST_RATIO, measure
from ._measure import human_size as _human

__all__ = [
    "CLOSED",
    "DECODE_FLOOR_BYTES",
    "DEFAULT_MAX_FRAME_BYTES",
    "HEADER_BYTES",
    "MAX_NESTING",
    "NEED_DATA",
    "FrameDecoder",
    "FrameEncoder",
    "Sentinel",
]

HEADER_BYTES: Final = 4
DEFAULT_MAX_FRAME_BYTES: Final = 64 * 2**20
_MAX_HEADER_VALUE: Final = 2**32 - 1
_unpackb = msgpack.unpackb
_read_header = struct.Struct(">I").unpack_from
#: Reads up to this size are split with plain slices (a copy is cheaper than a view).
_COPY_SLICES_UP_TO: Final = 4096
#: What any frame may decode into on top of ``decode_factor`` times its size.
DECODE_FLOOR_BYTES: Final = 2**20
#: Frames this small are decoded without being measured first: even the worst
#: of them (under ``WORST_RATIO`` bytes of objects a byte) fits in the floor.
_UNMEASURED_UP_TO: Final = DECODE_FLOOR_BYTES // WORST_RATIO
#: Every extension value is refused by msgpack itself (timestamps included, which
#: bypass ``ext_hook``); :func:`._measure.measure` then names its type code.
_NO_EXT: Final = 0
#: Containers a frame may nest, its map included: msgpack's decoder stack. The
#: encoder refuses a deeper map (msgpack's packer alone would pack one level more).
MAX_NESTING: Final = 1024
_EXT_REFUSED: Final = "exceeds max_ext_len"
#: (max_ext_len, ext_hook, timestamp) for msgpack.unpackb: refuse every extension
#: value (msgpack's defaults otherwise), or decode them (see FrameDecoder's ext_hook).
_ExtOptions = tuple[int, Callable[[int, bytes], Any], int]
_NO_EXTENSIONS: Final[_ExtOptions] = (_NO_EXT, msgpack.ExtType, 0)
_ANY_EXT: Final = _MAX_HEADER_VALUE


class Sentinel(enum.Enum):
    """Markers returned instead of a frame (as in h11)."""

    NEED_DATA = "NEED_DATA"  # feed more bytes
    CLOSED = "CLOSED"  # the peer ended the stream cleanly between frames

    def __repr__(self) -> str:
        return self.value


NEED_DATA: Final = Sentinel.NEED_DATA
CLOSED: Final = Sentinel.CLOSED


#: A body this short cannot nest MAX_NESTING levels (each level takes a byte at least).
_SHALLOW_UP_TO: Final = MAX_NESTING
_CONTAINERS: Final = (dict, list, tuple)
#: Keys and items :func:`_few_containers` looks at before it gives up.
_LOOK_AT: Final = 64


def _few_containers(payload: dict[str, Any]) -> bool:
    """True when the map holds few containers (so it cannot nest deep), seen
    from at most ``_LOOK_AT`` of its keys and items; False: not sure."""
    todo: list[Any] = [payload]
    budget = _LOOK_AT
    while todo:
        container = todo.pop()
        if isinstance(container, dict):
            budget -= len(container) * 2
            items = [*container.keys(), *container.values()] if budget >= 0 else ()
        else:
            budget -= len(container)
            items = container if budget >= 0 else ()
        if budget < 0:
            return False
        todo.extend(item for item in items if isinstance(item, _CONTAINERS))
    return True


class FrameEncoder:
    """Turns one MessagePack-able map into one frame's bytes; safe to share
    between threads (each thread packs with a packer of its own)."""

    def __init__(
        self,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        *,
        default: Callable[[Any], Any] | None = None,
    ) -> None:
        """``default``: msgpack's hook for values it cannot pack (extension types)."""
        if not 0 < max_frame_bytes <= _MAX_HEADER_VALUE:
            raise ValueError(f"max_frame_bytes must be in 1..{_MAX_HEADER_VALUE}")
        self.max_frame_bytes = max_frame_bytes
        self.default = default
        self._check_from = min(max_frame_bytes, _SHALLOW_UP_TO)
        self._local = threading.local()

    def encode(self, payload: dict[str, Any]) -> bytes:
        """Frame ``payload``.

        Raises ``TypeError`` naming the type that MessagePack cannot encode (or
        saying the map nests deeper than a decoder accepts) and
        :class:`ProtocolError` when the frame would exceed ``max_frame_bytes``.
        """
        try:
            body: bytes = self._local.packer.pack(payload)
        except Exception as exc:
            body = self._pack_again(payload, exc)
        size = len(body)
        if size > self._check_from:
            self._check_large(payload, size)
        return size.to_bytes(HEADER_BYTES, "big") + body

    def encode_parts(self, payload: dict[str, Any]) -> tuple[bytes, bytes]:
        """``encode`` as (header, body), for a vectored write of a large frame."""
        try:
            body: bytes = self._local.packer.pack(payload)
        except Exception as exc:
            body = self._pack_again(payload, exc)
        size = len(body)
        if size > self._check_from:  # (one comparison for the usual small frame)
            self._check_large(payload, size)
        return size.to_bytes(HEADER_BYTES, "big"), body

    def _check_large(self, payload: dict[str, Any], size: int) -> None:
        if size > self.max_frame_bytes:
            self._refuse(size)
        if size > _SHALLOW_UP_TO and not _few_containers(payload):
            self._check_nesting(payload)

    def _check_nesting(self, payload: dict[str, Any]) -> None:
        """Refuse a map nested deeper than MAX_NESTING levels (for a large frame
        with many containers, the only kind that can): msgpack packs one level
        more than it unpacks, so the map is packed again one level down, as the
        only item of an array, which then reaches the packer's limit."""
        try:
            self._local.packer.pack((payload,))
        except ValueError:
            raise TypeError(
                f"not MessagePack-serializable: nests deeper than {MAX_NESTING} levels"
            ) from None

    def _pack_again(self, payload: dict[str, Any], exc: Exception) -> bytes:
        """A packer for this thread (its first frame), or the error, explained."""
        if isinstance(exc, AttributeError) and not hasattr(self._local, "packer"):
            # One reusable Packer per thread (it resets itself, even when packing raises).
            self._local.packer = msgpack.Packer(
                use_bin_type=True, autoreset=True, default=self.default
            )
            try:
                return self._local.packer.pack(payload)  # type: ignore[no-any-return]
            except Exception as again:
                exc = again
        if isinstance(exc, ValueError) and "recursion" in str(exc):
            raise TypeError(
                f"not MessagePack-serializable: nests deeper than {MAX_NESTING} levels"
            ) from None
        if isinstance(exc, TypeError | ValueError | OverflowError):
            raise TypeError(f"not MessagePack-serializable: {exc}") from None
        raise exc

    def _refuse(self, size: int) -> None:
        shown, limit = _sizes(size, self.max_frame_bytes)
        raise ProtocolError(f"frame of {shown} exceeds max_frame_bytes={limit}")


class FrameDecoder:
    """Buffers bytes and yields one decoded map per complete frame.

    Once it has raised :class:`ProtocolError` it stays broken: every later
    call raises the same error and further bytes are dropped, not buffered.
    """

    def __init__(
        self,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        *,
        decode_factor: int | None = None,
        message_types: Collection[str] | None = None,
        ext_hook: Callable[[int, bytes], Any] | None = None,
    ) -> None:
        """``decode_factor`` (for a peer trusted with nothing): a frame of n bytes
        may decode into at most ``decode_factor * n + DECODE_FLOOR_BYTES`` bytes
        of objects, measured before it is decoded. ``message_types``: the only
        top-level ``"t"`` values accepted (checked before decoding when measured).
        ``ext_hook`` (for a trusted peer): decodes extension values (timestamps
        become aware datetimes); without it every extension value is refused.
        """
        if not 0 < max_frame_bytes <= _MAX_HEADER_VALUE:
            raise ValueError(f"max_frame_bytes must be in 1..{_MAX_HEADER_VALUE}")
        if decode_factor is not None and decode_factor < 1:
            raise ValueError("decode_factor must be at least 1 (or None: no limit)")
        self.max_frame_bytes = max_frame_bytes
        self.decode_factor = decode_factor
        self.message_types = tuple(message_types) if message_types is not None else None
        self.ext_hook = ext_hook
        #: msgpack's max_ext_len, ext_hook and timestamp options (the defaults refuse them all)
        self._ext: _ExtOptions = _NO_EXTENSIONS if ext_hook is None else (_ANY_EXT, ext_hook, 3)
        #: Frames up to this size are decoded without being measured first.
        self._unmeasured = (
            max_frame_bytes if decode_factor is None else min(max_frame_bytes, _UNMEASURED_UP_TO)
        )
        self._buffer = bytearray()
        self._body_length: int | None = None  # known once a header was read
        self._ready: collections.deque[dict[str, Any]] = collections.deque()
        self._eof = False
        self._error: ProtocolError | None = None

    def with_limit(self, max_frame_bytes: int) -> FrameDecoder:
        """This decoder's state (buffered bytes included) under another limit."""
        fresh = FrameDecoder(
            max_frame_bytes,
            decode_factor=self.decode_factor,
            message_types=self.message_types,
            ext_hook=self.ext_hook,
        )
        fresh._buffer, fresh._body_length = self._buffer, self._body_length
        fresh._ready = self._ready
        fresh._eof, fresh._error = self._eof, self._error
        return fresh

    @property
    def buffered_bytes(self) -> int:
        return len(self._buffer)

    @property
    def missing_bytes(self) -> int:
        """Bytes still to come for the frame being read (0 between frames)."""
        if self._body_length is None:
            return 0
        return max(0, self._body_length - len(self._buffer))

    @property
    def whole_frame_bytes(self) -> int:
        """The body size of the next frame when all of it is buffered and nothing is
        ready before it, else 0: what the next :meth:`next_frame` will decode."""
        if self._ready or self._error is not None:
            return 0
        length, available = self._body_length, len(self._buffer)
        if length is None:  # (its header may be buffered, not read yet)
            if available < HEADER_BYTES:
                return 0
            length = int.from_bytes(self._buffer[:HEADER_BYTES], "big")
            available -= HEADER_BYTES
        return length if length <= available else 0

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Add bytes; ``b""`` means the peer closed the stream."""
        if self._error is not None:
            return
        if not data:
            self._eof = True
            return
        if self._eof:
            self._fail("data received after end of stream")
            return
        start = 0
        if self._body_length is None and not self._buffer:  # usual: whole frames in ``data``
            start = self._split_whole_frames(data, self._ready.append)
            if start == len(data):
                return
        self._buffer += data[start:] if start else data
        if self._body_length is None and not self._ready:  # (else next_frame reads it)
            self._read_header()

    def _split_whole_frames(
        self, data: bytes | bytearray | memoryview, keep: Callable[[dict[str, Any]], None]
    ) -> int:
        """Decode the complete, valid frames at the start of ``data`` into ``keep``.

        Returns how many bytes were used. Anything else (a partial frame, a
        bad header, an undecodable body) is left for the buffered path, which
        reports it once the frames before it have been handed out.
        """
        end = len(data)
        types = self.message_types
        if end > _COPY_SLICES_UP_TO:  # large: slices of a view, not copies
            with memoryview(data) as view:
                return _split(view, end, self._unmeasured, types, keep, self._ext)
        return _split(data, end, self._unmeasured, types, keep, self._ext)

    def whole_frames(self, data: bytes | bytearray | memoryview) -> list[dict[str, Any]] | None:
        """The maps of ``data`` when it is whole, valid frames and nothing is pending.

        A shortcut for a reader that handles the usual frames itself: nothing
        is buffered or queued either way. None means "not that simple" (bytes
        or frames are pending, the stream ended or broke, or ``data`` holds a
        partial or bad frame): feed ``data`` to :meth:`feed` instead.
        """
        if self._buffer or self._ready or self._eof or self._error is not None:
            return None
        frames: list[dict[str, Any]] = []
        return frames if self._split_whole_frames(data, frames.append) == len(data) else None

    def next_frame(self) -> dict[str, Any] | Sentinel:
        """Return the next decoded map, ``NEED_DATA`` or ``CLOSED``."""
        if self._ready:  # (decoded before any error that follows them)
            return self._ready.popleft()
        if self._error is not None:
            raise self._error
        if not self._buffer and not self._eof:  # the usual end of a read
            return NEED_DATA
        if self._body_length is None and not self._read_header():
            return self._at_incomplete(needed=HEADER_BYTES)
        length = self._body_length
        assert length is not None
        if len(self._buffer) < length:
            return self._at_incomplete(needed=length)
        payload = self._decode_body(length)
        del self._buffer[:length]  # amortized O(1): bytearray keeps a start offset
        self._body_length = None
        if self._buffer:
            self._read_header()
        return payload

    def _read_header(self) -> bool:
        if len(self._buffer) < HEADER_BYTES:
            return False
        length = int.from_bytes(self._buffer[:HEADER_BYTES], "big")
        if length > self.max_frame_bytes:
            shown, limit = _sizes(length, self.max_frame_bytes)
            self._fail(
                f"frame of {shown} announced, over max_frame_bytes={limit}; "
                "refused before reading it"
            )
            return False
        if length == 0:
            self._fail("empty frame (length 0); every frame holds one MessagePack map")
            return False
        del self._buffer[:HEADER_BYTES]
        self._body_length = length
        return True

    def _at_incomplete(self, needed: int) -> Sentinel:
        if self._error is not None:
            raise self._error
        if not self._eof:
            return NEED_DATA
        if self._body_length is None and not self._buffer:
            return CLOSED
        self._fail(
            f"stream ended mid-frame: have {len(self._buffer)} of {needed} bytes"
            + (" of the body" if self._body_length is not None else " of the header")
        )
        raise self._error  # type: ignore[misc]

    def _decode_body(self, length: int) -> dict[str, Any]:
        buffer = self._buffer
        try:
            if length > self._unmeasured:  # (a copy: measured and decoded as bytes)
                assert self.decode_factor is not None
                with memoryview(buffer) as whole, whole[:length] as view:
                    body = bytes(view)
                tag = measure(body, 0, length, self.decode_factor * length + DECODE_FLOOR_BYTES)
                self._check_type(tag)
                payload = _unpack(body, self._ext)
                del body
            else:
                with memoryview(buffer) as whole, whole[:length] as view:
                    payload = _unpack(view, self._ext)
        except ProtocolError as exc:
            self._fail(str(exc))
            raise self._error from None  # type: ignore[misc]
        except Exception as exc:
            if isinstance(exc, msgpack.StackError):  # (its message is empty)
                self._fail(f"frame nests deeper than {MAX_NESTING} levels")
                raise self._error from None  # type: ignore[misc]
            if _EXT_REFUSED in str(exc):
                try:
                    measure(bytes(buffer[:length]), 0, length, None)  # names the type code
                except ProtocolError as named:
                    self._fail(str(named))
                    raise self._error from None  # type: ignore[misc]
            self._fail(f"undecodable MessagePack frame ({type(exc).__name__}: {exc})")
            raise self._error from None  # type: ignore[misc]
        if not isinstance(payload, dict):
            self._fail(f"frame holds a {type(payload).__name__}, not a map")
            raise self._error  # type: ignore[misc]
        if length <= self._unmeasured and self.message_types is not None:
            try:
                self._check_type(payload.get("t"))
            except ProtocolError as exc:
                self._fail(str(exc))
                raise self._error from None  # type: ignore[misc]
        return payload

    def _check_type(self, tag: object) -> None:
        types = self.message_types
        if types is not None and (type(tag) is not str or tag not in types):
            shown = repr(tag) if not isinstance(tag, str | bytes) or len(tag) <= 40 else "(long)"
            raise ProtocolError(f"unknown message type {shown}; expected one of {', '.join(types)}")

    def _fail(self, message: str) -> None:
        self._error = ProtocolError(message)
        self._buffer = bytearray()
        self._ready.clear()


def _split(
    data: bytes | bytearray | memoryview,
    end: int,
    limit: int,
    types: tuple[str, ...] | None,
    keep: Callable[[dict[str, Any]], None],
    ext: _ExtOptions,
) -> int:
    """Decode whole, valid frames (of at most ``limit`` bytes, with a ``"t"`` in
    ``types`` unless that is None) from the start of ``data`` into ``keep``; the bytes used."""
    max_ext_len, ext_hook, timestamp = ext
    position = 0
    while end - position > HEADER_BYTES:
        body_start = position + HEADER_BYTES
        (length,) = _read_header(data, position)  # (a third of int.from_bytes of a slice)
        body_end = body_start + length
        if not 0 < length <= limit or body_end > end:
            break
        try:
            payload = _unpackb(
                data[body_start:body_end],
                raw=False,
                strict_map_key=False,
                max_ext_len=max_ext_len,
                ext_hook=ext_hook,
                timestamp=timestamp,
            )
        except Exception:
            break
        if type(payload) is not dict:
            break
        if types is not None:
            tag = payload.get("t")
            if type(tag) is not str or tag not in types:
                break
        keep(payload)
        position = body_end
    return position


def _sizes(size: int, limit: int) -> tuple[str, str]:
    """A size and the limit it is over, for a message: in bytes where the human
    forms would read the same ("64.0 MiB, over 64.0 MiB")."""
    shown, cap = _human(size), _human(limit)
    return (f"{size:,} bytes", f"{limit:,} bytes") if shown == cap else (shown, cap)


def _unpack(body: bytes | memoryview, ext: _ExtOptions) -> Any:
    max_ext_len, ext_hook, timestamp = ext
    return _unpackb(
        body,
        raw=False,
        strict_map_key=False,
        max_ext_len=max_ext_len,
        ext_hook=ext_hook,
        timestamp=timestamp,
    )
