"""``Adapter``: the base class a framework plugs into the workers with."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import Any, ClassVar

from ._command import CommandSpec, build_spec, command, command_name
from ._context import CallContext

__all__ = ["Adapter"]


class Adapter:
    """Subclass it and mark methods with ``@command``.

    One instance lives in each worker. ``setup(config)`` runs once when the
    worker starts (``config`` is the pool's ``adapter_config``), ``teardown()``
    when it closes gracefully, ``restore_session(ctx, state)`` when a session
    lands on this worker after living elsewhere (every worker it lands on
    after its first, before its next call there; ``state`` is what
    ``ctx.save_state`` persisted, ``{}`` when nothing was).

    Every adapter answers ``ping``, ``describe`` and ``info``.
    """

    #: Commands by name, collected from the class and its bases.
    commands: ClassVar[Mapping[str, CommandSpec]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.commands = _collect_commands(cls)

    # --- hooks -------------------------------------------------------------

    def setup(self, config: dict[str, Any]) -> None:
        """Once per worker, before the first call."""

    def teardown(self) -> None:
        """Once per worker, on a graceful close."""

    def restore_session(self, ctx: CallContext, state: dict[str, Any]) -> None:
        """Rebuild what a session kept in a worker that is gone.

        Runs on every worker the session lands on after its first (its worker
        died or was recycled, or affinity fell back to another one), once,
        before the session's next call there. ``state`` is every key saved
        with ``ctx.save_state``, ``{}`` when nothing was saved.
        """

    # --- built-in commands ---------------------------------------------------

    @command
    def ping(self) -> str:
        """Liveness check: answers "pong"."""
        return "pong"

    @command
    def describe(self) -> dict[str, Any]:
        """The commands of this adapter: parameters, docstrings, streaming."""
        return {name: spec.describe() for name, spec in sorted(self.commands.items())}

    @command
    def info(self) -> dict[str, Any]:
        """Facts about this worker process."""
        import psutil  # (only here: workers start faster without it)

        cls = type(self)
        return {
            "pid": os.getpid(),
            "adapter": f"{cls.__module__}:{cls.__qualname__}",
            "python": sys.version.split()[0],
            "executable": sys.executable,
            "rss": psutil.Process().memory_info().rss,
        }


def _collect_commands(cls: type) -> dict[str, CommandSpec]:
    found: dict[str, CommandSpec] = {}
    # Walk the MRO from the base up so subclasses override by command name.
    for klass in reversed(cls.__mro__):
        for attribute, value in vars(klass).items():
            name = command_name(value)
            if name is not None:
                found[name] = build_spec(name, attribute, value)
    return found


Adapter.commands = _collect_commands(Adapter)
