"""The ``generic`` built-in adapter: echo, sleep, count, and allow-listed calls.

``call(target="module:function", args={...})`` runs a function only when its
module is listed in ``adapter_config["allow"]``; anything else is refused.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
from collections.abc import AsyncIterator
from typing import Any

from ._base import Adapter
from ._command import command
from ._context import CallContext

__all__ = ["GenericAdapter"]


class GenericAdapter(Adapter):
    """General-purpose commands for the ``general`` pool."""

    allow: frozenset[str] = frozenset()

    def setup(self, config: dict[str, Any]) -> None:
        allow = config.get("allow", ())
        if isinstance(allow, str) or not all(isinstance(m, str) for m in allow):
            raise TypeError("adapter_config['allow'] must be a list of module names")
        self.allow = frozenset(allow)

    @command
    def echo(self, value: Any = None) -> Any:
        """Return ``value`` unchanged."""
        return value

    @command
    async def sleep(self, seconds: float, ctx: CallContext) -> float:
        """Wait ``seconds`` (cancellable), then return it."""
        await asyncio.sleep(seconds)
        return seconds

    @command
    async def count(self, n: int, delay: float = 0.0) -> AsyncIterator[int]:
        """Stream 0, 1, ..., n-1, waiting ``delay`` seconds before each."""
        for i in range(n):
            if delay:
                await asyncio.sleep(delay)
            yield i

    @command
    def call(self, target: str, args: dict[str, Any] | list[Any] | None = None) -> Any:
        """Call ``module:function`` if the module is allow-listed.

        ``args`` is a dict of keyword arguments or a list of positional ones.
        """
        module_name, sep, attribute = target.partition(":")
        if not sep or not module_name or not attribute:
            raise ValueError(f"target {target!r} must look like 'module:function'")
        if module_name not in self.allow:
            allowed = ", ".join(sorted(self.allow)) or "none"
            raise PermissionError(
                f"module {module_name!r} is not allowed (adapter_config['allow'] lists: {allowed})"
            )
        if any(part.startswith("_") for part in attribute.split(".")):
            raise PermissionError(f"target {target!r}: private names are never callable")
        obj: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            obj = getattr(obj, part)
            # "json:codecs.open" must not reach a module nobody allowed.
            if inspect.ismodule(obj) and obj.__name__ not in self.allow:
                raise PermissionError(
                    f"target {target!r} leads into module {obj.__name__!r}, which is not allowed"
                )
        if not callable(obj):
            raise TypeError(f"target {target!r} is not callable")
        result = obj(*args) if isinstance(args, list) else obj(**(args or {}))
        if inspect.isawaitable(result):
            raise TypeError(f"target {target!r} is async; the generic adapter calls sync functions")
        return result
