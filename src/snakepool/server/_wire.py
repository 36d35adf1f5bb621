"""The client protocol of the local socket server: the same framing as the
workers (4-byte big-endian length + one MessagePack map), other messages.

Client -> server: ``hello`` first (with the token on TCP), then ``call``
(modes ``call``/``stream``/``cast``, optional ``session``), ``cancel``,
``status``, ``session`` operations. Server -> client: ``welcome``, then ``result``/``failure``/``item``/``end`` by request id, and
``error`` right before it drops a misbehaving client. See ``docs/protocol.md``.
"""

from __future__ import annotations

from dataclasses import asdict, is_dataclass
from typing import Any, Final

from ..errors import ErrorCategory, RemoteError, SnakepoolError
from ..protocol import FrameDecoder, FrameEncoder

__all__ = [
    "CLIENT_MESSAGE_TYPES",
    "CLIENT_PROTOCOL_VERSION",
    "DECODE_FACTOR",
    "MAX_CLIENT_FRAME",
    "error_from_wire",
    "error_to_wire",
    "jsonable",
    "new_decoder",
    "new_encoder",
]

CLIENT_PROTOCOL_VERSION: Final = 1
#: Frames from clients, once greeted (64 KiB before ``hello``).
MAX_CLIENT_FRAME: Final = 64 * 2**20
#: What a client may send; a frame of another type is refused before it is decoded.
CLIENT_MESSAGE_TYPES: Final = ("hello", "call", "cancel", "status", "session")
#: A client frame of n bytes may decode into at most this many times n bytes of
#: objects (plus 1 MiB). Ordinary data stays well below it: small records take
#: about 18 times their size, short strings about 23 times; empty maps take 73.
DECODE_FACTOR: Final = 32


def new_decoder(
    max_frame_bytes: int = MAX_CLIENT_FRAME, *, decode_factor: int | None = None
) -> FrameDecoder:
    """A decoder; with ``decode_factor``, one for a client's frames (measured
    before they are decoded, of the client message types only)."""
    if decode_factor is None:
        return FrameDecoder(max_frame_bytes)
    return FrameDecoder(
        max_frame_bytes, decode_factor=decode_factor, message_types=CLIENT_MESSAGE_TYPES
    )


def new_encoder(max_frame_bytes: int = MAX_CLIENT_FRAME) -> FrameEncoder:
    return FrameEncoder(max_frame_bytes)


def error_to_wire(request_id: int, exc: BaseException) -> dict[str, Any]:
    """A ``failure`` frame for ``exc``: class name, category, message, remote details."""
    wire: dict[str, Any] = {
        "t": "failure",
        "i": request_id,
        # (RemoteError's class: not the one also made an instance of, say,
        # ValueError for the host; ``rt`` names that type)
        "y": getattr(type(exc), "_remote_base", type(exc)).__name__,
        "g": exc.category.value
        if isinstance(exc, SnakepoolError)
        else ErrorCategory.APPLICATION.value,
        "e": str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc),
    }
    if isinstance(exc, RemoteError):
        wire.update(rt=exc.remote_type, rm=exc.remote_message, rb=exc.remote_traceback)
    return wire


def error_from_wire(wire: dict[str, Any]) -> Exception:
    """The exception a ``failure`` frame stands for, as the same class where snakepool has it."""
    from .. import errors

    name = str(wire.get("y", "SnakepoolError"))
    message = str(wire.get("e", ""))
    if "rt" in wire:
        cls = errors.UnknownCommand if name == "UnknownCommand" else errors.RemoteError
        return cls(str(wire["rt"]), str(wire.get("rm", "")), str(wire.get("rb", "")))
    cls_obj = getattr(errors, name, None)
    if isinstance(cls_obj, type) and issubclass(cls_obj, errors.SnakepoolError):
        if cls_obj in (errors.WorkerStartError, errors.WorkerCrashed):
            return cls_obj(message)
        return cls_obj(message)
    builtin = {
        "ValueError": ValueError,
        "TypeError": TypeError,
        "KeyError": KeyError,
        "LookupError": LookupError,
    }
    if name == "ConnectionError":
        return ConnectionError(message)
    return builtin.get(name, errors.SnakepoolError)(message)


def jsonable(value: Any) -> Any:
    """Dataclass snapshots (statistics) as plain maps for the wire."""
    if is_dataclass(value) and not isinstance(value, type):
        return {k: jsonable(v) for k, v in asdict(value).items()}
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value
