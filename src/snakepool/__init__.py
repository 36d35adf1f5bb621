"""snakepool: pools of long-lived Python worker subprocesses.

Public names are re-exported here; the modules that define them are private
to the package layout (``pool/``, ``protocol/``, ``adapters/``, ``workers/``).
"""

from .errors import CallTimeout as CallTimeout
from .errors import CircuitOpen as CircuitOpen
from .errors import ErrorCategory as ErrorCategory
from .errors import PoolClosed as PoolClosed
from .errors import PoolDisabled as PoolDisabled
from .errors import PoolOverloaded as PoolOverloaded
from .errors import ProtocolError as ProtocolError
from .errors import RemoteError as RemoteError
from .errors import ResourceExceeded as ResourceExceeded
from .errors import SessionExpired as SessionExpired
from .errors import SessionNotFound as SessionNotFound
from .errors import SessionWorkerUnavailable as SessionWorkerUnavailable
from .errors import SnakepoolError as SnakepoolError
from .errors import UnknownCommand as UnknownCommand
from .errors import WorkerCrashed as WorkerCrashed
from .errors import WorkerStartError as WorkerStartError
from .pool import BlockingPool as BlockingPool
from .pool import CallStream as CallStream
from .pool import Event as Event
from .pool import Pool as Pool
from .pool import PoolStatistics as PoolStatistics
from .pool import WorkerStatistics as WorkerStatistics
from .pool._session import Session as Session
from .pool._variables import VariableUpdate as VariableUpdate
from .server import connect as connect

__version__ = "0.1.0"

__all__ = [
    "BlockingPool",
    "CallStream",
    "CallTimeout",
    "CircuitOpen",
    "ErrorCategory",
    "Event",
    "Pool",
    "PoolClosed",
    "PoolDisabled",
    "PoolOverloaded",
    "PoolStatistics",
    "ProtocolError",
    "RemoteError",
    "ResourceExceeded",
    "Session",
    "SessionExpired",
    "SessionNotFound",
    "SessionWorkerUnavailable",
    "SnakepoolError",
    "UnknownCommand",
    "VariableUpdate",
    "WorkerCrashed",
    "WorkerStartError",
    "WorkerStatistics",
    "__version__",
    "connect",
]
