"""DSPy in snakepool: the host-side helpers and the worker-side adapter, together.

The host helpers treat programs living in the workers as Python objects:

```python
async with snakepool.Pool("dspy", size=2) as pool, pool.session() as session:
    await snakepool.dspy.configure_lm(session, "openai/gpt-4o-mini", api_key=...)
    qa = await Program.create(session, "question -> answer", module="ChainOfThought")
    print(await qa(question="Why is the sky blue?"))           # {"reasoning": ..., "answer": ...}
    async for item in qa.stream(question="..."): ...          # {"field", "chunk"} ... {"prediction"}
    report = await qa.evaluate(devset, "exact_match")         # fanned out over the workers
    better = await qa.optimize(trainset, optimizer="COPRO")   # candidates scored as it goes
```

Nothing here imports DSPy: the programs live in the workers. The adapter the
workers run is :class:`DSPyAdapter` (in ``_adapter``, imported on first use;
``Pool("dspy")`` names it); it imports DSPy in ``setup`` only
(``pip install 'snakepool[dspy]'``). Its errors are below: they reach the host
as a ``RemoteError`` whose ``remote_kind`` is their ``kind``. The guide is
docs/dspy.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports
from ..errors import ErrorCategory, SnakepoolError

if TYPE_CHECKING:
    from ._adapter import DSPyAdapter as DSPyAdapter
    from ._evaluate import Evaluation as Evaluation
    from ._evaluate import EvaluationProgress as EvaluationProgress
    from ._evaluate import ExampleResult as ExampleResult
    from ._monitor import Monitor as Monitor
    from ._monitor import monitor as monitor
    from ._program import OptimizationProgress as OptimizationProgress
    from ._program import Program as Program
    from ._program import SessionLike as SessionLike
    from ._program import configure_lm as configure_lm

__all__ = [
    "EVENT_TOOL",
    "DSPyAdapter",
    "Evaluation",
    "EvaluationProgress",
    "ExampleResult",
    "LMCallError",
    "LMFuseOpen",
    "Monitor",
    "NoLMConfigured",
    "OptimizationProgress",
    "Program",
    "SessionLike",
    "UnknownProgram",
    "configure_lm",
    "monitor",
]

#: The host tool the workers report DSPy events to (a :func:`monitor` registers it).
EVENT_TOOL = "snakepool.dspy.event"


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


class LMFuseOpen(LMCallError):
    """The LM endpoint's fuse is open: the call failed at once, without a request."""

    category = ErrorCategory.APPLICATION
    kind = "dspy_lm_fuse_open"


# Imported on first use: the host helpers need anyio, the adapter needs DSPy.
_LAZY = {
    "DSPyAdapter": "._adapter",
    "Evaluation": "._evaluate",
    "EvaluationProgress": "._evaluate",
    "ExampleResult": "._evaluate",
    "Monitor": "._monitor",
    "monitor": "._monitor",
    "OptimizationProgress": "._program",
    "Program": "._program",
    "SessionLike": "._program",
    "configure_lm": "._program",
}


__getattr__ = lazy_exports(__name__, _LAZY)
