"""Length-prefixed MessagePack framing, with no I/O at all.

A frame is a 4-byte big-endian length followed by that many bytes holding one
MessagePack map. :class:`FrameDecoder` buffers whatever bytes it is given (one
at a time works) and hands out whole maps; :func:`encode_frame` does the
reverse. Oversized frames are refused from their header alone, before their
body is buffered.
"""

from __future__ import annotations

import collections
import enum
from collections.abc import Callable
from typing import Any, Final

import msgpack

from ..errors import ProtocolError

__all__ = [
    "CLOSED",
    "DEFAULT_MAX_FRAME_BYTES",
    "HEADER_BYTES",
    "NEED_DATA",
    "FrameDecoder",
    "FrameEncoder",
    "Sentinel",
]

HEADER_BYTES: Final = 4
DEFAULT_MAX_FRAME_BYTES: Final = 64 * 2**20
_MAX_HEADER_VALUE: Final = 2**32 - 1
_unpackb = msgpack.unpackb
#: Reads up to this size are split with plain slices (a copy is cheaper than a view).
_COPY_SLICES_UP_TO: Final = 4096


class Sentinel(enum.Enum):
    """Markers returned instead of a frame (as in h11)."""

    NEED_DATA = "NEED_DATA"  # feed more bytes
    CLOSED = "CLOSED"  # the peer ended the stream cleanly between frames

    def __repr__(self) -> str:
        return self.value


NEED_DATA: Final = Sentinel.NEED_DATA
CLOSED: Final = Sentinel.CLOSED


def _human(n: int) -> str:
    if n >= 2**20:
        return f"{n / 2**20:.1f} MiB"
    if n >= 2**10:
        return f"{n / 2**10:.1f} KiB"
    return f"{n} bytes"


class FrameEncoder:
    """Turns one MessagePack-able map into one frame's bytes."""

    def __init__(self, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        if not 0 < max_frame_bytes <= _MAX_HEADER_VALUE:
            raise ValueError(f"max_frame_bytes must be in 1..{_MAX_HEADER_VALUE}")
        self.max_frame_bytes = max_frame_bytes
        # One reusable Packer: it resets itself when packing raises.
        self._packer = msgpack.Packer(use_bin_type=True, autoreset=True)

    def encode(self, payload: dict[str, Any]) -> bytes:
        """Frame ``payload``.

        Raises ``TypeError`` naming the type that MessagePack cannot encode and
        :class:`ProtocolError` when the frame would exceed ``max_frame_bytes``.
        """
        header, body = self.encode_parts(payload)
        return header + body

    def encode_parts(self, payload: dict[str, Any]) -> tuple[bytes, bytes]:
        """``encode`` as (header, body), for a vectored write of a large frame."""
        try:
            body: bytes = self._packer.pack(payload)
        except (TypeError, ValueError, OverflowError) as exc:
            raise TypeError(f"not MessagePack-serializable: {exc}") from None
        if len(body) > self.max_frame_bytes:
            self._refuse(len(body))
        return len(body).to_bytes(HEADER_BYTES, "big"), body

    def _refuse(self, size: int) -> None:
        raise ProtocolError(
            f"frame of {_human(size)} exceeds max_frame_bytes={_human(self.max_frame_bytes)}"
        )


class FrameDecoder:
    """Buffers bytes and yields one decoded map per complete frame.

    Once it has raised :class:`ProtocolError` it stays broken: every later
    call raises the same error and further bytes are dropped, not buffered.
    """

    def __init__(self, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        if not 0 < max_frame_bytes <= _MAX_HEADER_VALUE:
            raise ValueError(f"max_frame_bytes must be in 1..{_MAX_HEADER_VALUE}")
        self.max_frame_bytes = max_frame_bytes
        self._buffer = bytearray()
        self._body_length: int | None = None  # known once a header was read
        self._ready: collections.deque[dict[str, Any]] = collections.deque()
        self._eof = False
        self._error: ProtocolError | None = None

    def with_limit(self, max_frame_bytes: int) -> FrameDecoder:
        """This decoder's state (buffered bytes included) under another limit."""
        fresh = FrameDecoder(max_frame_bytes)
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
        if end > _COPY_SLICES_UP_TO:  # large: slices of a view, not copies
            with memoryview(data) as view:
                return _split(view, end, self.max_frame_bytes, keep)
        return _split(data, end, self.max_frame_bytes, keep)

    def whole_frames(self, data: bytes) -> list[dict[str, Any]] | None:
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
            self._fail(
                f"frame of {_human(length)} announced, over max_frame_bytes="
                f"{_human(self.max_frame_bytes)}; refused before reading it"
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
        try:
            with memoryview(self._buffer) as whole, whole[:length] as body:
                payload = _unpackb(body, raw=False, strict_map_key=False)
        except Exception as exc:
            self._fail(f"undecodable MessagePack frame ({type(exc).__name__}: {exc})")
            raise self._error from None  # type: ignore[misc]
        if not isinstance(payload, dict):
            self._fail(f"frame holds a {type(payload).__name__}, not a map")
            raise self._error  # type: ignore[misc]
        return payload

    def _fail(self, message: str) -> None:
        self._error = ProtocolError(message)
        self._buffer = bytearray()
        self._ready.clear()


def _split(
    data: bytes | bytearray | memoryview,
    end: int,
    limit: int,
    keep: Callable[[dict[str, Any]], None],
) -> int:
    """Decode whole, valid frames from the start of ``data`` into ``keep``; the bytes used."""
    position = 0
    while end - position > HEADER_BYTES:
        body_start = position + HEADER_BYTES
        length = int.from_bytes(data[position:body_start], "big")
        body_end = body_start + length
        if not 0 < length <= limit or body_end > end:
            break
        try:
            payload = _unpackb(data[body_start:body_end], raw=False, strict_map_key=False)
        except Exception:
            break
        if type(payload) is not dict:
            break
        keep(payload)
        position = body_end
    return position
