"""What the modules of one pool share: made once by ``Pool``, read by the call
route (``_route``) and the worker slots (``_slots``)."""

from __future__ import annotations

from dataclasses import dataclass

from ._breaker import CircuitBreaker
from ._config import PoolConfig
from ._dispatch import Dispatcher
from ._events import Listeners
from ._lifecycle import Lifecycle
from ._runner import BackgroundTasks
from ._session import SessionManager
from ._worker import WorkerHandle

__all__ = ["PoolParts"]


@dataclass(frozen=True, slots=True)
class PoolParts:
    """One pool's shared parts. ``workers`` is the pool's one list of handles,
    filled and changed in place by the slots and read by everyone else."""

    name: str
    config: PoolConfig
    lifecycle: Lifecycle
    workers: list[WorkerHandle]
    dispatcher: Dispatcher
    sessions: SessionManager
    breaker: CircuitBreaker
    listeners: Listeners
    background: BackgroundTasks
