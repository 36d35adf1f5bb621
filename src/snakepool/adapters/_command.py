"""``@command``: marks an adapter method as callable from the host."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

__all__ = ["CommandSignature", "CommandSpec", "command"]

F = TypeVar("F", bound=Callable[..., Any])
_MARK = "__snakepool_command__"
#: A handler parameter with this name receives the CallContext.
CONTEXT_PARAMETER = "ctx"


class CommandSignature(inspect.Signature):
    """A command's signature (without ``self`` and ``ctx``).

    ``bind`` of keyword arguments names every problem at once (``inspect``
    names only the first): a call with a misspelt argument and without a
    required one hears about both, and which name it probably meant.
    """

    __slots__ = ()

    def bind(self, /, *args: Any, **kwargs: Any) -> inspect.BoundArguments:
        if not args:
            problems = argument_problems(self, kwargs)
            if problems:
                raise TypeError(problems)
        return super().bind(*args, **kwargs)


def argument_problems(signature: inspect.Signature, args: Mapping[str, Any]) -> str | None:
    """Everything wrong with calling ``signature`` with the keywords ``args``; None if nothing.

    ``"missing a required argument: 'b'; got an unexpected keyword argument
    'c'"``: Python's own wording, one clause per kind of problem, with a
    did-you-mean for a misspelt name.
    """
    Parameter = inspect.Parameter
    params = signature.parameters.values()
    keywords = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    positional_only = [p.name for p in params if p.kind is Parameter.POSITIONAL_ONLY]
    missing = [
        p.name
        for p in params
        if p.default is p.empty
        and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        and (p.name not in args or p.kind is p.POSITIONAL_ONLY)
    ]
    if any(p.kind is Parameter.VAR_KEYWORD for p in params):
        unexpected = []
    else:
        unexpected = [k for k in args if k not in keywords and k not in positional_only]
    clauses = []
    if len(missing) == 1:
        clauses.append(f"missing a required argument: {missing[0]!r}")
    elif missing:
        clauses.append(f"missing {len(missing)} required arguments: {_names(missing)}")
    if unexpected:
        clause = (
            f"got an unexpected keyword argument {unexpected[0]!r}"
            if len(unexpected) == 1
            else f"got unexpected keyword arguments {_names(unexpected)}"
        )
        unused = [k for k in keywords if k not in args]
        hints = []
        for name in unexpected:
            if name == CONTEXT_PARAMETER:
                hints.append(
                    f"{name!r} is reserved: a handler's ctx parameter gets the CallContext"
                )
            # (a misspelling most likely stands for an argument that is missing)
            elif close := (
                difflib.get_close_matches(name, missing, n=1)
                or difflib.get_close_matches(name, unused, n=1)
            ):
                which = f" for {name!r}" if len(unexpected) > 1 else ""
                hints.append(f"did you mean {close[0]!r}{which}?")
        if hints:
            clause += f" ({'; '.join(hints)})"
        clauses.append(clause)
    unreachable = [n for n in positional_only if n in args or n in missing]
    if unreachable:
        clauses.append(
            f"{_names(unreachable)} {'is' if len(unreachable) == 1 else 'are'} positional-only, "
            f"and calls pass keyword arguments only"
        )
    return "; ".join(clauses) or None


def _names(names: list[str]) -> str:
    """``'a'``, ``'a' and 'b'``, ``'a', 'b' and 'c'``."""
    quoted = [repr(n) for n in names]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} and {quoted[-1]}"


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
        signature=CommandSignature(params, return_annotation=signature.return_annotation),
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
