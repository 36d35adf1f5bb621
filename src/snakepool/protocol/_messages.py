"""The messages of the worker protocol: small slots dataclasses.

Each message travels as one MessagePack map whose ``"t"`` key names its type
(see ``docs/protocol.md``). A message class declares each field's wire key
(and the types it accepts) once, with :func:`wire`; :func:`message` derives
the class's codec from those declarations when the class is created: a
``to_wire`` method and a ``from_wire`` function, both generated as straight-line
code (no loop over a table per message). ``from_wire`` validates every field
and raises :class:`ProtocolError` naming it. :class:`._connection.Connection`
is what turns messages into frames and back.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import MISSING, dataclass
from typing import Any, ClassVar, Final, TypeVar

from ..errors import ProtocolError

__all__ = [
    "HOST_MESSAGES",
    "PROTOCOL_VERSION",
    "RESERVED_TOOL_PREFIX",
    "SAVE_STATE_TOOL",
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
    "from_wire",
    "message",
    "to_wire",
    "wire",
]

#: Bumped on any incompatible change; host and worker must agree exactly.
PROTOCOL_VERSION: Final = 2  # 2: calls wait in the worker; ``withdraw``
#: Items a worker may send on a stream before the host grants more with ``Credit``.
STREAM_WINDOW: Final = 64
#: The host tool behind ``ctx.save_state``: a ``HostCall`` of this tool stores
#: ``{"key", "value"}`` in the session's state. Reserved (like every tool name
#: starting with :data:`RESERVED_TOOL_PREFIX`): users cannot register it.
SAVE_STATE_TOOL: Final = "__snakepool_save_state__"
#: Tool names starting with this are the protocol's own.
RESERVED_TOOL_PREFIX: Final = "__snakepool"


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


_NONE = type(None)
#: (attribute, wire key, accepted types) for every field of a message; derived.
WireSpec = tuple[tuple[str, str, tuple[type, ...]], ...]


def wire(
    key: str,
    *types: type,
    default: Any = MISSING,
    default_factory: Any = MISSING,
    omit_none: bool = False,
) -> Any:
    """Declare a message field: its wire ``key`` and the exact types it accepts
    (none: any MessagePack value; ``type(None)``: nil), with an optional default.
    ``omit_none``: the key is left out of the map while the value is None."""
    metadata = {"wire": key, "types": types, "omit_none": omit_none}
    if default_factory is not MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    if default is not MISSING:
        return dataclasses.field(default=default, metadata=metadata)
    return dataclasses.field(metadata=metadata)


class Message:
    """Base of every protocol message (made with :func:`message`)."""

    __slots__ = ()
    TAG: ClassVar[str]
    #: The map key that holds ``TAG`` (``"t"``; the fork server's messages: ``"op"``).
    TAG_KEY: ClassVar[str]
    #: Derived from the fields' :func:`wire` declarations, for introspection.
    WIRE: ClassVar[WireSpec]
    #: The generated decoder: a map with this class's tag -> the message.
    from_wire: ClassVar[Callable[[dict[str, Any]], Message]]

    def to_wire(self) -> dict[str, Any]:
        """The MessagePack map for this message (generated per class)."""
        raise NotImplementedError


_M = TypeVar("_M", bound=type[Message])


def message(tag: str, *, tag_key: str = "t") -> Callable[[_M], _M]:
    """Class decorator (on top of ``@dataclass(slots=True)``): tag the class and
    generate its codec from its fields' :func:`wire` declarations. The map
    holds ``tag`` under ``tag_key``."""

    def decorate(cls: _M) -> _M:
        spec: list[tuple[str, str, tuple[type, ...]]] = []
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            if "wire" not in f.metadata:
                raise TypeError(f"{cls.__name__}.{f.name} has no wire key (declare it with wire())")
            spec.append((f.name, f.metadata["wire"], f.metadata["types"]))
        keys = [key for _, key, _ in spec]
        if tag_key in keys or len(set(keys)) != len(keys):
            raise TypeError(f"{cls.__name__}: wire keys must be unique and not {tag_key!r}")
        params = getattr(cls, "__dataclass_params__", None)
        if params is None or params.frozen or hasattr(cls, "__post_init__"):
            raise TypeError(f"{cls.__name__}: a message is a plain, unfrozen slots dataclass")
        cls.TAG = tag
        cls.TAG_KEY = tag_key
        cls.WIRE = tuple(spec)
        cls.to_wire = _make_to_wire(cls, tag_key, tag, spec)  # type: ignore[method-assign,assignment]
        cls.from_wire = staticmethod(_make_from_wire(cls, tag, spec))
        return cls

    return decorate


def _check(var: str, types: tuple[type, ...], names: dict[str, Any]) -> str | None:
    """A Python expression true when ``var`` has one of ``types`` exactly."""
    if not types:
        return None
    tests = []
    for t in sorted(types, key=lambda t: t is not _NONE):  # (None first: the usual default)
        if t is _NONE:
            tests.append(f"{var} is None")
        else:
            name = f"_{t.__name__}"
            names[name] = t
            tests.append(f"type({var}) is {name}")
    return "(" + " or ".join(tests) + ")"


def _make_to_wire(
    cls: type[Message], tag_key: str, tag: str, spec: list[tuple[str, str, tuple[type, ...]]]
) -> Callable[[Message], dict[str, Any]]:
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    omitted = [(attr, key) for attr, key, _ in spec if fields[attr].metadata.get("omit_none")]
    items = ", ".join(
        [
            f"{tag_key!r}: {tag!r}",
            *(f"{key!r}: self.{attr}" for attr, key, _ in spec if (attr, key) not in omitted),
        ]
    )
    if not omitted:
        source = f"def to_wire(self):\n    return {{{items}}}\n"
    else:
        source = f"def to_wire(self):\n    w = {{{items}}}\n"
        for attr, key in omitted:
            source += f"    if self.{attr} is not None:\n        w[{key!r}] = self.{attr}\n"
        source += "    return w\n"
    namespace: dict[str, Any] = {}
    exec(source, namespace)
    function: Callable[[Message], dict[str, Any]] = namespace["to_wire"]
    function.__qualname__ = f"{cls.__name__}.to_wire"
    function.__doc__ = Message.to_wire.__doc__
    return function


def _make_from_wire(
    cls: type[Message], tag: str, spec: list[tuple[str, str, tuple[type, ...]]]
) -> Callable[[dict[str, Any]], Message]:
    """``from_wire`` for ``cls``: straight-line code for a well-formed map, and
    :func:`_explain` (which names the bad field) for anything else.

    Every key is read by subscription first (the encoder writes them all);
    a map that lacks an optional key takes a second function that fills in
    the defaults.
    """
    by_name = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    names: dict[str, Any] = {"_cls": cls, "_explain": _explain, "_MISSING": MISSING}
    every, required, optional, checks = [], [], [], []
    for index, (attr, key, types) in enumerate(spec):
        var = f"v{index}"
        f = by_name[attr]
        if f.metadata.get("omit_none"):  # (usually absent: no slow path for that)
            every.append(f"        {var} = w.get({key!r})")
        else:
            every.append(f"        {var} = w[{key!r}]")
        if f.default is MISSING and f.default_factory is MISSING:
            required.append(f"        {var} = w[{key!r}]")
        elif f.default_factory is not MISSING:
            names[f"_f{index}"] = f.default_factory
            optional.append(f"    {var} = w.get({key!r}, _MISSING)")
            optional.append(f"    if {var} is _MISSING:\n        {var} = _f{index}()")
        else:
            names[f"_d{index}"] = f.default
            optional.append(f"    {var} = w.get({key!r}, _d{index})")
        check = _check(var, types, names)
        if check is not None:
            checks.append(check)
    # The message is made without calling the class: ``__init__`` (a Python
    # frame entered through the type's init slot) would cost more than the
    # rest of decoding a small message; the fields were just checked.
    names["_new"] = object.__new__
    made = [
        "m = _new(_cls)",
        *(f"m.{attr} = v{i}" for i, (attr, _, _) in enumerate(spec)),
        "return m",
    ]
    tail = [f"    {line}" for line in made]
    if checks:
        tail = [f"    if {' and '.join(checks)}:", *(f"        {line}" for line in made)]
        tail += ["    return _explain(_cls, w)"]
    lines = ["def _with_defaults(w):"]
    if required:
        lines += ["    try:", *required, "    except KeyError:", "        return _explain(_cls, w)"]
    lines += [*optional, *tail]
    if optional:
        lines += ["def from_wire(w):", "    try:", *every, "    except KeyError:"]
        lines += ["        return _with_defaults(w)", *tail]
    else:
        lines += ["from_wire = _with_defaults"]
    exec("\n".join(lines) + "\n", names)
    function: Callable[[dict[str, Any]], Message] = names["from_wire"]
    function.__qualname__ = f"{cls.__name__}.from_wire"
    function.__doc__ = f"The {tag!r} message a decoded map holds; ProtocolError if malformed."
    return function


def _explain(cls: type[Message], wire: dict[str, Any]) -> Message:
    """The general (slow) decoder: says which field is missing or of the wrong type."""
    kwargs: dict[str, Any] = {}
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for attr, key, types in cls.WIRE:
        if key not in wire:
            f = fields[attr]
            if f.default is not MISSING or f.default_factory is not MISSING:
                continue
            raise ProtocolError(f"{cls.TAG!r} message lacks field {attr!r}")
        value = wire[key]
        if types and type(value) not in types:
            raise ProtocolError(
                f"{cls.TAG!r} message field {attr!r} is {type(value).__name__}, "
                f"expected {' or '.join(t.__name__ for t in types)}"
            )
        kwargs[attr] = value
    return cls(**kwargs)


# --- host -> worker ----------------------------------------------------------


@message("init")
@dataclass(slots=True)
class Init(Message):
    """First frame the host sends: who the worker is and what to load."""

    version: int = wire("v", int)
    worker_id: int = wire("w", int)
    pool: str = wire("p", str)
    adapter: str = wire("a", str)
    config: dict[str, Any] = wire("c", dict, default_factory=dict)
    concurrency: int = wire("n", int, default=1)
    max_frame_bytes: int = wire("m", int, default=64 * 2**20)
    sys_path: list[str] = wire("s", list, default_factory=list)


@message("call")
@dataclass(slots=True)
class Call(Message):
    """Run ``command(**args)``."""

    id: int = wire("i", int)
    command: str = wire("c", str)
    args: dict[str, Any] = wire("a", dict)
    mode: str = wire("m", str, default=CallMode.CALL)
    timeout: float | None = wire("o", float, int, _NONE, default=None)
    session_id: str | None = wire("s", str, _NONE, default=None)
    #: The W3C ``traceparent`` of the host's span for this call (OpenTelemetry);
    #: the worker runs the handler in that context. None: not traced.
    trace: str | None = wire("x", str, _NONE, default=None, omit_none=True)


@message("cancel")
@dataclass(slots=True)
class Cancel(Message):
    """Stop call ``id`` (cooperatively); the worker still answers it."""

    id: int = wire("i", int)


@message("withdraw")
@dataclass(slots=True)
class Withdraw(Message):
    """Give call ``id`` back if it has not started; one that has is left to finish.

    A call still waiting in the worker is dropped and answered with a
    ``Failure`` of kind ``withdrawn`` (the host sends it elsewhere); for any
    other call the message is ignored.
    """

    id: int = wire("i", int)


@message("credit")
@dataclass(slots=True)
class Credit(Message):
    """Stream ``id`` may send ``n`` more items (the host consumed that many)."""

    id: int = wire("i", int)
    n: int = wire("n", int)


@message("session")
@dataclass(slots=True)
class SessionSync(Message):
    """Open or refresh session ``session_id`` in the worker.

    ``variables`` is the full set of current values (the worker's cache is
    replaced); ``restore``, when not nil, is the persisted state the adapter's
    ``restore_session`` must rebuild from before the session's next call runs.
    """

    session_id: str = wire("s", str)
    version: int = wire("v", int)
    variables: dict[str, Any] = wire("a", dict)
    restore: dict[str, Any] | None = wire("r", dict, _NONE, default=None)


@message("session_drop")
@dataclass(slots=True)
class SessionDrop(Message):
    """Session ``session_id`` ended (closed or expired): forget it."""

    session_id: str = wire("s", str)


@message("host_reply")
@dataclass(slots=True)
class HostReply(Message):
    """Host tool call ``id`` returned ``value``."""

    id: int = wire("i", int)
    value: Any = wire("r")


@message("host_failure")
@dataclass(slots=True)
class HostFailure(Message):
    """Host tool call ``id`` failed (or no such tool is registered)."""

    id: int = wire("i", int)
    type: str = wire("y", str)
    message: str = wire("e", str)


@message("ping")
@dataclass(slots=True)
class Ping(Message):
    """Health check: the worker's event loop answers ``Pong`` at once, even when busy."""

    id: int = wire("i", int)


# --- worker -> host ----------------------------------------------------------


@message("hello")
@dataclass(slots=True)
class Hello(Message):
    """The worker is ready: its version, pid, adapter and commands."""

    version: int = wire("v", int)
    pid: int = wire("p", int)
    worker_id: int = wire("w", int)
    adapter: str = wire("a", str)
    commands: list[str] = wire("c", list)


@message("startup_failed")
@dataclass(slots=True)
class StartupFailed(Message):
    """The worker could not start (import, ``setup``); it exits next."""

    type: str = wire("y", str)
    message: str = wire("e", str)
    traceback: str = wire("b", str, default="")


@message("result")
@dataclass(slots=True)
class Result(Message):
    """Call ``id`` returned ``value``."""

    id: int = wire("i", int)
    value: Any = wire("r")


@message("failure")
@dataclass(slots=True)
class Failure(Message):
    """Call ``id`` failed in the worker."""

    id: int = wire("i", int)
    kind: str = wire("k", str)
    type: str = wire("y", str)
    message: str = wire("e", str)
    traceback: str = wire("b", str, default="")


@message("item")
@dataclass(slots=True)
class Item(Message):
    """One item of stream ``id``."""

    id: int = wire("i", int)
    value: Any = wire("r")


@message("end")
@dataclass(slots=True)
class End(Message):
    """Stream ``id`` is exhausted."""

    id: int = wire("i", int)


@message("log")
@dataclass(slots=True)
class Log(Message):
    """A ``logging`` record from worker code, forwarded to the host's logging."""

    level: int = wire("l", int)
    logger: str = wire("n", str)
    message: str = wire("e", str)


@message("host_call")
@dataclass(slots=True)
class HostCall(Message):
    """Worker code calls host tool ``tool(**args)`` during call ``call_id``."""

    id: int = wire("i", int)
    call_id: int = wire("c", int)
    tool: str = wire("n", str)
    args: dict[str, Any] = wire("a", dict)


@message("pong")
@dataclass(slots=True)
class Pong(Message):
    """The answer to ``Ping`` ``id``."""

    id: int = wire("i", int)


@message("bye")
@dataclass(slots=True)
class Goodbye(Message):
    """A planned exit is coming (announced, so it is not taken for a crash)."""

    reason: str = wire("e", str)


HOST_MESSAGES: Final[frozenset[type[Message]]] = frozenset(
    {Init, Call, Cancel, Withdraw, Credit, Ping, SessionSync, SessionDrop, HostReply, HostFailure}
)
WORKER_MESSAGES: Final[frozenset[type[Message]]] = frozenset(
    {Hello, StartupFailed, Result, Failure, Item, End, Log, Pong, Goodbye, HostCall}
)
BY_TAG: Final[dict[str, type[Message]]] = {m.TAG: m for m in HOST_MESSAGES | WORKER_MESSAGES}


def to_wire(message: Message) -> dict[str, Any]:
    """The MessagePack map for ``message``."""
    return message.to_wire()


def from_wire(wire: dict[str, Any]) -> Message:
    """The message a decoded map holds; :class:`ProtocolError` if malformed."""
    tag = wire.get("t")
    cls = BY_TAG.get(tag) if isinstance(tag, str) else None
    if cls is None:
        raise ProtocolError(f"unknown message type {_shown(tag)}")
    return cls.from_wire(wire)


def _shown(tag: object) -> str:
    return repr(tag) if not isinstance(tag, str | bytes) or len(tag) <= 40 else "(long)"
