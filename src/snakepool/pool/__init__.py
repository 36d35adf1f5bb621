"""The host side: worker handles, ``Pool``, ``BlockingPool``."""

from ._blocking import BlockingPool as BlockingPool
from ._config import PoolConfig as PoolConfig
from ._config import discover_gpus as discover_gpus
from ._events import Event as Event
from ._events import PoolStatistics as PoolStatistics
from ._events import WorkerStatistics as WorkerStatistics
from ._pool import CallStream as CallStream
from ._pool import Pool as Pool
from ._recovery import Recovery as Recovery
from ._session import Session as Session
from ._store import SessionStore as SessionStore
from ._supervisor import ConfigError as ConfigError
from ._supervisor import Supervisor as Supervisor
from ._supervisor import SupervisorStatistics as SupervisorStatistics

__all__ = [
    "BlockingPool",
    "CallStream",
    "ConfigError",
    "Event",
    "Pool",
    "PoolConfig",
    "PoolStatistics",
    "Recovery",
    "Session",
    "SessionStore",
    "Supervisor",
    "SupervisorStatistics",
    "WorkerStatistics",
    "discover_gpus",
]
