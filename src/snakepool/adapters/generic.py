"""The ``generic`` built-in adapter: echo, sleep, count, and allow-listed calls.

``call(target="module:function", args={...})`` runs a function only when the
module is listed in ``adapter_config["allow"]`` *and* the function is defined
there (its ``__module__``), not merely imported by it; attribute chains
(``module:a.b``), private names and modules are refused.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import sys
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
        """Call ``module:function`` if the function is defined in an allow-listed module.

        ``args`` is a dict of keyword arguments or a list of positional ones.
        """
        function = self._resolve(target)
        result = function(*args) if isinstance(args, list) else function(**(args or {}))
        if inspect.isawaitable(result):
            close = getattr(result, "close", None)
            if close is not None:
                close()  # never awaited: no "coroutine was never awaited" warning
            raise TypeError(f"target {target!r} is async; the generic adapter calls sync functions")
        return result

    def _resolve(self, target: str) -> Any:
        """The function ``target`` names, or ``PermissionError`` saying what was refused and why.

        Only a name defined in an allowed module is callable: an allowed module's
        *imports* (``from os import system as shell``, a dict holding ``os``) are
        not, and neither are attribute chains (``module:a.b``), which could walk
        from an allowed object to anything it references.
        """
        if not isinstance(target, str):
            raise TypeError(f"target must be a str 'module:function', got {type(target).__name__}")
        module_name, sep, attribute = target.partition(":")
        if not sep or not module_name or not attribute:
            raise ValueError(f"target {target!r} must look like 'module:function'")
        if module_name not in self.allow:
            raise PermissionError(
                f"module {module_name!r} is not allowed "
                f"(adapter_config['allow'] lists: {self._allowed()})"
            )
        parts = attribute.split(".")
        if any(part.startswith("_") for part in parts):
            raise PermissionError(f"target {target!r}: private names are never callable")
        module = importlib.import_module(module_name)
        first = getattr(module, parts[0], None)
        if inspect.ismodule(first) and first.__name__ not in self.allow:
            # "json:codecs.open" must not reach a module nobody allowed.
            raise PermissionError(
                f"target {target!r} is refused: it leads into module {first.__name__!r}, "
                f"which is not allowed (adapter_config['allow'] lists: {self._allowed()})"
            )
        if len(parts) > 1:
            raise PermissionError(
                f"target {target!r} is refused: attribute chains ({attribute!r}) are not "
                "callable targets, only a function defined in an allowed module, "
                "named as 'module:function'"
            )
        if not hasattr(module, attribute):
            raise AttributeError(f"target {target!r}: module {module_name!r} has no {attribute!r}")
        obj = getattr(module, attribute)
        if inspect.ismodule(obj):
            raise PermissionError(
                f"target {target!r} is refused: it is the module {obj.__name__!r}, not a function"
            )
        if not callable(obj):
            raise TypeError(f"target {target!r} is not callable")
        home = _defining_module(obj)
        if home is None or not self._defines(home):
            where = f"module {home!r}" if home else "no module it names"
            raise PermissionError(
                f"target {target!r} is refused: {attribute!r} is defined in {where}, not in "
                f"an allowed module; {module_name!r} only imported it, and an allowed module's "
                "imports are not callable (adapter_config['allow'] lists: "
                f"{self._allowed()}; list the defining module there to allow it)"
            )
        if inspect.iscoroutinefunction(obj):
            raise TypeError(f"target {target!r} is async; the generic adapter calls sync functions")
        return obj

    def _defines(self, home: str) -> bool:
        """Whether an object defined in module ``home`` belongs to an allowed module.

        Allowed modules are matched exactly (as targets are: allowing ``json`` does
        not allow ``json.decoder``). The one widening is a standard library module's
        own C implementation: ``os`` functions live in ``posix`` (``nt``),
        ``operator``'s in ``_operator``, ``heapq``'s in ``_heapq``, and so on.
        """
        if home in self.allow:
            return True
        if home not in sys.stdlib_module_names:
            return False
        return any(
            allowed in sys.stdlib_module_names
            and (home == f"_{allowed}" or (allowed == "os" and home in ("posix", "nt")))
            for allowed in self.allow
        )

    def _allowed(self) -> str:
        return ", ".join(sorted(self.allow)) or "none"


def _defining_module(obj: Any) -> str | None:
    """The name of the module ``obj`` was defined in, as far as it says (``None`` if unknown).

    Functions and classes carry ``__module__``; a callable instance reports its
    class's; a built-in method of an object (``random.random``, ``{}.get``) has
    ``__module__ = None``, and then its object's type decides (``random.Random``
    is defined in ``random``, ``dict`` in ``builtins``).
    """
    module = getattr(obj, "__module__", None)
    if isinstance(module, str):
        return module
    owner = getattr(obj, "__self__", None)
    if inspect.ismodule(owner):
        return owner.__name__
    if owner is not None:
        module = getattr(type(owner), "__module__", None)
        if isinstance(module, str):
            return module
    return None
