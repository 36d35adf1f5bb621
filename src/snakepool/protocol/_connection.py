"""One end of a host<->worker pipe, as a sans-IO state machine (like h11).

``receive_data(bytes)`` takes whatever was read (one byte works; ``b""`` means
the peer closed the stream) and returns the validated messages it completed;
``send(message)`` (or ``send_parts``) returns the bytes to write. The
connection checks direction (a worker never receives ``Hello``) and, on
receipt, the handshake order (the host speaks ``Init`` first; the worker
answers ``Hello`` or ``StartupFailed`` before anything but ``Log``). It never
touches a socket or a pipe. Every frame between a host and a worker goes
through one: the host's handle and the worker runtime use nothing else.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any

from ..errors import ProtocolError
from . import _values
from ._framing import DEFAULT_MAX_FRAME_BYTES, FrameDecoder, FrameEncoder, Sentinel
from ._messages import (
    BY_TAG,
    HOST_MESSAGES,
    WORKER_MESSAGES,
    Hello,
    Init,
    Log,
    Message,
    StartupFailed,
    _shown,
)

__all__ = ["Connection", "ReceiveError", "Role"]


class Role(enum.Enum):
    HOST = "host"
    WORKER = "worker"


_FIRST_FROM: dict[Role, tuple[type[Message], ...]] = {
    Role.HOST: (Init,),
    Role.WORKER: (Hello, StartupFailed),
}


class ReceiveError(ProtocolError):
    """The peer broke the protocol; ``received`` holds the good messages that
    came before the bad frame in the same read, in order (handle them first)."""

    def __init__(self, message: str, received: list[Message]) -> None:
        super().__init__(message)
        self.received = received


class Connection:
    """Protocol state for one end of the pipe.

    Receiving is for one thread at a time; sending is safe from any thread
    (and needs no handshake state, so a host may frame a call before it
    knows which worker takes it).
    """

    def __init__(self, role: Role, *, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        self.role = role
        self.peer = Role.WORKER if role is Role.HOST else Role.HOST
        # (values beyond MessagePack's own, both ways: see _values)
        self._decoder = FrameDecoder(max_frame_bytes, ext_hook=_values.ext_hook)
        self._encoder = FrameEncoder(max_frame_bytes, default=_values.default)
        self._may_send = HOST_MESSAGES if role is Role.HOST else WORKER_MESSAGES
        self._may_receive = WORKER_MESSAGES if role is Role.HOST else HOST_MESSAGES
        #: tag -> decoder, for the messages this end may receive (nothing else)
        self._decoders: dict[str, Callable[[dict[str, Any]], Message]] = {
            cls.TAG: cls.from_wire for cls in self._may_receive
        }
        #: class -> encoder, for the messages this end may send (nothing else)
        self._to_wire: dict[type[Message], Callable[[Message], dict[str, Any]]] = {
            cls: cls.to_wire for cls in self._may_send
        }
        self._received_first = False
        self._broken: ReceiveError | None = None

    @property
    def max_frame_bytes(self) -> int:
        return self._encoder.max_frame_bytes

    def set_max_frame_bytes(self, max_frame_bytes: int) -> None:
        """Change the frame limit both ways (a worker learns it from ``Init``)."""
        self._decoder = self._decoder.with_limit(max_frame_bytes)
        self._encoder = FrameEncoder(max_frame_bytes, default=_values.default)

    @property
    def missing_bytes(self) -> int:
        """Bytes still to come for the frame being received (0 between frames)."""
        return self._decoder.missing_bytes

    # --- receiving ---------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Message]:
        """The messages completed by ``data`` (bytes read from the peer), in order.

        ``b""`` means the peer closed the stream: an empty list if it did so
        between frames. Raises :class:`ReceiveError` (a :class:`ProtocolError`
        naming what is wrong, down to the field) when the peer broke the
        protocol; the connection then stays broken. Keeps no reference to
        ``data`` (a reused read buffer is fine).
        """
        if self._broken is not None:
            raise self._broken
        decoder = self._decoder
        if self._received_first:
            frames = decoder.whole_frames(data) if data else None
            if frames is not None:  # the usual read: whole frames, nothing pending
                decoders = self._decoders
                messages: list[Message] = []
                append = messages.append
                try:
                    for wire in frames:  # (a loop: cheaper than a comprehension for one)
                        append(decoders[wire["t"]](wire))
                except (KeyError, TypeError, ProtocolError):
                    return self._messages(frames, None)  # (says which one, and why)
                return messages
        decoder.feed(data)
        frames = []
        error: ProtocolError | None = None
        try:
            while not isinstance(frame := decoder.next_frame(), Sentinel):
                frames.append(frame)
        except ProtocolError as exc:
            error = exc
        return self._messages(frames, error)

    def _messages(self, frames: list[dict[str, Any]], error: ProtocolError | None) -> list[Message]:
        """``frames`` as messages, one at a time with every check; a bad one (or
        ``error``, after them all) raises ReceiveError with the good ones before it."""
        messages: list[Message] = []
        for frame in frames:
            try:
                messages.append(self._message(frame))
            except ProtocolError as exc:
                error = exc
                break
        if error is None:
            return messages
        self._broken = ReceiveError(str(error), [])  # (what a later read raises)
        raise ReceiveError(str(error), messages) from None

    def _message(self, frame: dict[str, Any]) -> Message:
        tag = frame.get("t")
        cls = BY_TAG.get(tag) if isinstance(tag, str) else None
        if cls is None:
            raise ProtocolError(f"unknown message type {_shown(tag)}")
        if cls not in self._may_receive:
            raise ProtocolError(
                f"{self.peer.value} sent {cls.TAG!r}, which only a {self.role.value} may send"
            )
        message = cls.from_wire(frame)
        if not self._received_first and cls is not Log:  # setup() may log before Hello
            if cls not in _FIRST_FROM[self.peer]:
                expected = " or ".join(repr(m.TAG) for m in _FIRST_FROM[self.peer])
                raise ProtocolError(
                    f"{self.peer.value}'s first message must be {expected}, got {cls.TAG!r}"
                )
            self._received_first = True
        return message

    # --- sending -----------------------------------------------------------

    def send(self, message: Message) -> bytes:
        """The frame for ``message``.

        ``TypeError`` if a value is not MessagePack-able (or nests deeper than
        the peer's decoder accepts), :class:`ProtocolError` if the frame is
        over ``max_frame_bytes``; nothing is sent in either case.
        """
        try:
            to_wire = self._to_wire[type(message)]
        except KeyError:
            to_wire = self._to_wire_of(message)
        return self._encoder.encode(to_wire(message))

    def send_parts(self, message: Message) -> tuple[bytes, bytes]:
        """``send`` as (header, body), for a vectored write of a large frame
        (its body is not copied into a frame)."""
        try:
            to_wire = self._to_wire[type(message)]
        except KeyError:
            to_wire = self._to_wire_of(message)
        return self._encoder.encode_parts(to_wire(message))

    def _to_wire_of(self, message: Message) -> Callable[[Message], dict[str, Any]]:
        """The encoder of a subclass of a message this end may send (the host's
        pending call is its ``Call`` message), learnt once; ProtocolError for
        any other message."""
        for cls in type(message).__mro__:
            to_wire = self._to_wire.get(cls)
            if to_wire is not None:
                self._to_wire[type(message)] = to_wire
                return to_wire
        raise ProtocolError(f"a {self.role.value} may not send {message.TAG!r}")
