"""The worker-side runtime; run it as ``python -m snakepool.workers``."""

from ._runtime import main as main

__all__ = ["main"]
