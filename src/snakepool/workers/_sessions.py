"""What a worker keeps for the sessions that run on it.

The host owns session state (its store is the source of truth) and pushes
what a worker needs with ``SessionSync``: the variables (a cache, replaced
wholesale, so a call sees one consistent snapshot) and, when the session has
moved here from another worker, the state to hand to the adapter's
``restore_session`` once, before the session's next call here.
"""

from __future__ import annotations

import threading
from typing import Any

from .. import protocol as p
from ..adapters import Adapter, CallContext, SessionVariables

__all__ = ["SessionCache", "WorkerSession"]


class WorkerSession:
    """What this worker keeps for one session: its local state and variable cache."""

    __slots__ = ("lock", "pending_restore", "state", "variables", "version", "view")

    def __init__(self) -> None:
        self.state: dict[str, Any] = {}
        self.variables: dict[str, Any] = {}
        #: What calls see as ``ctx.variables``: made once per sync, not per call.
        self.view = SessionVariables(self.variables)
        self.version = -1
        self.pending_restore: dict[str, Any] | None = None
        self.lock = threading.Lock()  # restore runs once even with concurrent calls


class SessionCache:
    """The sessions of one worker, by id."""

    def __init__(self) -> None:
        self.sessions: dict[str, WorkerSession] = {}

    def get(self, session_id: str) -> WorkerSession:
        """The session, made empty if the host has not synced it (only a safety net)."""
        session = self.sessions.get(session_id)
        if session is None:
            session = self.sessions[session_id] = WorkerSession()
        return session

    def sync(self, sync: p.SessionSync) -> None:
        session = self.get(sync.session_id)
        # Replace the cache wholesale: views held by running calls keep the old
        # dict, calls that start after this message see the new one.
        session.variables = dict(sync.variables)
        session.view = SessionVariables(session.variables)
        session.version = sync.version
        if sync.restore is not None:
            session.pending_restore = dict(sync.restore)

    def drop(self, session_id: str) -> None:
        self.sessions.pop(session_id, None)

    def restore_if_needed(self, ctx: CallContext, adapter: Adapter | None) -> None:
        """Run ``restore_session`` once, before the first call of a moved session
        (a call read while its session had a restore pending: ``Running.restore``)."""
        if ctx.session_id is None or adapter is None:
            return
        session = self.sessions.get(ctx.session_id)
        if session is None or session.pending_restore is None:
            return
        # Cleared only once restore_session returned (or raised): a concurrent
        # call of the session waits on the lock until the session is rebuilt.
        with session.lock:
            state = session.pending_restore
            if state is not None:
                try:
                    adapter.restore_session(ctx, state)
                finally:
                    session.pending_restore = None
