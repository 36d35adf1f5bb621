"""Evaluating a program over a devset, fanned out over the pool's workers.

``concurrency`` tasks pull examples from the devset one at a time through an
unbuffered channel: the devset (a list, any iterable, or an async iterable)
is read only as fast as examples finish, so at most ``concurrency`` examples
are in flight and a lazy devset of any length keeps host memory flat (with
``keep_results=False``, nothing per example is kept). Each example is one
``evaluate_example`` call of the program's session: with affinity ``"hint"``
(the default) calls beyond what the session's worker takes run on the
others, which rebuild the session's programs from its persisted state once.
"""

from __future__ import annotations

import dataclasses
import inspect
import time
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Callable,
    Iterable,
    Mapping,
    Sequence,
    Sized,
)
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream

from . import _monitor
from ._progress import EvaluationBar

if TYPE_CHECKING:
    from ._program import Program

__all__ = ["DEFAULT_CONCURRENCY", "Evaluation", "EvaluationProgress", "ExampleResult", "evaluate"]

#: In flight when the pool's size cannot be read (a socket client's session, say).
DEFAULT_CONCURRENCY = 8


@dataclass(frozen=True, slots=True)
class ExampleResult:
    """One example: its prediction and score, or the error it failed with (score 0)."""

    index: int
    example: Mapping[str, Any]
    prediction: Mapping[str, Any] | None
    score: float
    error: str | None = None
    error_kind: str | None = None  # the error's kind (or its remote kind), when it has one


@dataclass(frozen=True, slots=True)
class EvaluationProgress:
    """Where an evaluation stands: examples done (failed ones included) and the mean so far."""

    done: int
    failed: int
    score: float
    elapsed: float
    total: int | None = None  # the devset's length, when it has one


@dataclass(frozen=True, slots=True)
class Evaluation:
    """The aggregate ``score`` (the mean, in 0..1, a failed example counting 0) and details."""

    score: float
    count: int
    failed: int
    elapsed: float
    results: tuple[ExampleResult, ...]  # by index; empty with keep_results=False


async def evaluate(
    program: Program,
    devset: Iterable[Mapping[str, Any]] | AsyncIterable[Mapping[str, Any]],
    metric: str | Callable[..., Any] = "exact_match",
    *,
    concurrency: int | None = None,
    progress: Callable[[EvaluationProgress], Any] | bool | None = None,
    keep_results: bool = True,
    max_errors: int | None = 10,
    input_keys: Sequence[str] | None = None,
    timeout: float | None = None,
) -> Evaluation:
    """Run ``program`` on every example of ``devset`` and score it with ``metric``.

    ``metric``: ``"exact_match"``, ``"f1"`` or a host tool's name (scored in
    the worker; a tool is called back on the host), or a function
    ``metric(example, prediction) -> bool | float`` (sync or async) run on the
    host. ``concurrency``: examples in flight (default: the pool's workers x
    ``worker_concurrency``). ``progress(EvaluationProgress)`` after each
    example (``progress=True``: a progress bar on the terminal). An example that fails (an LM error, a timeout) scores 0 and is
    counted; past ``max_errors`` failures (``None``: never) the evaluation
    stops with that error.
    """
    if not isinstance(metric, str) and not callable(metric):
        raise TypeError(
            f"metric must be 'exact_match', 'f1', a host tool's name or a function, got {metric!r}"
        )
    if max_errors is not None and (isinstance(max_errors, bool) or max_errors < 0):
        raise ValueError(f"max_errors must be an int >= 0 or None, got {max_errors!r}")
    rows = _examples(devset)
    total = len(devset) if isinstance(devset, Sized) else None
    width = _concurrency(program.session) if concurrency is None else concurrency
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"concurrency must be an int >= 1, got {concurrency!r}")
    bar = EvaluationBar() if progress is True else None
    hear: Callable[[EvaluationProgress], Any] | None = bar
    if bar is None and callable(progress):
        hear = progress
    run = _Run(program, metric, total, keep_results, max_errors, input_keys, timeout, hear)
    try:
        open_session = getattr(program.session, "session", None)
        if not callable(open_session):
            return await run.fan_out(rows, width)
        # A pool: a program made without a session lives in one worker; copy it into a
        # session of its own, which every worker can rebuild it from.
        from ._program import Program as ProgramClass

        data = await program.dump()
        async with open_session() as session:
            run.program = await ProgramClass.load(session, data)
            return await run.fan_out(rows, width)
    finally:
        if bar is not None:
            bar.close()


class _Run:
    """One evaluation: its settings, its counts, and the calls of its examples."""

    def __init__(
        self,
        program: Program,
        metric: str | Callable[..., Any],
        total: int | None,
        keep_results: bool,
        max_errors: int | None,
        input_keys: Sequence[str] | None,
        timeout: float | None,
        progress: Callable[[EvaluationProgress], Any] | None,
    ) -> None:
        self.program = program
        # (a function scores on the host; a name in the worker)
        self.host_metric = None if isinstance(metric, str) else metric
        self.remote_metric = metric if isinstance(metric, str) else None
        self.total = total
        self.keep = keep_results
        self.max_errors = max_errors
        self.input_keys = list(input_keys) if input_keys is not None else None
        self.timeout = timeout
        self.progress = progress
        self.started = time.monotonic()
        self.done = self.failed = 0
        self.sum = 0.0
        self.results: list[ExampleResult] = []
        #: What ends the evaluation: too many failures, or the host's own code raising.
        self.fatal: BaseException | None = None

    async def fan_out(self, rows: AsyncIterator[dict[str, Any]], width: int) -> Evaluation:
        # Errors end the task group by cancelling it and are raised after it, as themselves.
        send, receive = anyio.create_memory_object_stream[tuple[int, Mapping[str, Any]]](0)
        async with anyio.create_task_group() as group:
            for _ in range(width):
                group.start_soon(self._take, receive.clone(), group.cancel_scope)
            receive.close()
            async with send:
                try:
                    index = 0
                    async for example in rows:
                        await send.send((index, example))  # waits for a free task: back-pressure
                        index += 1
                except Exception as exc:  # reading the devset failed
                    self.fatal = self.fatal or exc
                    group.cancel_scope.cancel()
        if self.fatal is not None:
            raise self.fatal
        return Evaluation(
            score=self.sum / self.done if self.done else 0.0,
            count=self.done,
            failed=self.failed,
            elapsed=time.monotonic() - self.started,
            results=tuple(sorted(self.results, key=lambda r: r.index)),
        )

    async def _take(
        self,
        examples: MemoryObjectReceiveStream[tuple[int, Mapping[str, Any]]],
        scope: anyio.CancelScope,
    ) -> None:
        async with examples:
            async for index, example in examples:
                try:
                    await self._one(index, example)
                except Exception as exc:  # the host metric or the progress callback raised
                    self.fatal = self.fatal or exc
                if self.fatal is not None:
                    scope.cancel()

    async def _one(self, index: int, example: Mapping[str, Any]) -> None:
        program = self.program
        args: dict[str, Any] = {
            "program_id": program.id,
            "example": example,
            "metric": self.remote_metric,
        }
        if self.input_keys is not None:
            args["input_keys"] = self.input_keys
        error: BaseException | None = None
        prediction: Mapping[str, Any] | None = None
        score = 0.0
        try:
            answer = await program.session.call("evaluate_example", args, timeout=self.timeout)
            prediction = answer["prediction"]
            score = 0.0 if answer["score"] is None else float(answer["score"])
        except Exception as exc:
            error = exc
        if error is None and self.host_metric is not None:
            value = self.host_metric(example, prediction)
            score = float(await value if inspect.isawaitable(value) else value)
        self._count(
            ExampleResult(
                index=index,
                example=example if self.keep else {},
                prediction=prediction,
                score=score,
                error=None if error is None else f"{type(error).__name__}: {error}",
                error_kind=_kind(error),
            ),
            error,
        )
        update = EvaluationProgress(
            done=self.done,
            failed=self.failed,
            score=self.sum / self.done,
            elapsed=time.monotonic() - self.started,
            total=self.total,
        )
        data = {"program_id": program.id, **dataclasses.asdict(update)}
        _monitor.emit(program.session, "dspy.evaluate.progress", data)
        if self.progress is not None:
            value = self.progress(update)
            if inspect.isawaitable(value):
                await value

    def _count(self, result: ExampleResult, error: BaseException | None) -> None:
        self.done += 1
        self.sum += result.score
        if self.keep:
            self.results.append(result)
        if error is not None:
            self.failed += 1
            if self.max_errors is not None and self.failed > self.max_errors:
                self.fatal = self.fatal or error


def _concurrency(owner: Any) -> int:
    pool = getattr(owner, "_pool", owner)  # (a Session keeps its pool there)
    config = getattr(pool, "config", None)
    workers = getattr(config, "worker_count", None)
    per_worker = getattr(config, "worker_concurrency", None)
    if isinstance(workers, int) and isinstance(per_worker, int):
        return max(1, workers * per_worker)
    return DEFAULT_CONCURRENCY


def _examples(
    devset: Iterable[Mapping[str, Any]] | AsyncIterable[Mapping[str, Any]],
) -> AsyncIterator[dict[str, Any]]:
    """The devset's rows as dicts, read lazily; ``TypeError`` now for what is no devset."""
    if isinstance(devset, AsyncIterable):

        async def from_async() -> AsyncIterator[dict[str, Any]]:
            index = 0
            async for row in devset:
                yield _example(index, row)
                index += 1

        return from_async()
    if isinstance(devset, Iterable) and not isinstance(devset, str | bytes | Mapping):

        async def from_sync() -> AsyncIterator[dict[str, Any]]:
            for index, row in enumerate(devset):
                yield _example(index, row)

        return from_sync()
    raise TypeError(
        f"devset must be an iterable (or async iterable) of example dicts, "
        f"got {type(devset).__name__}"
    )


def _example(index: int, row: Any) -> dict[str, Any]:
    if isinstance(row, Mapping):
        return dict(row)
    to_dict = getattr(row, "toDict", None)  # a dspy.Example
    if callable(to_dict):
        return dict(to_dict())
    raise TypeError(
        f"devset[{index}] must be a dict of inputs and labels, got {type(row).__name__}"
    )


def _kind(error: BaseException | None) -> str | None:
    if error is None:
        return None
    kind = getattr(error, "remote_kind", None) or getattr(error, "kind", None)
    return kind if isinstance(kind, str) else None
