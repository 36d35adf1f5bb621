"""Pipelines: steps that call pool commands or DSPy programs, composed.

```python
from snakepool.pipeline import Pipeline, call, parallel, program, when

pipe = Pipeline(
    call("clean", "general", "echo", lambda out: {"value": out["question"].strip()}),
    parallel(
        program("answer", qa, lambda out: {"question": out["clean"]}, timeout=30),
        call("size", "general", "echo", lambda out: {"value": len(out["clean"])},
             continue_on_error=True),
    ),
    when(lambda out: out["size"] > 100, call("summarize", "optimizer", "echo", ...)),
)
result = await pipe.run({"question": " Why is the sky blue? "}, pools=supervisor)
result.outputs["answer"], result.steps["answer"].duration
```

Steps run in order; ``parallel(...)`` runs its steps at once; ``when(cond,
then, otherwise)`` runs one branch. Every step has a unique name, and its
output is kept under that name in the outputs the later steps see (with the
run's inputs): a step's ``args``/``inputs`` are a dict, or a function of
those outputs (sync or async). A step targets a pool by name (resolved in
``pools``: a ``Supervisor`` or a mapping, checked before anything runs) or
by object (a ``Pool``, a ``Session``; a ``Program`` holds its own).

Per step: ``timeout`` (seconds; exceeding it is a ``CallTimeout``) and
``continue_on_error`` (the step's failure is recorded, its output is
``None``, the pipeline goes on). Otherwise a failure raises
:class:`~snakepool.errors.PipelineStepFailed` naming the step (``.step``,
``.error``, ``.error_kind``, ``.result``), and the steps running beside it
in a ``parallel`` are cancelled. ``PipelineResult.steps`` holds every step's
status, output, error, start (seconds since the run began) and duration.
"""

from __future__ import annotations

import contextlib
import inspect
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import anyio

from .errors import CallTimeout, PipelineStepFailed

__all__ = [
    "Call",
    "Parallel",
    "Pipeline",
    "PipelineResult",
    "PipelineStepFailed",
    "ProgramStep",
    "Sequence",
    "Step",
    "StepResult",
    "Task",
    "When",
    "call",
    "parallel",
    "program",
    "sequence",
    "task",
    "when",
]

Outputs = Mapping[str, Any]
#: A step's arguments: a dict, or a function of the outputs so far (sync or async).
Args = Mapping[str, Any] | Callable[[Outputs], Any] | None


# --- steps --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """A named unit of work: run it with the outputs so far, get its output."""

    name: str
    timeout: float | None = field(default=None, kw_only=True)
    continue_on_error: bool = field(default=False, kw_only=True)

    async def execute(self, outputs: Outputs, pools: Any) -> Any:
        raise NotImplementedError


@dataclass(frozen=True)
class Call(Step):
    """``pool.call(command, args)``: ``pool`` a name in ``pools``, a Pool or a Session."""

    pool: Any = None
    command: str = ""
    args: Args = None

    async def execute(self, outputs: Outputs, pools: Any) -> Any:
        target = _resolve(self, pools)
        return await target.call(self.command, await _arguments(self.args, outputs))


@dataclass(frozen=True)
class ProgramStep(Step):
    """``await program(**inputs)`` for a ``snakepool.dspy.Program`` (its session picks the pool)."""

    program: Any = None
    inputs: Args = None

    async def execute(self, outputs: Outputs, pools: Any) -> Any:
        return await self.program(**await _arguments(self.inputs, outputs))


@dataclass(frozen=True)
class Task(Step):
    """``await fn(outputs)``: anything else (an optimization, a store...)."""

    fn: Callable[[Outputs], Any] | None = None

    async def execute(self, outputs: Outputs, pools: Any) -> Any:
        assert self.fn is not None
        return await _maybe_await(self.fn(outputs))


@dataclass(frozen=True)
class Sequence:
    """Steps one after the other."""

    steps: tuple[Any, ...]


@dataclass(frozen=True)
class Parallel:
    """Steps at the same time (each sees the outputs from before the group)."""

    steps: tuple[Any, ...]


@dataclass(frozen=True)
class When:
    """``then`` if ``condition(outputs)`` is true, else ``otherwise`` (if any); the
    branch not taken is recorded as skipped."""

    condition: Callable[[Outputs], Any]
    then: Any
    otherwise: Any = None
    name: str | None = None  # names the condition when it raises (default: "when:<then>")

    @property
    def label(self) -> str:
        if self.name is not None:
            return self.name
        first = next(_leaves(self.then), None)
        return f"when:{first.name if first is not None else '?'}"


def call(
    name: str,
    pool: Any,
    command: str,
    args: Args = None,
    *,
    timeout: float | None = None,
    continue_on_error: bool = False,
) -> Call:
    return Call(
        name,
        pool=pool,
        command=command,
        args=args,
        timeout=timeout,
        continue_on_error=continue_on_error,
    )


def program(
    name: str,
    program: Any,
    inputs: Args = None,
    *,
    timeout: float | None = None,
    continue_on_error: bool = False,
) -> ProgramStep:
    return ProgramStep(
        name, program=program, inputs=inputs, timeout=timeout, continue_on_error=continue_on_error
    )


def task(
    name: str,
    fn: Callable[[Outputs], Any],
    *,
    timeout: float | None = None,
    continue_on_error: bool = False,
) -> Task:
    return Task(name, fn=fn, timeout=timeout, continue_on_error=continue_on_error)


def sequence(*steps: Any) -> Sequence:
    return Sequence(tuple(steps))


def parallel(*steps: Any) -> Parallel:
    return Parallel(tuple(steps))


def when(
    condition: Callable[[Outputs], Any],
    then: Any,
    otherwise: Any = None,
    *,
    name: str | None = None,
) -> When:
    return When(condition, then, otherwise, name)


# --- results ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StepResult:
    """How one step went: ``status`` is ``ok``, ``failed``, ``skipped`` or ``cancelled``."""

    name: str
    status: str
    output: Any = None
    error: BaseException | None = None
    error_kind: str | None = None
    started: float = 0.0  # seconds since the run began
    duration: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass(frozen=True, slots=True)
class PipelineResult:
    """The outputs (the inputs, then each step's output by name) and every step's result."""

    outputs: Mapping[str, Any]
    steps: Mapping[str, StepResult]  # in the pipeline's order
    duration: float

    @property
    def ok(self) -> bool:
        """No step failed (failures allowed by ``continue_on_error`` included)."""
        return all(step.status != "failed" for step in self.steps.values())


# --- the pipeline -------------------------------------------------------------------------


class Pipeline:
    """Steps in sequence; ``await pipeline.run(inputs, pools=...)`` -> :class:`PipelineResult`."""

    def __init__(self, *steps: Any) -> None:
        self.root = Sequence(tuple(steps))
        self.leaves = list(_leaves(self.root))
        seen: set[str] = set()
        for leaf in self.leaves:
            if not isinstance(leaf.name, str) or not leaf.name:
                raise ValueError(f"a pipeline step needs a name (a non-empty str), got {leaf!r}")
            if leaf.name in seen:
                raise ValueError(
                    f"two pipeline steps are named {leaf.name!r}: names must be unique"
                )
            seen.add(leaf.name)
            if leaf.timeout is not None and not (
                isinstance(leaf.timeout, int | float) and leaf.timeout > 0
            ):
                raise ValueError(
                    f"pipeline step {leaf.name!r}: timeout must be a number > 0, got {leaf.timeout!r}"
                )

    async def run(
        self, inputs: Mapping[str, Any] | None = None, *, pools: Mapping[str, Any] | None = None
    ) -> PipelineResult:
        """Run every step; raises ``PipelineStepFailed`` for a step that fails (unless allowed)."""
        inputs = dict(inputs or {})
        for leaf in self.leaves:
            if leaf.name in inputs:
                raise ValueError(
                    f"pipeline step {leaf.name!r} has the name of an input: its output would "
                    "replace it"
                )
            if isinstance(leaf, Call):
                _resolve(leaf, pools)  # (a missing pool fails the run before anything runs)
        run = _Run(self, inputs, pools)
        await run.node(self.root)
        return run.result()


class _Run:
    def __init__(self, pipeline: Pipeline, inputs: dict[str, Any], pools: Any) -> None:
        self.pipeline = pipeline
        self.pools = pools
        self.outputs = inputs
        self.results: dict[str, StepResult] = {}
        self.started = time.monotonic()

    def result(self) -> PipelineResult:
        order = [leaf.name for leaf in self.pipeline.leaves if leaf.name in self.results]
        return PipelineResult(
            outputs=MappingProxyType(dict(self.outputs)),
            steps=MappingProxyType({name: self.results[name] for name in order}),
            duration=time.monotonic() - self.started,
        )

    async def node(self, node: Any) -> None:
        if isinstance(node, Step):
            await self.leaf(node)
        elif isinstance(node, Pipeline):
            await self.node(node.root)
        elif isinstance(node, Sequence):
            for child in node.steps:
                await self.node(child)
        elif isinstance(node, Parallel):
            await self.parallel(node)
        elif isinstance(node, When):
            try:
                chosen = bool(await _maybe_await(node.condition(self.view())))
            except Exception as exc:
                raise PipelineStepFailed.of(node.label, exc, self.result()) from exc
            taken, skipped = (node.then, node.otherwise) if chosen else (node.otherwise, node.then)
            for leaf in _leaves(skipped):
                self.results[leaf.name] = StepResult(leaf.name, "skipped", started=self.now())
            if taken is not None:
                await self.node(taken)

    async def parallel(self, node: Parallel) -> None:
        failure: PipelineStepFailed | None = None

        async def child(step: Any) -> None:
            nonlocal failure
            try:
                await self.node(step)
            except PipelineStepFailed as exc:
                failure = failure or exc
                group.cancel_scope.cancel()  # (the others are recorded as cancelled)

        async with anyio.create_task_group() as group:
            for step in node.steps:
                group.start_soon(child, step)
        if failure is not None:
            failure.result = self.result()
            raise failure

    async def leaf(self, step: Step) -> None:
        started = self.now()
        error: BaseException | None = None
        output: Any = None
        try:
            with _deadline(step.timeout) as scope:
                output = await step.execute(self.view(), self.pools)
            if scope is not None and scope.cancelled_caught:
                error = CallTimeout(
                    f"pipeline step {step.name!r} took longer than its timeout ({step.timeout}s)"
                )
        except anyio.get_cancelled_exc_class():
            self.results[step.name] = StepResult(
                step.name, "cancelled", started=started, duration=self.now() - started
            )
            raise
        except Exception as exc:
            error = exc
        duration = self.now() - started
        if error is None:
            self.outputs[step.name] = output
            self.results[step.name] = StepResult(
                step.name, "ok", output, started=started, duration=duration
            )
            return
        failed = PipelineStepFailed.of(step.name, error)
        self.outputs[step.name] = None
        self.results[step.name] = StepResult(
            step.name, "failed", None, error, failed.error_kind, started, duration
        )
        if not step.continue_on_error:
            failed.result = self.result()
            raise failed from error

    def view(self) -> Outputs:
        return MappingProxyType(dict(self.outputs))

    def now(self) -> float:
        return time.monotonic() - self.started


@contextlib.contextmanager
def _deadline(timeout: float | None) -> Iterator[anyio.CancelScope | None]:
    if timeout is None:
        yield None
    else:
        with anyio.move_on_after(timeout) as scope:
            yield scope


def _leaves(node: Any) -> Iterator[Step]:
    if node is None:
        return
    if isinstance(node, Step):
        yield node
    elif isinstance(node, Pipeline):
        yield from _leaves(node.root)
    elif isinstance(node, Sequence | Parallel):
        for child in node.steps:
            yield from _leaves(child)
    elif isinstance(node, When):
        if not callable(node.condition):
            raise TypeError(f"when(...) needs a callable condition, got {node.condition!r}")
        yield from _leaves(node.then)
        yield from _leaves(node.otherwise)
    else:
        raise TypeError(
            f"not a pipeline step: {node!r} (use call, program, task, sequence, parallel, when)"
        )


def _resolve(step: Call, pools: Any) -> Any:
    target = step.pool
    if not isinstance(target, str):
        if not callable(getattr(target, "call", None)):
            raise TypeError(
                f"pipeline step {step.name!r}: pool must be a pool name, a Pool or a Session, "
                f"got {target!r}"
            )
        return target
    if pools is None or target not in pools:
        known = ", ".join(pools) if pools is not None else "none: pass pools=..."
        raise ValueError(f"pipeline step {step.name!r}: no pool named {target!r} (pools: {known})")
    return pools[target]


async def _arguments(args: Args, outputs: Outputs) -> dict[str, Any]:
    value = args(outputs) if callable(args) else args
    value = await _maybe_await(value)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise TypeError(f"a step's arguments must be a dict, got {type(value).__name__}")
    return dict(value)


async def _maybe_await(value: Any) -> Any:
    if inspect.isawaitable(value):
        return await value
    return value
