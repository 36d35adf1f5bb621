"""The fork server's control protocol: its messages and its codec, sans-IO.

A pool with ``preload`` talks to its template (``python -m snakepool.workers
--template``, see :mod:`snakepool.workers._template`) over a Unix stream
socket, in the snakepool framing; each map names its message in ``"op"``::

    host -> template  TemplateInit, then Spawn (its 3 fds ride on its first byte)
    template -> host  Importing (before each import), then Ready, or Unsafe or
                      ImportFailed (then it exits); Spawned or SpawnFailed for
                      each Spawn; Exited when a worker it forked ends

:class:`TemplateConnection` turns them into frames and back; passing the fds
(``SCM_RIGHTS``) is the I/O code's business on either side.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from ..errors import ProtocolError
from ._connection import ReceiveError, Role
from ._framing import FrameDecoder, FrameEncoder, Sentinel
from ._messages import _NONE, Message, _shown, message, wire

__all__ = [
    "TEMPLATE_HOST_MESSAGES",
    "TEMPLATE_MESSAGES",
    "Exited",
    "ImportFailed",
    "Importing",
    "Ready",
    "Spawn",
    "SpawnFailed",
    "Spawned",
    "TemplateConnection",
    "TemplateInit",
    "Unsafe",
]


# --- host -> template ------------------------------------------------------------


@message("init", tag_key="op")
@dataclass(slots=True)
class TemplateInit(Message):
    """The template's first message: paths to apply, modules to import."""

    preload: list[str] = wire("preload", list)
    sys_path: list[str] = wire("sys_path", list)
    cwd: str | None = wire("cwd", str, _NONE, default=None)


@message("spawn", tag_key="op")
@dataclass(slots=True)
class Spawn(Message):
    """Fork a worker on the 3 fds (stdin, stdout, stderr) sent with this frame.

    With ``argv`` the child execs it in ``cwd`` (a fresh interpreter: the
    pool's start method is "spawn"); without, it becomes a worker in-process
    (forked warm).
    """

    id: int = wire("id", int)
    env: dict[str, str] = wire("env", dict)
    argv: list[str] | None = wire("argv", list, _NONE, default=None)
    cwd: str | None = wire("cwd", str, _NONE, default=None)


# --- template -> host ------------------------------------------------------------


@message("importing", tag_key="op")
@dataclass(slots=True)
class Importing(Message):
    """The template is about to import ``module``."""

    module: str = wire("module", str)


@message("ready", tag_key="op")
@dataclass(slots=True)
class Ready(Message):
    """Every module imported; the template takes ``Spawn`` from now on."""

    pid: int = wire("pid", int)
    modules: list[str] = wire("modules", list)
    import_seconds: float = wire("import_seconds", float, int)


@message("unsafe", tag_key="op")
@dataclass(slots=True)
class Unsafe(Message):
    """The template cannot fork safely (``reason``); it exits next."""

    reason: str = wire("reason", str)


@message("failed", tag_key="op")
@dataclass(slots=True)
class ImportFailed(Message):
    """Importing ``module`` raised; the template exits next."""

    module: str = wire("module", str)
    type: str = wire("type", str)
    message: str = wire("message", str)
    traceback: str = wire("traceback", str, default="")


@message("spawned", tag_key="op")
@dataclass(slots=True)
class Spawned(Message):
    """``Spawn`` ``id`` forked worker ``pid``."""

    id: int = wire("id", int)
    pid: int = wire("pid", int)


@message("spawn_failed", tag_key="op")
@dataclass(slots=True)
class SpawnFailed(Message):
    """``Spawn`` ``id`` forked nothing (``message`` says why)."""

    id: int = wire("id", int)
    message: str = wire("message", str)


@message("exited", tag_key="op")
@dataclass(slots=True)
class Exited(Message):
    """Worker ``pid`` ended with ``code`` (< 0: killed by that signal)."""

    pid: int = wire("pid", int)
    code: int = wire("code", int)


TEMPLATE_HOST_MESSAGES: Final[frozenset[type[Message]]] = frozenset({TemplateInit, Spawn})
TEMPLATE_MESSAGES: Final[frozenset[type[Message]]] = frozenset(
    {Importing, Ready, Unsafe, ImportFailed, Spawned, SpawnFailed, Exited}
)


class TemplateConnection:
    """One end of a host<->template control socket (``Role.HOST`` for the pool,
    ``Role.WORKER`` for the template), like :class:`Connection`: bytes in,
    messages out; messages in, bytes out. No I/O."""

    def __init__(self, role: Role) -> None:
        self.role = role
        self._decoder = FrameDecoder()
        self._encoder = FrameEncoder()
        host = role is Role.HOST
        self._may_send = TEMPLATE_HOST_MESSAGES if host else TEMPLATE_MESSAGES
        self._decoders: dict[str, Callable[[dict[str, Any]], Message]] = {
            cls.TAG: cls.from_wire
            for cls in (TEMPLATE_MESSAGES if host else TEMPLATE_HOST_MESSAGES)
        }
        self._side, self._peer = ("host", "template") if host else ("template", "host")
        self._broken: ReceiveError | None = None

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Message]:
        """The messages completed by ``data`` (``b""``: the peer closed the
        socket). :class:`ReceiveError` (with the good messages before the bad
        frame) when the peer broke the protocol; it stays broken."""
        if self._broken is not None:
            raise self._broken
        self._decoder.feed(data)
        messages: list[Message] = []
        try:
            while not isinstance(frame := self._decoder.next_frame(), Sentinel):
                messages.append(self._message(frame))
        except ProtocolError as exc:
            self._broken = ReceiveError(str(exc), [])
            raise ReceiveError(str(exc), messages) from None
        return messages

    def _message(self, frame: dict[str, Any]) -> Message:
        op = frame.get("op")
        decode = self._decoders.get(op) if isinstance(op, str) else None
        if decode is None:
            raise ProtocolError(f"the {self._peer} sent an unexpected message {_shown(op)}")
        return decode(frame)

    def send(self, message: Message) -> bytes:
        """The frame for ``message`` (``TypeError``/``ProtocolError`` if it cannot be sent)."""
        if type(message) not in self._may_send:
            raise ProtocolError(f"the {self._side} may not send {message.TAG!r}")
        return self._encoder.encode(message.to_wire())
