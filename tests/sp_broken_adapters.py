"""Adapters that break the conformance rules on purpose (tests/test_testing_kit.py)."""

from __future__ import annotations

from typing import Any

from snakepool.adapters import Adapter, CallContext, command


class Forgetful(Adapter):
    """Saves session state but never restores it; plus a crashing and an uncallable command."""

    @command
    def remember(self, key: str, value: Any, ctx: CallContext) -> None:
        """Keep ``value`` in the session (saved on the host, too)."""
        ctx.session_state[key] = value
        ctx.save_state(key, value)

    @command
    def recall(self, key: str, ctx: CallContext) -> Any:
        """What ``remember`` kept."""
        return ctx.session_state.get(key)

    def restore_session(self, ctx: CallContext, state: dict[str, Any]) -> None:
        """The bug: the state saved on the host is ignored, so a moved session forgets."""

    @command
    def explode(self) -> None:
        """Always raises."""
        raise RuntimeError("kaboom")

    @command
    def positional(self, x: int, /) -> int:
        """Can never be called: calls pass keyword arguments only."""
        return x

    @command
    def lenient(self, **options: Any) -> dict[str, Any]:
        """Accepts any argument (so the unknown-argument check is skipped)."""
        return options


class BrokenSetup(Adapter):
    """Its setup always fails: no worker ever starts."""

    def setup(self, config: dict[str, Any]) -> None:
        raise RuntimeError("setup failed on purpose")
