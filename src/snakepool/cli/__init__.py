"""The ``snakepool`` command: up, call, status, logs, doctor, new-adapter, bench.

The client-side commands (``call``, ``status``, ``logs``) load no pool
machinery: the pool, the server and the benchmark are imported inside the
commands that run them (``up``, ``doctor``, ``bench``).
"""

from ._main import _parser as _parser
from ._main import main as main
from ._up import _write_private as _write_private

__all__ = ["main"]
