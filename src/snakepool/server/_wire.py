"""The client protocol of the local socket server: the same framing as the
workers (4-byte big-endian length + one MessagePack map), other messages.

Client -> server: ``hello`` first (with the token on TCP), then ``call``
(modes ``call``/``stream``/``cast``, optional ``session``), ``cancel``,
``credit``, ``status``, ``connections``, ``session`` operations. Server ->
client: ``welcome``, then ``result``/``failure``/``item``/``end`` by request
id, and ``error`` right before it drops a misbehaving client. See
``docs/protocol.md``.
"""

from __future__ import annotations

from dataclasses import asdict, is_dataclass
from typing import Any, Final

from ..errors import KINDS, ErrorCategory, RemoteError, SnakepoolError
from ..protocol import FrameDecoder, FrameEncoder

__all__ = [
    "CLIENT_MESSAGE_TYPES",
    "CLIENT_PROTOCOL_VERSION",
    "CLIENT_PROTOCOL_VERSIONS",
    "DECODE_FACTOR",
    "HELLO_FRAME_BYTES",
    "HELLO_TIMEOUT",
    "MAX_CLIENT_FRAME",
    "SERVER_KINDS",
    "SESSION_OPERATIONS",
    "STREAM_WINDOW",
    "error_from_wire",
    "error_to_wire",
    "jsonable",
    "new_decoder",
    "new_encoder",
]

#: The client protocol's version (its own: the worker protocol has another).
#: Version 2 added stream credit (``w``, ``credit``), ``connections``, a kind
#: ``k`` on every failure, ordering per session and back-pressure; a server
#: accepts every version in ``CLIENT_PROTOCOL_VERSIONS`` and serves them alike.
CLIENT_PROTOCOL_VERSION: Final = 2
CLIENT_PROTOCOL_VERSIONS: Final = (1, 2)
#: Frames from clients, once greeted (64 KiB before ``hello``).
MAX_CLIENT_FRAME: Final = 64 * 2**20
HELLO_FRAME_BYTES: Final = 64 * 1024
#: What a client may send; a frame of another type is refused before it is decoded.
CLIENT_MESSAGE_TYPES: Final = (
    "hello",
    "call",
    "cancel",
    "credit",
    "status",
    "connections",
    "session",
    "logs",  # snakepool.observability (docs/protocol.md, "Observing")
    "subscribe",
)
#: A client frame of n bytes may decode into at most this many times n bytes of
#: objects (plus 1 MiB). Ordinary data stays well below it: small records take
#: about 18 times their size, short strings about 23 times; empty maps take 73.
DECODE_FACTOR: Final = 32
#: A connection that has not said ``hello`` within this many seconds is closed.
HELLO_TIMEOUT: Final = 5.0
#: Stream items the Python client lets the server send ahead of its reader.
STREAM_WINDOW: Final = 64

#: Session operations: op -> (required argument names, optional ones).
SESSION_OPERATIONS: Final[dict[str, tuple[tuple[str, ...], tuple[str, ...]]]] = {
    "open": ((), ("ttl",)),
    "close": ((), ()),
    "define": (("name", "type", "initial"), ("constraints", "metadata")),
    "get": (("name",), ("default",)),
    "set": (("name", "value"), ("metadata",)),
    "get_many": (("names",), ()),
    "set_many": (("values",), ()),
}

#: Kinds of failures that are not snakepool errors (``snakepool.errors.KINDS``
#: holds the others); every ``failure`` frame carries one in ``k``.
SERVER_KINDS: Final[dict[str, str]] = {
    "bad_request": "the request is malformed: a field missing, of the wrong type or out of range",
    "unknown_pool": "no pool of that name is served",
    "invalid_value": "a session variable's definition or value breaks its rules",
    "undefined_variable": "set of a variable the session has not defined",
    "cancelled": "the client cancelled the request",
    "serialization": "the answer cannot be sent (not MessagePack, or over the frame limit)",
    "internal_error": "an unexpected error in the server (a bug; logged there)",
}
assert not set(SERVER_KINDS) & set(KINDS), "a server kind shadows an error kind"


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


def error_to_wire(request_id: int, exc: BaseException, kind: str | None = None) -> dict[str, Any]:
    """A ``failure`` frame for ``exc``: class name, kind, category, message, remote details.

    ``kind``: the ``k`` of an exception that is not a snakepool error (one of
    ``SERVER_KINDS``); a snakepool error always carries its own.
    """
    # (RemoteError's class: not the one also made an instance of, say,
    # ValueError for the host; ``rt`` names that type)
    cls = getattr(type(exc), "_remote_base", type(exc))
    wire: dict[str, Any] = {
        "t": "failure",
        "i": request_id,
        "y": cls.__name__,
        "g": exc.category.value
        if isinstance(exc, SnakepoolError)
        else ErrorCategory.APPLICATION.value,
        "e": _message(exc),
    }
    if isinstance(exc, SnakepoolError):
        wire["k"] = exc.kind  # (what clients match: never the message)
    elif kind is not None:
        wire["k"] = kind
    if isinstance(exc, RemoteError):
        wire.update(rt=exc.remote_type, rm=exc.remote_message, rb=exc.remote_traceback)
    return wire


def _message(exc: BaseException) -> str:
    """``e``: the error's text. A KeyError's ``str`` is the repr of its key, quotes
    and all; a remote one's is a RemoteError's (type, message, traceback) like any."""
    if isinstance(exc, KeyError) and not isinstance(exc, RemoteError) and exc.args:
        return str(exc.args[0])
    return str(exc)


def error_from_wire(wire: dict[str, Any]) -> Exception:
    """The exception a ``failure`` frame stands for, as the same class where snakepool
    has it: found by its kind ``k``, else (an older server) by its class name ``y``."""
    from .. import errors

    name = str(wire.get("y", "SnakepoolError"))
    message = str(wire.get("e", ""))
    cls_obj = errors.error_class(wire.get("k"))
    if cls_obj is None:
        by_name = getattr(errors, name, None)
        if isinstance(by_name, type) and issubclass(by_name, errors.SnakepoolError):
            cls_obj = by_name
    if "rt" in wire or (cls_obj is not None and issubclass(cls_obj, errors.RemoteError)):
        # (RemoteError and its subclasses of KINDS: UnknownCommand, BadArguments, ...)
        remote: type[errors.RemoteError] = errors.RemoteError
        if cls_obj is not None and issubclass(cls_obj, errors.RemoteError):
            remote = cls_obj
        remote_type = str(wire.get("rt", name))
        return remote(remote_type, str(wire.get("rm", message)), str(wire.get("rb", "")))
    if cls_obj is not None:
        return cls_obj(message)
    builtin = {
        "ValueError": ValueError,
        "TypeError": TypeError,
        "KeyError": KeyError,
        "LookupError": LookupError,
        "ConnectionError": ConnectionError,
    }
    error = builtin.get(name, errors.SnakepoolError)(message)
    kind = wire.get("k")
    if isinstance(kind, str):  # (what to switch on, as a snakepool error's own kind)
        error.kind = kind  # type: ignore[attr-defined]
    return error


def jsonable(value: Any) -> Any:
    """Dataclass snapshots (statistics) as plain maps for the wire."""
    if is_dataclass(value) and not isinstance(value, type):
        return {k: jsonable(v) for k, v in asdict(value).items()}
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value
