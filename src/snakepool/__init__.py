"""snakepool: pools of long-lived Python worker subprocesses.

Public names are re-exported here; the modules that define them are private
to the package layout (``pool/``, ``protocol/``, ``adapters/``, ``workers/``).
"""

from typing import TYPE_CHECKING

from ._lazy import lazy_exports
from .errors import BadArguments as BadArguments
from .errors import CallTimeout as CallTimeout
from .errors import CircuitOpen as CircuitOpen
from .errors import ErrorCategory as ErrorCategory
from .errors import ExecutorBroken as ExecutorBroken
from .errors import InvalidSessionId as InvalidSessionId
from .errors import IsolationUnavailable as IsolationUnavailable
from .errors import PipelineStepFailed as PipelineStepFailed
from .errors import PoolClosed as PoolClosed
from .errors import PoolDisabled as PoolDisabled
from .errors import PoolOverloaded as PoolOverloaded
from .errors import ProtocolError as ProtocolError
from .errors import RemoteError as RemoteError
from .errors import ResourceExceeded as ResourceExceeded
from .errors import SessionExpired as SessionExpired
from .errors import SessionNotFound as SessionNotFound
from .errors import SessionStoreUnavailable as SessionStoreUnavailable
from .errors import SessionWorkerUnavailable as SessionWorkerUnavailable
from .errors import SnakepoolError as SnakepoolError
from .errors import UnknownCommand as UnknownCommand
from .errors import UnknownTool as UnknownTool
from .errors import WorkerCrashed as WorkerCrashed
from .errors import WorkerStartError as WorkerStartError
from .errors import WrongMode as WrongMode

if TYPE_CHECKING:  # imported on first use (see __getattr__), so a worker stays light
    from ._executor import Executor as Executor
    from .pipeline import Pipeline as Pipeline
    from .pool import BlockingPool as BlockingPool
    from .pool import CallStream as CallStream
    from .pool import ConfigError as ConfigError
    from .pool import Event as Event
    from .pool import Pool as Pool
    from .pool import PoolConfig as PoolConfig
    from .pool import PoolStatistics as PoolStatistics
    from .pool import Recovery as Recovery
    from .pool import Session as Session
    from .pool import SessionStore as SessionStore
    from .pool import Supervisor as Supervisor
    from .pool import SupervisorStatistics as SupervisorStatistics
    from .pool import WorkerStatistics as WorkerStatistics
    from .pool._variables import VariableUpdate as VariableUpdate
    from .protocol._values import register_value_type as register_value_type
    from .server import connect as connect

__version__ = "0.1.0"

# The host side (anyio, the pool, the server) is imported when first used:
# worker processes import this package too, and start-up time is theirs.
_LAZY = {
    "Executor": "._executor",
    "BlockingPool": ".pool",
    "CallStream": ".pool",
    "ConfigError": ".pool",
    "Event": ".pool",
    "Pool": ".pool",
    "PoolConfig": ".pool",
    "PoolStatistics": ".pool",
    "Recovery": ".pool",
    "Session": ".pool",
    "SessionStore": ".pool",
    "Supervisor": ".pool",
    "SupervisorStatistics": ".pool",
    "WorkerStatistics": ".pool",
    "VariableUpdate": ".pool._variables",
    "Pipeline": ".pipeline",
    "connect": ".server",
    "register_value_type": ".protocol._values",
}


__getattr__ = lazy_exports(__name__, _LAZY)


__all__ = [
    "BadArguments",
    "BlockingPool",
    "CallStream",
    "CallTimeout",
    "CircuitOpen",
    "ConfigError",
    "ErrorCategory",
    "Event",
    "Executor",
    "ExecutorBroken",
    "InvalidSessionId",
    "IsolationUnavailable",
    "Pipeline",
    "PipelineStepFailed",
    "Pool",
    "PoolClosed",
    "PoolConfig",
    "PoolDisabled",
    "PoolOverloaded",
    "PoolStatistics",
    "ProtocolError",
    "Recovery",
    "RemoteError",
    "ResourceExceeded",
    "Session",
    "SessionExpired",
    "SessionNotFound",
    "SessionStore",
    "SessionStoreUnavailable",
    "SessionWorkerUnavailable",
    "SnakepoolError",
    "Supervisor",
    "SupervisorStatistics",
    "UnknownCommand",
    "UnknownTool",
    "VariableUpdate",
    "WorkerCrashed",
    "WorkerStartError",
    "WorkerStatistics",
    "WrongMode",
    "__version__",
    "connect",
    "register_value_type",
]
