"""What a client's request asks for: its fields checked, a session operation run.

A request the server cannot run as sent fails with :class:`Refused`: the
exception Python would have raised (``TypeError``, ``ValueError``,
``KeyError``; its class name goes on the wire as ``y``) and the kind ``k``
a client switches on (one of ``SERVER_KINDS``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..errors import SessionExpired, SessionNotFound
from ._wire import SESSION_OPERATIONS

if TYPE_CHECKING:
    from ..pool import Pool

__all__ = [
    "Refused",
    "bad_request",
    "check_call",
    "draining_message",
    "session_operation",
    "shown",
]


class Refused(Exception):
    """Answer the request with ``error`` as a failure of kind ``kind``."""

    def __init__(self, error: Exception, kind: str) -> None:
        super().__init__(str(error))
        self.error = error
        self.kind = kind


def bad_request(message: str, python_type: type[Exception] = ValueError) -> Refused:
    """A malformed request: kind ``bad_request``."""
    return Refused(python_type(message), "bad_request")


def check_call(command: Any, args: Any, timeout: Any, session: Any) -> None:
    """A call's fields, each of its type (the pool checks the rest: the session id's rule)."""
    if type(command) is not str or not command:
        raise bad_request(
            f"'c' (the command) must be a non-empty string, not {shown(command)}", TypeError
        )
    if args is not None and type(args) is not dict:
        raise bad_request(
            f"'a' (the arguments) must be a map of argument names to values, not {shown(args)}",
            TypeError,
        )
    if timeout is not None and (type(timeout) not in (int, float) or not timeout > 0):
        raise bad_request(
            f"'o' (the timeout in seconds) must be a number > 0, not {shown(timeout)}"
        )
    if session is not None and type(session) is not str:
        raise bad_request(f"'s' (the session id) must be a string, not {shown(session)}", TypeError)


async def session_operation(pool: Pool, op: Any, session_id: Any, args: Any) -> Any:
    """Run session operation ``op`` (see ``SESSION_OPERATIONS``) of ``pool``; its result."""
    spec = SESSION_OPERATIONS.get(op) if isinstance(op, str) else None
    if spec is None:
        raise bad_request(
            f"unknown session operation 'op' {shown(op)}; one of {', '.join(SESSION_OPERATIONS)}"
        )
    assert isinstance(op, str)
    args = {} if args is None else args
    if not isinstance(args, dict):
        raise bad_request("session operation arguments 'a' must be a map", TypeError)
    _check_arguments(op, args, *spec)
    if session_id is not None and not isinstance(session_id, str):
        raise bad_request(
            f"the session id 's' must be a string, not {shown(session_id)}", TypeError
        )
    if op == "open":
        session = pool.session(session_id, ttl=args.get("ttl"))  # ("": refused, not a new id)
        await session.open()
        return session.id
    if session_id is None:
        raise bad_request(f"session operation {op!r} needs a session id 's'")
    if op == "close":
        await pool.session(session_id).close()
        return None
    await _require_live(pool, session_id)  # a typo must not create a session
    variables = pool.session(session_id).variables
    try:
        return await getattr(variables, op)(**args)
    except KeyError as exc:  # (not SessionNotFound: checked above)
        raise Refused(exc, "undefined_variable") from None
    except ValueError as exc:
        raise Refused(exc, "invalid_value") from None


#: What each session operation's argument must be (None: any value).
_ARGUMENT_TYPES: dict[str, tuple[tuple[type, ...], str] | None] = {
    "name": ((str,), "a string"),
    "type": ((str,), "a string"),
    "initial": None,
    "value": None,
    "default": None,
    "constraints": ((dict, type(None)), "a map or nil"),
    "metadata": ((dict, type(None)), "a map or nil"),
    "names": ((list,), "an array of strings"),
    "values": ((dict,), "a map of names to values"),
    "ttl": ((int, float, type(None)), "a number of seconds > 0, or nil"),
}


def _check_arguments(
    op: str, args: Mapping[str, Any], required: tuple[str, ...], optional: tuple[str, ...]
) -> None:
    allowed = (*required, *optional)
    unknown = [key for key in args if key not in allowed]
    if unknown:
        takes = ", ".join(allowed) if allowed else "no arguments"
        raise bad_request(
            f"session operation {op!r} got unknown argument(s) "
            f"{', '.join(shown(k) for k in unknown)}; it takes: {takes}",
            TypeError,
        )
    missing = [key for key in required if key not in args]
    if missing:
        raise bad_request(
            f"session operation {op!r} is missing argument(s) {', '.join(missing)}", TypeError
        )
    for key, value in args.items():
        rule = _ARGUMENT_TYPES[key]
        if rule is not None and (
            type(value) not in rule[0]
            or (key == "names" and not all(type(name) is str for name in value))
        ):
            raise bad_request(
                f"session operation {op!r}: argument {key!r} must be {rule[1]}, not {shown(value)}",
                TypeError,
            )


async def _require_live(pool: Pool, session_id: str) -> None:
    status = await pool._sessions_manager().store.status(session_id)
    if status == "expired":
        raise SessionExpired(f"session {session_id!r} expired or was closed")
    if status != "live":
        raise SessionNotFound(f"no session {session_id!r}; open one first")


def draining_message(frame: dict[str, Any]) -> str:
    name = frame.get("p")
    pool = f"pool {name!r}" if isinstance(name, str) else "every pool"
    return f"{pool} is closed: the server is shutting down (draining the calls in flight)"


def shown(value: Any) -> str:
    """``repr(value)``, cut short: it goes into a message."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
