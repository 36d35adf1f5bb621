"""Finding an adapter class from ``"module:Class"`` or an entry-point name."""

from __future__ import annotations

import importlib

from ._base import Adapter

__all__ = [
    "BUILTIN_ADAPTERS",
    "ENTRY_POINT_GROUP",
    "adapter_imports",
    "check_importable",
    "load_adapter_class",
]

ENTRY_POINT_GROUP = "snakepool.adapters"


#: snakepool's own adapters (also registered as entry points): found without
#: scanning every installed distribution's metadata, which takes 50-150 ms
#: with many packages installed, at every worker start.
BUILTIN_ADAPTERS = {
    "generic": "snakepool.adapters.generic:GenericAdapter",
    "dspy": "snakepool.dspy._adapter:DSPyAdapter",
    "sklearn": "snakepool.adapters.sklearn:SklearnAdapter",
}


def load_adapter_class(spec: str) -> type[Adapter]:
    """Import the adapter ``spec`` names; errors say exactly what was wrong."""
    spec = BUILTIN_ADAPTERS.get(spec, spec)
    obj = _import_object(spec) if ":" in spec else _load_entry_point(spec)
    if not (isinstance(obj, type) and issubclass(obj, Adapter)):
        raise TypeError(
            f"adapter {spec!r} is {obj!r}, not a subclass of snakepool.adapters.Adapter"
        )
    return obj


def check_importable(spec: str) -> None:
    """Refuse, on the host and at once, an adapter no worker can import.

    A class defined in ``__main__`` (the script the host runs) or inside a
    function: each worker is its own ``python -m snakepool.workers`` and
    imports the adapter by ``module:Class``.
    """
    spec = BUILTIN_ADAPTERS.get(spec, spec)
    if ":" not in spec:
        return
    module, _, qualname = spec.partition(":")
    problem = _unimportable(module, qualname)
    if problem is not None:
        raise ValueError(problem)


def _unimportable(module: str, qualname: str) -> str | None:
    name = qualname.rsplit(".", 1)[-1] or "MyAdapter"
    if module in ("__main__", "__mp_main__"):
        return (
            f"adapter class {qualname!r} is defined in __main__ (the script you ran), which "
            f"the worker processes cannot import (each worker is its own "
            f"'python -m snakepool.workers'): move it into an importable module, e.g. "
            f"my_adapters.py next to your script, and pass 'my_adapters:{name}' "
            f"(or the class imported from there)"
        )
    if "<locals>" in qualname:
        return (
            f"adapter class {qualname!r} of module {module!r} is defined inside a function, "
            f"where the worker processes cannot import it: move it to the top level of an "
            f"importable module and pass '{module}:{name}'"
        )
    return None


def adapter_imports(spec: str) -> list[str]:
    """The modules ``load_adapter_class(spec)`` imports (for a fork server to preload).

    An unknown entry point gives none: the workers then report it clearly.
    """
    spec = BUILTIN_ADAPTERS.get(spec, spec)
    if ":" in spec:
        module = spec.partition(":")[0]
        return [module] if module else []
    from importlib.metadata import entry_points  # (slow to import: only here)

    for ep in entry_points(group=ENTRY_POINT_GROUP, name=spec):
        return ["importlib.metadata", ep.module]  # the lookup itself needs the former
    return []


def _import_object(spec: str) -> object:
    module_name, _, qualname = spec.partition(":")
    if not module_name or not qualname:
        raise ValueError(f"adapter {spec!r} must look like 'package.module:ClassName'")
    problem = _unimportable(module_name, qualname)
    if problem is not None:
        raise ImportError(problem)
    module = importlib.import_module(module_name)
    obj: object = module
    for part in qualname.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ImportError(
                f"adapter {spec!r}: module {module_name!r} has no attribute {qualname!r}"
            ) from None
    return obj


def _load_entry_point(name: str) -> object:
    from importlib.metadata import entry_points  # (only here: it is slow to import)

    found = entry_points(group=ENTRY_POINT_GROUP, name=name)
    for ep in found:
        return ep.load()
    known = sorted(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))
    raise LookupError(
        f"no adapter named {name!r} in entry-point group {ENTRY_POINT_GROUP!r} "
        f"(installed: {', '.join(known) or 'none'}); use 'module:Class' for an unregistered one"
    )
