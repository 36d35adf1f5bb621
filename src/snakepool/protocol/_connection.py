"""One end of a host<->worker pipe, as a sans-IO state machine (like h11).

``receive_data(bytes)`` buffers, ``next_event()`` returns a message,
``NEED_DATA`` or ``CLOSED``; ``send(message)`` returns the bytes to write.
The connection checks direction (a worker never receives ``Hello``) and, on
receipt, the handshake order (the host speaks ``Init`` first; the worker
answers ``Hello`` or ``StartupFailed`` before anything but ``Log``). It never touches a socket or a pipe.
"""

from __future__ import annotations

import enum
from typing import Any

from ..errors import ProtocolError
from ._framing import DEFAULT_MAX_FRAME_BYTES, NEED_DATA, FrameDecoder, FrameEncoder, Sentinel
from ._messages import (
    HOST_MESSAGES,
    WORKER_MESSAGES,
    Hello,
    Init,
    Log,
    Message,
    StartupFailed,
    from_wire,
    to_wire,
)

__all__ = ["Connection", "Role"]


class Role(enum.Enum):
    HOST = "host"
    WORKER = "worker"


_FIRST_FROM: dict[Role, tuple[type[Message], ...]] = {
    Role.HOST: (Init,),
    Role.WORKER: (Hello, StartupFailed),
}


class Connection:
    """Protocol state for one end of the pipe."""

    def __init__(self, role: Role, *, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        self.role = role
        self.peer = Role.WORKER if role is Role.HOST else Role.HOST
        self._decoder = FrameDecoder(max_frame_bytes)
        self._encoder = FrameEncoder(max_frame_bytes)
        self._may_send = HOST_MESSAGES if role is Role.HOST else WORKER_MESSAGES
        self._may_receive = WORKER_MESSAGES if role is Role.HOST else HOST_MESSAGES
        self._received_first = False

    @property
    def max_frame_bytes(self) -> int:
        return self._encoder.max_frame_bytes

    def set_max_frame_bytes(self, max_frame_bytes: int) -> None:
        """Change the frame limit both ways (a worker learns it from ``Init``)."""
        self._decoder = self._decoder.with_limit(max_frame_bytes)
        self._encoder = FrameEncoder(max_frame_bytes)

    @property
    def missing_bytes(self) -> int:
        """Bytes still to come for the frame being received (0 between frames)."""
        return self._decoder.missing_bytes

    # --- receiving ---------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes read from the peer; ``b""`` means end of stream."""
        self._decoder.feed(data)

    def whole_frames(self, data: bytes) -> list[dict[str, Any]] | None:
        """The raw maps in ``data``, for a reader that handles the usual messages itself.

        Only after the handshake, and only when ``data`` is whole, valid frames
        with nothing pending (see :meth:`FrameDecoder.whole_frames`); nothing
        is buffered either way. The caller applies ``next_event``'s rules to
        each map itself, and feeds ``data`` to :meth:`receive_data` instead
        when any map is not one it handles.
        """
        return self._decoder.whole_frames(data) if self._received_first else None

    def next_event(self) -> Message | Sentinel:
        """The next message from the peer, or ``NEED_DATA`` / ``CLOSED``."""
        decoder = self._decoder
        if decoder._ready:  # (the usual case, checked here: this runs per message)
            frame: dict[str, Any] | Sentinel = decoder._ready.popleft()
        elif not decoder._buffer and not decoder._eof and decoder._error is None:
            return NEED_DATA  # (the usual end of a read)
        else:
            frame = decoder.next_frame()
            if isinstance(frame, Sentinel):
                return frame
        return self.message_from(frame)  # type: ignore[arg-type]

    def message_from(self, frame: dict[str, Any]) -> Message:
        """The message a decoded map holds, checked as ``next_event`` checks it
        (for maps from :meth:`whole_frames`); :class:`ProtocolError` if it is bad."""
        message = from_wire(frame)
        kind = type(message)
        if kind not in self._may_receive:
            raise ProtocolError(
                f"{self.peer.value} sent {message.TAG!r}, which only a {self.role.value} may send"
            )
        if not self._received_first and kind is not Log:  # setup() may log before Hello
            if not isinstance(message, _FIRST_FROM[self.peer]):
                expected = " or ".join(repr(m.TAG) for m in _FIRST_FROM[self.peer])
                raise ProtocolError(
                    f"{self.peer.value}'s first message must be {expected}, got {message.TAG!r}"
                )
            self._received_first = True
        return message

    # --- sending -----------------------------------------------------------

    def send(self, message: Message) -> bytes:
        """The frame for ``message``.

        ``TypeError`` if a value is not MessagePack-able, :class:`ProtocolError`
        if the frame is over ``max_frame_bytes``; nothing is sent in either case.
        """
        if type(message) not in self._may_send:
            raise ProtocolError(f"a {self.role.value} may not send {message.TAG!r}")
        return self._encoder.encode(to_wire(message))

    def encode_raw(self, wire: dict[str, Any]) -> bytes:
        """Frame an already-built map (for tests and tools)."""
        return self._encoder.encode(wire)
