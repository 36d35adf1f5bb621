"""``progress=True``: a terminal progress bar (tqdm, which DSPy itself depends
on) for ``Program.evaluate`` and ``Program.optimize``, fed by the same updates a
``progress`` callback gets."""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["EvaluationBar", "OptimizationBar"]


def _tqdm(**options: Any) -> Any:
    try:
        module = importlib.import_module("tqdm")
    except ImportError:  # (tqdm comes with dspy; a host without it gets a clear error)
        raise RuntimeError("progress=True needs tqdm: pip install tqdm") from None
    return module.tqdm(**options)


class EvaluationBar:
    """Examples done (of the devset's length, when it has one), the mean score, failures."""

    def __init__(self) -> None:
        self._bar = _tqdm(desc="evaluate", unit="example", leave=True)

    def __call__(self, update: Any) -> None:
        bar = self._bar
        if update.total is not None and bar.total != update.total:
            bar.total = update.total
        bar.update(update.done - bar.n)
        bar.set_postfix(score=f"{update.score:.3f}", failed=update.failed, refresh=False)

    def close(self) -> None:
        self._bar.close()


class OptimizationBar:
    """Candidates scored, with the last score and the best so far."""

    def __init__(self) -> None:
        self._bar = _tqdm(desc="optimize", unit="candidate", leave=True)

    def __call__(self, update: Any) -> None:
        self._bar.update(1)
        self._bar.set_postfix(
            score=f"{update.score:.3f}", best=f"{update.best_score:.3f}", refresh=False
        )

    def close(self) -> None:
        self._bar.close()
