"""``Program``: a DSPy program living in the workers, as a host-side object."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from . import _monitor
from ._progress import OptimizationBar

if TYPE_CHECKING:
    from ._evaluate import Evaluation, EvaluationProgress

__all__ = ["OptimizationProgress", "Program", "SessionLike", "configure_lm"]


class SessionLike(Protocol):
    """What the helpers need: a ``snakepool.Session`` (or a pool, for worker-wide calls)."""

    async def call(
        self, command: str, args: Mapping[str, Any] | None = None, *, timeout: float | None = None
    ) -> Any: ...

    def stream(
        self, command: str, args: Mapping[str, Any] | None = None, *, timeout: float | None = None
    ) -> Any: ...


@dataclass(frozen=True, slots=True)
class OptimizationProgress:
    """One candidate an optimizer scored (``score`` and ``best_score`` in 0..1)."""

    candidate: int
    score: float
    best_score: float
    instructions: tuple[str, ...]


async def configure_lm(session: SessionLike, model: str, **kwargs: Any) -> dict[str, Any]:
    """Set the session's LM (``dspy.LM`` arguments); returns the settings, without the key."""
    _monitor.attach(session)
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
        *,
        bind: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> Program:
        """``create_program``: ``kwargs`` are ``program_id``, ``instructions``, ``tools``...

        ``bind`` maps settings to the session variables that hold them per call:
        ``{"module": "reasoning_strategy"}`` runs the program as the module the
        variable names; LM settings (``model``, ``temperature``, ``max_tokens``,
        ``top_p``) read the variables of their own name unless bound elsewhere.
        """
        _monitor.attach(session)
        args = {"signature": _plain(signature), "module": module, **kwargs}
        if bind is not None:
            args["bind"] = dict(bind)
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
        async with contextlib.aclosing(items):  # (closing it ends the worker's generator)
            async for item in items:
                yield item

    async def evaluate(
        self,
        devset: Iterable[Mapping[str, Any]] | AsyncIterable[Mapping[str, Any]],
        metric: str | Callable[..., Any] = "exact_match",
        *,
        concurrency: int | None = None,
        progress: Callable[[EvaluationProgress], Any] | None = None,
        keep_results: bool = True,
        max_errors: int | None = 10,
        input_keys: Sequence[str] | None = None,
        timeout: float | None = None,
    ) -> Evaluation:
        """Score the program on ``devset``, fanned out over the pool's workers.

        See :func:`snakepool.dspy._evaluate.evaluate` (docs/dspy.md, "Evaluation").
        """
        from ._evaluate import evaluate

        return await evaluate(
            self,
            devset,
            metric,
            concurrency=concurrency,
            progress=progress,
            keep_results=keep_results,
            max_errors=max_errors,
            input_keys=input_keys,
            timeout=timeout,
        )

    async def optimize(
        self,
        trainset: Sequence[Mapping[str, Any]],
        optimizer: str = "BootstrapFewShot",
        metric: str = "exact_match",
        *,
        input_keys: Sequence[str] | None = None,
        options: Mapping[str, Any] | None = None,
        timeout: float | None = None,
        progress: Callable[[OptimizationProgress], Any] | bool | None = None,
        session: SessionLike | None = None,
    ) -> Program:
        """Compile with ``optimizer``; returns the new program (this one is unchanged).

        ``progress(OptimizationProgress)`` hears of each candidate an optimizer
        scores (COPRO), as it is scored (``progress=True``: a progress bar on
        the terminal). ``session``: run the optimization
        there (a session of another pool, e.g. the ``optimizer`` pool, with its
        own LM); the result is loaded back into this program's session.
        """
        args: dict[str, Any] = {
            "trainset": [dict(row) for row in trainset],
            "optimizer": optimizer,
            "metric": metric,
        }
        if input_keys is not None:
            args["input_keys"] = list(input_keys)
        if options is not None:
            args["options"] = dict(options)
        where = self if session is None or session is self.session else None
        if where is None:
            assert session is not None
            _monitor.attach(session)
            where = await Program.load(session, await self.dump())
        bar = OptimizationBar() if progress is True else None
        hear: Callable[[OptimizationProgress], Any] | None = bar
        if bar is None and callable(progress):
            hear = progress
        try:
            new_id = await where._optimize(args, timeout, hear)
        finally:
            if bar is not None:
                bar.close()
        if where is self:
            return type(self)(self.session, new_id)
        try:
            compiled = type(self)(where.session, new_id)
            return await type(self).load(self.session, await compiled.dump())
        finally:
            await where.session.call("delete_program", {"program_id": where.id})
            await where.session.call("delete_program", {"program_id": new_id})

    async def _optimize(
        self,
        args: dict[str, Any],
        timeout: float | None,
        progress: Callable[[OptimizationProgress], Any] | None,
    ) -> str:
        items = self.session.stream(
            "optimize_stream", {"program_id": self.id, **args}, timeout=timeout
        )
        async with contextlib.aclosing(items):  # (closing it ends the worker's generator)
            async for item in items:
                if "program_id" in item:
                    return str(item["program_id"])
                update = OptimizationProgress(
                    candidate=item["candidate"],
                    score=item["score"],
                    best_score=item["best_score"],
                    instructions=tuple(item["instructions"]),
                )
                _monitor.emit(
                    self.session, "dspy.optimize.candidate", {"program_id": self.id, **item}
                )
                if progress is not None:
                    await _maybe_await(progress(update))
        raise RuntimeError(f"program {self.id!r}: the optimization ended without a program")

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


async def _maybe_await(value: Any) -> None:
    if inspect.isawaitable(value):
        await value
