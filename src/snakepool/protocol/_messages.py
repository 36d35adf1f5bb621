"""The messages of the worker protocol: small frozen dataclasses.

Each message travels as one MessagePack map whose ``"t"`` key names its type
(see ``docs/protocol.md``). :func:`to_wire` and :func:`from_wire` convert; the
latter validates every field and raises :class:`ProtocolError` naming it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Final

from ..errors import ProtocolError

__all__ = [
    "HOST_MESSAGES",
    "PROTOCOL_VERSION",
    "STREAM_WINDOW",
    "WORKER_MESSAGES",
    "Call",
    "CallMode",
    "Cancel",
    "Credit",
    "End",
    "Failure",
    "FailureKind",
    "Goodbye",
    "Hello",
    "HostCall",
    "HostFailure",
    "HostReply",
    "Init",
    "Item",
    "Log",
    "Message",
    "Ping",
    "Pong",
    "Result",
    "SessionDrop",
    "SessionSync",
    "StartupFailed",
    "Withdraw",
    "call_to_wire",
    "from_wire",
    "to_wire",
]

#: Bumped on any incompatible change; host and worker must agree exactly.
PROTOCOL_VERSION: Final = 2  # 2: calls wait in the worker; ``withdraw``
#: Items a worker may send on a stream before the host grants more with ``Credit``.
STREAM_WINDOW: Final = 64


class CallMode:
    """How the host wants a call answered."""

    CALL: Final = "call"  # one Result or Failure
    STREAM: Final = "stream"  # Items, then End or Failure
    CAST: Final = "cast"  # like CALL; the host discards the result

    ALL: Final = frozenset({CALL, STREAM, CAST})


class FailureKind:
    """Why a call failed in the worker; the host maps it to an exception."""

    APPLICATION: Final = "application"  # the handler raised
    UNKNOWN_COMMAND: Final = "unknown_command"
    BAD_ARGUMENTS: Final = "bad_arguments"  # arguments do not fit the signature
    SERIALIZATION: Final = "serialization"  # result not MessagePack-able / too large
    CANCELLED: Final = "cancelled"  # the host cancelled it
    WITHDRAWN: Final = "withdrawn"  # the host took it back before it started
    WRONG_MODE: Final = "wrong_mode"  # call() of a stream command or vice versa


#: (attribute, wire key, accepted types) for every field of a message.
WireSpec = tuple[tuple[str, str, tuple[type, ...]], ...]


class Message:
    """Base of every protocol message."""

    __slots__ = ()
    TAG: ClassVar[str]
    WIRE: ClassVar[WireSpec]


_STR = (str,)
_INT = (int,)
_OPT_STR = (str, type(None))
_OPT_FLOAT = (float, int, type(None))
_ANY: tuple[type, ...] = ()  # any MessagePack value


# --- host -> worker ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Init(Message):
    """First frame the host sends: who the worker is and what to load."""

    version: int
    worker_id: int
    pool: str
    adapter: str
    config: dict[str, Any] = field(default_factory=dict)
    concurrency: int = 1
    max_frame_bytes: int = 64 * 2**20
    sys_path: list[str] = field(default_factory=list)

    TAG: ClassVar[str] = "init"
    WIRE: ClassVar[WireSpec] = (
        ("version", "v", _INT),
        ("worker_id", "w", _INT),
        ("pool", "p", _STR),
        ("adapter", "a", _STR),
        ("config", "c", (dict,)),
        ("concurrency", "n", _INT),
        ("max_frame_bytes", "m", _INT),
        ("sys_path", "s", (list,)),
    )


@dataclass(frozen=True, slots=True)
class Call(Message):
    """Run ``command(**args)``."""

    id: int
    command: str
    args: dict[str, Any]
    mode: str = CallMode.CALL
    timeout: float | None = None
    session_id: str | None = None

    TAG: ClassVar[str] = "call"
    WIRE: ClassVar[WireSpec] = (
        ("id", "i", _INT),
        ("command", "c", _STR),
        ("args", "a", (dict,)),
        ("mode", "m", _STR),
        ("timeout", "o", _OPT_FLOAT),
        ("session_id", "s", _OPT_STR),
    )


@dataclass(frozen=True, slots=True)
class Cancel(Message):
    """Stop call ``id`` (cooperatively); the worker still answers it."""

    id: int

    TAG: ClassVar[str] = "cancel"
    WIRE: ClassVar[WireSpec] = (("id", "i", _INT),)


@dataclass(frozen=True, slots=True)
class Withdraw(Message):
    """Give call ``id`` back if it has not started; one that has is left to finish.

    A call still waiting in the worker is dropped and answered with a
    ``Failure`` of kind ``withdrawn`` (the host sends it elsewhere); for any
    other call the message is ignored.
    """

    id: int

    TAG: ClassVar[str] = "withdraw"
    WIRE: ClassVar[WireSpec] = (("id", "i", _INT),)


@dataclass(frozen=True, slots=True)
class Credit(Message):
    """Stream ``id`` may send ``n`` more items (the host consumed that many)."""

    id: int
    n: int

    TAG: ClassVar[str] = "credit"
    WIRE: ClassVar[WireSpec] = (("id", "i", _INT), ("n", "n", _INT))


@dataclass(frozen=True, slots=True)
class SessionSync(Message):
    """Open or refresh session ``session_id`` in the worker.

    ``variables`` is the full set of current values (the worker's cache is
    replaced); ``restore``, when not nil, is the persisted state the adapter's
    ``restore_session`` must rebuild from before the session's next call runs.
    """

    session_id: str
    version: int
    variables: dict[str, Any]
    restore: dict[str, Any] | None = None

    TAG: ClassVar[str] = "session"
    WIRE: ClassVar[WireSpec] = (
        ("session_id", "s", _STR),
        ("version", "v", _INT),
        ("variables", "a", (dict,)),
        ("restore", "r", (dict, type(None))),
    )


@dataclass(frozen=True, slots=True)
class SessionDrop(Message):
    """Session ``session_id`` ended (closed or expired): forget it."""

    session_id: str

    TAG: ClassVar[str] = "session_drop"
    WIRE: ClassVar[WireSpec] = (("session_id", "s", _STR),)


@dataclass(frozen=True, slots=True)
class HostReply(Message):
    """Host tool call ``id`` returned ``value``."""

    id: int
    value: Any

    TAG: ClassVar[str] = "host_reply"
    WIRE: ClassVar[WireSpec] = (("id", "i", _INT), ("value", "r", _ANY))


@dataclass(frozen=True, slots=True)
class HostFailure(Message):
    """Host tool call ``id`` failed (or no such tool is registered)."""

    id: int
    type: str
    message: str

    TAG: ClassVar[str] = "host_failure"
    WIRE: ClassVar[WireSpec] = (("id", "i", _INT), ("type", "y", _STR), ("message", "e", _STR))


@dataclass(frozen=True, slots=True)
class Ping(Message):
    """Health check: the worker's event loop answers ``Pong`` at once, even when busy."""

    id: int

    TAG: ClassVar[str] = "ping"
    WIRE: ClassVar[WireSpec] = (("id", "i", _INT),)


# --- worker -> host ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hello(Message):
    """The worker is ready: its version, pid, adapter and commands."""

    version: int
    pid: int
    worker_id: int
    adapter: str
    commands: list[str]

    TAG: ClassVar[str] = "hello"
    WIRE: ClassVar[WireSpec] = (
        ("version", "v", _INT),
        ("pid", "p", _INT),
        ("worker_id", "w", _INT),
        ("adapter", "a", _STR),
        ("commands", "c", (list,)),
    )


@dataclass(frozen=True, slots=True)
class StartupFailed(Message):
    """The worker could not start (import, ``setup``); it exits next."""

    type: str
    message: str
    traceback: str = ""

    TAG: ClassVar[str] = "startup_failed"
    WIRE: ClassVar[WireSpec] = (
        ("type", "y", _STR),
        ("message", "e", _STR),
        ("traceback", "b", _STR),
    )


@dataclass(frozen=True, slots=True)
class Result(Message):
    """Call ``id`` returned ``value``."""

    id: int
    value: Any

    TAG: ClassVar[str] = "result"
    WIRE: ClassVar[WireSpec] = (
        ("id", "i", _INT),
        ("value", "r", _ANY),
    )


@dataclass(frozen=True, slots=True)
class Failure(Message):
    """Call ``id`` failed in the worker."""

    id: int
    kind: str
    type: str
    message: str
    traceback: str = ""

    TAG: ClassVar[str] = "failure"
    WIRE: ClassVar[WireSpec] = (
        ("id", "i", _INT),
        ("kind", "k", _STR),
        ("type", "y", _STR),
        ("message", "e", _STR),
        ("traceback", "b", _STR),
    )


@dataclass(frozen=True, slots=True)
class Item(Message):
    """One item of stream ``id``."""

    id: int
    value: Any

    TAG: ClassVar[str] = "item"
    WIRE: ClassVar[WireSpec] = (
        ("id", "i", _INT),
        ("value", "r", _ANY),
    )


@dataclass(frozen=True, slots=True)
class End(Message):
    """Stream ``id`` is exhausted."""

    id: int

    TAG: ClassVar[str] = "end"
    WIRE: ClassVar[WireSpec] = (("id", "i", _INT),)


@dataclass(frozen=True, slots=True)
class Log(Message):
    """A ``logging`` record from worker code, forwarded to the host's logging."""

    level: int
    logger: str
    message: str

    TAG: ClassVar[str] = "log"
    WIRE: ClassVar[WireSpec] = (
        ("level", "l", _INT),
        ("logger", "n", _STR),
        ("message", "e", _STR),
    )


@dataclass(frozen=True, slots=True)
class HostCall(Message):
    """Worker code calls host tool ``tool(**args)`` during call ``call_id``."""

    id: int
    call_id: int
    tool: str
    args: dict[str, Any]

    TAG: ClassVar[str] = "host_call"
    WIRE: ClassVar[WireSpec] = (
        ("id", "i", _INT),
        ("call_id", "c", _INT),
        ("tool", "n", _STR),
        ("args", "a", (dict,)),
    )


@dataclass(frozen=True, slots=True)
class Pong(Message):
    """The answer to ``Ping`` ``id``."""

    id: int

    TAG: ClassVar[str] = "pong"
    WIRE: ClassVar[WireSpec] = (("id", "i", _INT),)


@dataclass(frozen=True, slots=True)
class Goodbye(Message):
    """A planned exit is coming (announced, so it is not taken for a crash)."""

    reason: str

    TAG: ClassVar[str] = "bye"
    WIRE: ClassVar[WireSpec] = (("reason", "e", _STR),)


HOST_MESSAGES: Final[frozenset[type[Message]]] = frozenset(
    {Init, Call, Cancel, Withdraw, Credit, Ping, SessionSync, SessionDrop, HostReply, HostFailure}
)
WORKER_MESSAGES: Final[frozenset[type[Message]]] = frozenset(
    {Hello, StartupFailed, Result, Failure, Item, End, Log, Pong, Goodbye, HostCall}
)
_BY_TAG: Final[dict[str, type[Message]]] = {m.TAG: m for m in HOST_MESSAGES | WORKER_MESSAGES}
_OPTIONAL: Final[dict[type[Message], frozenset[str]]] = {
    cls: frozenset(
        f.name
        for f in fields(cls)  # type: ignore[arg-type]
        if f.default is not f.default_factory  # has a default of either kind
    )
    for cls in _BY_TAG.values()
}


# The two messages of every call are built without the dataclass ``__init__``
# (a frozen dataclass sets each field through ``object.__setattr__``, about
# 0.15 us a field): the slots are set through their descriptors. Same object,
# same validation (done by the callers below); tests pin the equality.
_new_message = object.__new__
_set_result_id, _set_result_value = (getattr(Result, name).__set__ for name in ("id", "value"))
_CALL_SETTERS = tuple(
    getattr(Call, name).__set__
    for name in ("id", "command", "args", "mode", "timeout", "session_id")
)


#: A well-formed call map's fields: id, command, args, mode, timeout, session.
CallFields = tuple[int, str, dict[str, Any], str, float | int | None, str | None]


def call_fields(wire: dict[str, Any]) -> CallFields | None:
    """The fields of a ``call`` map (its tag aside) when they have the types
    ``Call`` requires, else None (``from_wire`` then says what is wrong).

    For readers that handle a usual call without making the message object.
    """
    call_id, command, args = wire.get("i"), wire.get("c"), wire.get("a")
    mode = wire.get("m", CallMode.CALL)
    timeout, session = wire.get("o"), wire.get("s")
    if (
        type(call_id) is int
        and type(command) is str
        and type(args) is dict
        and type(mode) is str
        and (timeout is None or type(timeout) is float or type(timeout) is int)
        and (session is None or type(session) is str)
    ):
        return call_id, command, args, mode, timeout, session
    return None


def _plain_call(wire: dict[str, Any]) -> Call | None:
    fields = call_fields(wire)
    if fields is None:
        return None
    call: Call = _new_message(Call)  # (see _CALL_SETTERS)
    for set_field, value in zip(_CALL_SETTERS, fields, strict=True):
        set_field(call, value)
    return call


def call_to_wire(
    call_id: int,
    command: str,
    args: dict[str, Any],
    mode: str,
    timeout: float | None,
    session_id: str | None,
) -> dict[str, Any]:
    """``to_wire(Call(...))`` without making the message object (the host's hot path)."""
    return {
        "t": Call.TAG,
        "i": call_id,
        "c": command,
        "a": args,
        "m": mode,
        "o": timeout,
        "s": session_id,
    }


def to_wire(message: Message) -> dict[str, Any]:
    """The MessagePack map for ``message``."""
    wire: dict[str, Any] = {"t": message.TAG}
    for attr, key, _ in message.WIRE:
        wire[key] = getattr(message, attr)
    return wire


def from_wire(wire: dict[str, Any]) -> Message:
    """The message a decoded map holds; :class:`ProtocolError` if malformed."""
    tag = wire.get("t")
    # The two messages of every call, checked by hand (same rules, a few
    # microseconds less per call); anything unusual takes the general path.
    if tag == "result":
        call_id = wire.get("i")
        if type(call_id) is int and "r" in wire:
            result: Result = _new_message(Result)  # (see _CALL_SETTERS)
            _set_result_id(result, call_id)
            _set_result_value(result, wire["r"])
            return result
    elif tag == "call":
        call = _plain_call(wire)
        if call is not None:
            return call
    cls = _BY_TAG.get(tag) if isinstance(tag, str) else None
    if cls is None:
        raise ProtocolError(f"unknown message type {tag!r}")
    kwargs: dict[str, Any] = {}
    optional = _OPTIONAL[cls]
    for attr, key, types in cls.WIRE:
        if key not in wire:
            if attr in optional:
                continue
            raise ProtocolError(f"{cls.TAG!r} message lacks field {attr!r}")
        value = wire[key]
        if types and (not isinstance(value, types) or isinstance(value, bool)):
            raise ProtocolError(
                f"{cls.TAG!r} message field {attr!r} is {type(value).__name__}, "
                f"expected {' or '.join(t.__name__ for t in types)}"
            )
        kwargs[attr] = value
    return cls(**kwargs)
