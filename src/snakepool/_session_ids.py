"""The session id rule (light: the CLI checks ``--session`` without loading the pool)."""

from __future__ import annotations

import re

from .errors import InvalidSessionId

__all__ = ["SESSION_ID_MAX_LENGTH", "SESSION_ID_RULE", "check_session_id"]

#: The longest session id accepted.
SESSION_ID_MAX_LENGTH = 128
#: The rule every session id follows, as error messages and the docs state it.
SESSION_ID_RULE = (
    f"1 to {SESSION_ID_MAX_LENGTH} characters from A-Z a-z 0-9 . _ : -, not starting with '.'"
)
_SESSION_ID = re.compile(rf"[A-Za-z0-9_:-][A-Za-z0-9._:-]{{0,{SESSION_ID_MAX_LENGTH - 1}}}")


def check_session_id(session_id: object) -> str:
    """``session_id`` if it follows :data:`SESSION_ID_RULE`, else ``InvalidSessionId``.

    Every place a session id enters (``Pool.session``, a call's ``session=``, the
    stores, the CLI, the socket server through the pool) checks it, so an id can
    never be a Redis pattern, a path or an unbounded key. Generated ids (uuid4
    hex) follow the rule.
    """
    if not isinstance(session_id, str):
        raise InvalidSessionId(
            f"a session id must be a str ({SESSION_ID_RULE}), got {type(session_id).__name__}"
        )
    if _SESSION_ID.fullmatch(session_id) is None:
        shown = session_id if len(session_id) <= 40 else f"{session_id[:40]}..."
        raise InvalidSessionId(
            f"invalid session id {shown!r} ({len(session_id)} characters): "
            f"a session id is {SESSION_ID_RULE}"
        )
    return session_id
