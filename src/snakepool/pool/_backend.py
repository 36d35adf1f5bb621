"""Which async backend the host runs on (the asyncio fast paths depend on it)."""

from __future__ import annotations

import asyncio

__all__ = ["running_on_asyncio"]


def running_on_asyncio() -> bool:
    """True inside an asyncio event loop (anyio's asyncio backend, uvloop too); false on trio."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True
