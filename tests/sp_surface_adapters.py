"""Worker-side helpers of test_surface: what a handler sees of a failed host tool."""

from __future__ import annotations

from typing import Any

from snakepool.adapters import Adapter, CallContext, command
from snakepool.errors import RemoteError


class ToolKinds(Adapter):
    @command
    def tool_failure(self, name: str, ctx: CallContext) -> dict[str, Any]:
        """Call host tool ``name``; report how its failure looked here."""
        try:
            ctx.call_host(name, {})
        except RemoteError as exc:
            return {"type": exc.remote_type, "kind": exc.remote_kind, "message": exc.remote_message}
        return {"type": None, "kind": None, "message": None}
