"""DSPy in snakepool: the host-side helpers and the worker-side adapter, together.

The host helpers (here) treat programs living in the workers as Python objects:

```python
async with snakepool.Pool("dspy", size=2) as pool, pool.session() as session:
    await snakepool.dspy.configure_lm(session, "openai/gpt-4o-mini", api_key=...)
    qa = await Program.create(session, "question -> answer", module="ChainOfThought")
    print(await qa(question="Why is the sky blue?"))           # {"reasoning": ..., "answer": ...}
    async for item in qa.stream(question="..."): ...          # {"field", "chunk"} ... {"prediction"}
    better = await qa.optimize(trainset, optimizer="LabeledFewShot")
```

Nothing here imports DSPy: the programs live in the workers. The adapter the
workers run is :class:`DSPyAdapter` (in ``_adapter``, imported on first use;
``Pool("dspy")`` names it); it imports DSPy in ``setup`` only
(``pip install 'snakepool[dspy]'``). Its errors are below: they reach the host
as a ``RemoteError`` whose ``remote_kind`` is their ``kind``.
"""

from __future__ import annotations

import importlib
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import ErrorCategory, SnakepoolError

if TYPE_CHECKING:
    from ._adapter import DSPyAdapter as DSPyAdapter

__all__ = [
    "DSPyAdapter",
    "LMCallError",
    "NoLMConfigured",
    "Program",
    "SessionLike",
    "UnknownProgram",
    "configure_lm",
]


class UnknownProgram(SnakepoolError, LookupError):
    """No program with that id in this session (or worker, outside sessions)."""

    category = ErrorCategory.APPLICATION
    kind = "dspy_unknown_program"


class NoLMConfigured(SnakepoolError, RuntimeError):
    """A program ran before any LM was configured."""

    category = ErrorCategory.APPLICATION
    kind = "dspy_no_lm"


class LMCallError(SnakepoolError, RuntimeError):
    """The language model could not be reached or answered with an error."""

    category = ErrorCategory.APPLICATION
    kind = "dspy_lm_call_failed"


def __getattr__(name: str) -> Any:
    if name == "DSPyAdapter":  # (the worker side: imported when asked for)
        value = importlib.import_module("._adapter", __name__).DSPyAdapter
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class SessionLike(Protocol):
    """What the helpers need: a ``snakepool.Session`` (or a pool, for worker-wide calls)."""

    async def call(
        self, command: str, args: Mapping[str, Any] | None = None, *, timeout: float | None = None
    ) -> Any: ...

    def stream(
        self, command: str, args: Mapping[str, Any] | None = None, *, timeout: float | None = None
    ) -> Any: ...


async def configure_lm(session: SessionLike, model: str, **kwargs: Any) -> dict[str, Any]:
    """Set the session's LM (``dspy.LM`` arguments); returns the settings, without the key."""
    result: dict[str, Any] = await session.call("configure_lm", {"model": model, **kwargs})
    return result


class Program:
    """A DSPy program living in the workers of ``session``'s pool."""

    def __init__(self, session: SessionLike, program_id: str) -> None:
        self.session = session
        self.id = program_id

    @classmethod
    async def create(
        cls,
        session: SessionLike,
        signature: str | Mapping[str, Any],
        module: str = "Predict",
        **kwargs: Any,
    ) -> Program:
        """``create_program``: ``kwargs`` are ``program_id``, ``instructions``, ``tools``..."""
        args = {"signature": _plain(signature), "module": module, **kwargs}
        program_id = await session.call("create_program", args)
        return cls(session, program_id)

    @classmethod
    async def load(
        cls, session: SessionLike, data: Mapping[str, Any], program_id: str | None = None
    ) -> Program:
        """Rebuild a program from :meth:`dump`'s data."""
        args: dict[str, Any] = {"data": dict(data)}
        if program_id is not None:
            args["program_id"] = program_id
        return cls(session, await session.call("load_program", args))

    async def __call__(self, *, timeout: float | None = None, **inputs: Any) -> dict[str, Any]:
        """Run the program; returns its prediction's fields."""
        result: dict[str, Any] = await self.session.call(
            "execute_program", {"program_id": self.id, "inputs": inputs}, timeout=timeout
        )
        return result

    async def stream(self, **inputs: Any) -> AsyncIterator[dict[str, Any]]:
        """``{"field", "chunk"}`` items as the LM writes, ``{"status"}``, then ``{"prediction"}``."""
        items = self.session.stream("stream_program", {"program_id": self.id, "inputs": inputs})
        try:
            async for item in items:
                yield item
        finally:
            close = getattr(items, "aclose", None)
            if close is not None:
                await close()

    async def optimize(
        self,
        trainset: Sequence[Mapping[str, Any]],
        optimizer: str = "BootstrapFewShot",
        metric: str = "exact_match",
        *,
        input_keys: Sequence[str] | None = None,
        options: Mapping[str, Any] | None = None,
        timeout: float | None = None,
    ) -> Program:
        """Compile with ``optimizer``; returns the new program (this one is unchanged)."""
        args: dict[str, Any] = {
            "program_id": self.id,
            "trainset": [dict(row) for row in trainset],
            "optimizer": optimizer,
            "metric": metric,
        }
        if input_keys is not None:
            args["input_keys"] = list(input_keys)
        if options is not None:
            args["options"] = dict(options)
        new_id = await self.session.call("optimize", args, timeout=timeout)
        return type(self)(self.session, new_id)

    async def dump(self) -> dict[str, Any]:
        """Definition and learned state, JSON-safe (:meth:`load` takes it back)."""
        result: dict[str, Any] = await self.session.call("dump_program", {"program_id": self.id})
        return result

    async def delete(self) -> None:
        await self.session.call("delete_program", {"program_id": self.id})

    def __repr__(self) -> str:
        return f"<Program {self.id!r}>"


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value
