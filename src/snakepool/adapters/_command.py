"""``@command``: marks an adapter method as callable from the host."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

__all__ = ["CommandSpec", "command"]

F = TypeVar("F", bound=Callable[..., Any])
_MARK = "__snakepool_command__"
#: A handler parameter with this name receives the CallContext.
CONTEXT_PARAMETER = "ctx"


@dataclass(frozen=True, slots=True)
class CommandSpec:
    """What the worker needs to know to dispatch one command."""

    name: str
    attribute: str  # the method's attribute name on the adapter
    is_async: bool
    is_stream: bool  # a generator or async generator
    wants_context: bool
    signature: inspect.Signature  # without self and ctx
    doc: str
    # Precomputed for the worker's argument check (``signature.bind`` is slow):
    # the keyword names, those without a default, and whether **kwargs exists.
    # ``names`` is None when positional-only or *args parameters need bind().
    names: frozenset[str] | None = None
    required: frozenset[str] = frozenset()
    var_keyword: bool = False

    def keyword_arguments(self, args: dict[str, Any]) -> dict[str, Any] | None:
        """``args`` as the handler's keywords, or None when ``signature.bind`` must decide."""
        names = self.names
        if names is None or not self.required.issubset(args):
            return None
        if self.var_keyword:
            return None if CONTEXT_PARAMETER in args and self.wants_context else args
        return args if names.issuperset(args) else None

    def describe(self) -> dict[str, Any]:
        params = []
        for p in self.signature.parameters.values():
            entry: dict[str, Any] = {"name": p.name, "kind": p.kind.name.lower()}
            if p.default is not inspect.Parameter.empty:
                entry["default"] = _describable(p.default)
            if p.annotation is not inspect.Parameter.empty:
                entry["annotation"] = _annotation_text(p.annotation)
            params.append(entry)
        return {
            "parameters": params,
            "doc": self.doc,
            "stream": self.is_stream,
            "async": self.is_async,
        }


def command(fn: F | None = None, *, name: str | None = None) -> Any:
    """Expose an adapter method as a command (``@command`` or ``@command(name=...)``).

    Sync functions run in the worker's threads, ``async def`` ones as tasks on
    its event loop; generators and async generators become streams. A
    parameter named ``ctx`` receives the :class:`CallContext`.
    """

    def mark(func: F) -> F:
        setattr(func, _MARK, name or func.__name__)
        return func

    if fn is None:
        return mark
    return mark(fn)


def command_name(obj: object) -> str | None:
    """The command name ``obj`` was marked with, if any."""
    marked = getattr(obj, _MARK, None)
    return marked if isinstance(marked, str) else None


def build_spec(name: str, attribute: str, func: Callable[..., Any]) -> CommandSpec:
    signature = inspect.signature(func)
    params = list(signature.parameters.values())
    if params and params[0].name == "self":
        params = params[1:]
    wants_context = any(p.name == CONTEXT_PARAMETER for p in params)
    params = [p for p in params if p.name != CONTEXT_PARAMETER]
    is_async_gen = inspect.isasyncgenfunction(func)
    simple = all(p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY, p.VAR_KEYWORD) for p in params)
    keywords = [p for p in params if p.kind is not p.VAR_KEYWORD]
    return CommandSpec(
        name=name,
        attribute=attribute,
        is_async=inspect.iscoroutinefunction(func) or is_async_gen,
        is_stream=is_async_gen or inspect.isgeneratorfunction(func),
        wants_context=wants_context,
        signature=signature.replace(parameters=params),
        doc=inspect.getdoc(func) or "",
        names=frozenset(p.name for p in keywords) if simple else None,
        required=frozenset(p.name for p in keywords if p.default is p.empty),
        var_keyword=any(p.kind is p.VAR_KEYWORD for p in params),
    )


def _describable(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return repr(value)


def _annotation_text(annotation: Any) -> str:
    if isinstance(annotation, str):
        return annotation
    return getattr(annotation, "__name__", None) or repr(annotation)
