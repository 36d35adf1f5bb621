"""``WorkerLaunch``: everything needed to start one worker process.

Its own module so that the config (which builds launches) and the worker
handle (which runs them) both import it without importing each other.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .. import protocol as p

__all__ = ["WorkerLaunch"]


@dataclass(frozen=True, slots=True)
class WorkerLaunch:
    """Everything needed to start one worker process."""

    argv: Sequence[str]
    env: dict[str, str]
    cwd: str | None
    init: p.Init
    max_frame_bytes: int
    startup_timeout: float
