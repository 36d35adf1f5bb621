"""Metrics, examples and optimizers in a worker.

Metrics: ``exact_match`` (every labelled output field, case and whitespace
ignored), ``f1`` (token F1 of the first output field), or the name of a host
tool called with ``{"example", "prediction"}`` that returns a bool or a score.

Optimizers: ``LabeledFewShot`` and ``BootstrapFewShot`` (demos), and
``COPRO``, which proposes instructions and scores each candidate on the
trainset; every scored candidate is reported while it runs (a DSPy callback
on ``Evaluate``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any

from ..adapters import CallContext
from ..errors import RemoteError, UnknownTool
from ._programs import Program
from ._values import BUILTIN_METRICS, json_safe, normalize, prediction_dict, token_f1

__all__ = [
    "OPTIMIZERS",
    "AbortOptimization",
    "Candidates",
    "examples",
    "make_metric",
    "teleprompter",
]

OPTIMIZERS = ("BootstrapFewShot", "LabeledFewShot", "COPRO")
#: COPRO's defaults here: small, so that an optimization is a few dozen LM calls.
COPRO_DEFAULTS = {"breadth": 2, "depth": 1, "init_temperature": 1.0}


class AbortOptimization(BaseException):
    """Stops an optimizer at once (optimizers catch ``Exception`` per example)."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


def make_metric(ctx: CallContext, program: Program, name: Any, threshold: float) -> Any:
    """The metric ``name`` as DSPy calls it: ``metric(example, prediction, trace=None)``."""
    if not isinstance(name, str) or not name:
        raise ValueError(
            f"metric must be {', '.join(BUILTIN_METRICS)} or a host tool's name, got {name!r}"
        )
    outputs = program.output_names

    if name == "exact_match":

        def exact_match(example: Any, prediction: Any, trace: Any = None) -> bool:
            labelled = [field for field in outputs if field in example]
            return bool(labelled) and all(
                normalize(example[field]) == normalize(prediction.get(field)) for field in labelled
            )

        return exact_match

    if name == "f1":

        def f1(example: Any, prediction: Any, trace: Any = None) -> float | bool:
            field = outputs[0]
            score = token_f1(prediction.get(field), example.get(field))
            return score >= threshold if trace is not None else score

        return f1

    tool = name.removeprefix("tool:")

    def host_metric(example: Any, prediction: Any, trace: Any = None) -> Any:
        args = {"example": json_safe(example.toDict()), "prediction": prediction_dict(prediction)}
        try:
            value = ctx.call_host(tool, args)
        except RemoteError as exc:
            if exc.remote_kind == UnknownTool.kind:
                raise AbortOptimization(
                    ValueError(
                        f"unknown metric {name!r}: not one of {', '.join(BUILTIN_METRICS)} "
                        f"and not a registered host tool ({exc})"
                    )
                ) from None
            raise
        if isinstance(value, bool):
            return value
        if isinstance(value, int | float):
            return float(value) >= threshold if trace is not None else float(value)
        raise AbortOptimization(
            TypeError(
                f"metric host tool {tool!r} must return a bool or a number, "
                f"got {type(value).__name__}"
            )
        )

    return host_metric


def examples(
    dspy: Any,
    program: Program,
    rows: Any,
    keys: list[str] | None,
    *,
    what: str = "trainset",
    labelled: bool = True,
) -> list[Any]:
    """``rows`` (dicts of inputs and labelled outputs) as ``dspy.Example``s."""
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"{what} must be a non-empty list of dicts (inputs and outputs)")
    keys = list(keys) if keys is not None else program.input_names
    unknown_keys = [k for k in keys if k not in program.input_names]
    if unknown_keys:
        raise ValueError(
            f"input_keys {unknown_keys} are not inputs of program {program.program_id!r} "
            f"(its inputs: {program.input_names})"
        )
    made = []
    for index, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise ValueError(f"{what}[{index}] must be a dict, got {type(row).__name__}")
        missing = [k for k in keys if k not in row]
        if missing:
            raise ValueError(f"{what}[{index}] is missing input field(s) {missing}")
        if labelled and not any(name in row for name in program.output_names):
            raise ValueError(
                f"{what}[{index}] has none of the output fields {program.output_names}"
            )
        made.append(dspy.Example(**row).with_inputs(*keys))
    return made


def teleprompter(
    dspy: Any, optimizer: str, metric: Any, options: dict[str, Any]
) -> tuple[Any, dict[str, Any]]:
    """The optimizer object and the extra arguments of its ``compile``."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}: use one of {', '.join(OPTIMIZERS)}")
    compile_args: dict[str, Any] = {}
    if optimizer == "LabeledFewShot":
        make, arguments = dspy.LabeledFewShot, dict(options)
    elif optimizer == "BootstrapFewShot":
        make, arguments = dspy.BootstrapFewShot, {"metric": metric, **options}
    else:
        threads = options.pop("num_threads", 1)
        make, arguments = dspy.COPRO, {"metric": metric, **COPRO_DEFAULTS, **options}
        compile_args["eval_kwargs"] = {"num_threads": threads, "display_progress": False}
    try:
        return make(**arguments), compile_args
    except (TypeError, ValueError) as exc:
        raise ValueError(f"optimizer {optimizer!r} rejects options {options}: {exc}") from None


class Candidates:
    """Scored candidates as an optimizer evaluates them (a DSPy callback on ``Evaluate``).

    ``report(item)`` gets ``{"candidate", "score", "best_score", "instructions"}``
    per evaluation (score in 0..1); ``stop`` set makes the next one abort.
    """

    def __init__(self, dspy: Any, report: Callable[[dict[str, Any]], None]) -> None:
        self.report = report
        self.stop = threading.Event()
        self.count = 0
        self.best: float | None = None
        self._started: dict[str, list[str]] = {}
        owner = self

        class Callback(dspy.utils.callback.BaseCallback):  # type: ignore[misc]
            def on_evaluate_start(self, call_id: str, instance: Any, inputs: Any) -> None:
                owner.check()
                program = inputs.get("program")
                owner._started[call_id] = [
                    str(p.signature.instructions) for _, p in program.named_predictors()
                ]

            def on_evaluate_end(self, call_id: str, outputs: Any, exception: Any = None) -> None:
                instructions = owner._started.pop(call_id, [])
                if outputs is not None:
                    owner.scored(instructions, float(outputs.score) / 100.0)

        self.callback = Callback()

    def check(self) -> None:
        if self.stop.is_set():
            raise AbortOptimization(RuntimeError("the optimization was cancelled"))

    def scored(self, instructions: list[str], score: float) -> None:
        self.count += 1
        self.best = score if self.best is None else max(self.best, score)
        self.report(
            {
                "candidate": self.count,
                "score": score,
                "best_score": self.best,
                "instructions": instructions,
            }
        )
