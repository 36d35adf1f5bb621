"""The last lines each worker wrote, kept on the host, and following them.

A worker's output (its stderr, where ``print`` goes, and the log records it
forwards) reaches the host's ``logging`` as records of the logger
``snakepool.worker.<pool>.<slot>``. :class:`WorkerLogs` is a handler on
``snakepool.worker`` keeping the last ``lines`` records of each worker slot
(a slot keeps its lines across restarts), for ``snakepool logs`` and the
dashboard.

Installing it changes nothing else the host sees: worker output reaches the
host's handlers exactly as before. The lines are INFO records; where logging
would drop INFO for these loggers, the handler lowers their level, so that
it hears them, and stops their propagation, handing on itself exactly what
was passed on before (and echoing output to stderr where snakepool echoes it
for a host that never configured logging).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import sys
import threading
from dataclasses import dataclass

import anyio

__all__ = ["DEFAULT_LINES", "Follower", "LogLine", "WorkerLogs", "worker_logs"]

#: Lines kept per worker slot.
DEFAULT_LINES = 1000
_PREFIX = "snakepool.worker."
_install_lock = threading.Lock()
_installed: WorkerLogs | None = None


@dataclass(frozen=True, slots=True)
class LogLine:
    """One line a worker wrote."""

    pool: str
    worker: int
    time: float  #: ``time.time()`` when the host got it
    level: str  #: INFO for output, else the level of the worker's log record
    line: str
    seq: int  #: its number among the lines of its worker slot (from 1)


class Follower:
    """New lines of a pool (or one worker) as they come: ``await get()``; at most
    ``limit`` wait, the oldest dropped beyond that (counted in ``dropped``).
    ``close()`` when done."""

    def __init__(self, logs: WorkerLogs, pool: str, worker: int | None, limit: int) -> None:
        self._logs = logs
        self.pool = pool
        self.worker = worker
        self.limit = limit
        self.lines: collections.deque[LogLine] = collections.deque()
        self.dropped = 0
        self._wakeup: anyio.Event | None = None

    def add(self, line: LogLine) -> None:
        if len(self.lines) >= self.limit:
            self.lines.popleft()
            self.dropped += 1
        self.lines.append(line)
        wakeup, self._wakeup = self._wakeup, None
        if wakeup is not None:
            wakeup.set()

    async def get(self) -> LogLine:
        """The next line (waits for one)."""
        while not self.lines:
            self._wakeup = wakeup = anyio.Event()
            await wakeup.wait()
        return self.lines.popleft()

    def close(self) -> None:
        with contextlib.suppress(ValueError):
            self._logs._followers.remove(self)


class WorkerLogs(logging.Handler):
    """The last ``lines`` lines of every worker slot (see the module's notes)."""

    def __init__(self, lines: int = DEFAULT_LINES) -> None:
        super().__init__(logging.DEBUG)
        if type(lines) is not int or lines < 1:
            raise ValueError(f"lines must be an int >= 1, got {lines!r}")
        self.limit = lines
        self._buffers: dict[tuple[str, int], collections.deque[LogLine]] = {}
        self._counts: collections.Counter[tuple[str, int]] = collections.Counter()
        self._followers: list[Follower] = []
        #: The logger's own level and propagation before this handler took them over.
        self._took: tuple[int, bool] | None = None

    # --- logging ---------------------------------------------------------------------

    def emit(self, record: logging.LogRecord) -> None:
        name = record.name
        if not name.startswith(_PREFIX):
            return
        pool, _, slot = name[len(_PREFIX) :].rpartition(".")
        if not pool or not slot.isdigit():
            return
        key = (pool, int(slot))
        self._counts[key] += 1
        try:
            text = record.getMessage()
        except Exception:  # (a bad format: keep what was given)
            text = str(record.msg)
        line = LogLine(pool, key[1], record.created, record.levelname, text, self._counts[key])
        buffer = self._buffers.get(key)
        if buffer is None:
            buffer = self._buffers[key] = collections.deque(maxlen=self.limit)
        buffer.append(line)
        for follower in tuple(self._followers):
            if follower.pool == pool and follower.worker in (None, key[1]):
                follower.add(line)
        if self._took is not None:
            self._hand_on(record, key)

    def _hand_on(self, record: logging.LogRecord, key: tuple[str, int]) -> None:
        """What the logger passed on before this handler took it over."""
        own_level, propagate = self._took  # type: ignore[misc]
        parent = logging.getLogger("snakepool")
        if not propagate:
            return
        # (the level the logger would have now: the host may configure logging later)
        level = own_level if own_level != logging.NOTSET else parent.getEffectiveLevel()
        if record.levelno >= level:
            parent.handle(record)
        elif record.levelno == logging.INFO and _echoes(parent):
            sys.stderr.write(f"[{key[0]}/{key[1]}] {record.getMessage()}\n")

    def install(self) -> None:
        """Listen to ``snakepool.worker`` (see the module's notes)."""
        logger = logging.getLogger(_PREFIX[:-1])
        if logger.getEffectiveLevel() > logging.INFO:
            self._took = (logger.level, logger.propagate)
            logger.setLevel(logging.INFO)
            logger.propagate = False
        logger.addHandler(self)

    def uninstall(self) -> None:
        logger = logging.getLogger(_PREFIX[:-1])
        logger.removeHandler(self)
        if self._took is not None:
            level, propagate = self._took
            logger.setLevel(level)
            logger.propagate = propagate
            self._took = None

    # --- reading ---------------------------------------------------------------------

    def workers(self, pool: str) -> list[int]:
        """The slots of ``pool`` that wrote anything."""
        return sorted(slot for name, slot in tuple(self._buffers) if name == pool)

    def lines(self, pool: str, worker: int | None = None, last: int | None = None) -> list[LogLine]:
        """The lines kept for ``pool`` (one worker slot, or all in time order), the
        ``last`` ones only if given."""
        if worker is not None:
            found = list(self._buffers.get((pool, worker), ()))
        else:
            found = sorted(
                (line for (name, _), buf in tuple(self._buffers.items()) if name == pool for line in buf),
                key=lambda line: line.time,
            )  # fmt: skip
        return found if last is None else found[len(found) - last :] if last else []

    def follow(
        self, pool: str, worker: int | None = None, *, last: int = 0, buffer: int = DEFAULT_LINES
    ) -> Follower:
        """A :class:`Follower` holding the ``last`` lines kept, then each new one."""
        follower = Follower(self, pool, worker, buffer)
        for line in self.lines(pool, worker, last):
            follower.add(line)
        self._followers.append(follower)
        return follower


def _echoes(logger: logging.Logger) -> bool:
    """Would snakepool echo worker output to stderr (no logging configured)?"""
    if logger.hasHandlers():
        return False
    last_resort = logging.lastResort
    if last_resort is not None and last_resort.level <= logging.INFO:
        return False
    return logger.manager.disable < logging.INFO


def worker_logs(lines: int = DEFAULT_LINES) -> WorkerLogs:
    """The process's :class:`WorkerLogs`, installed on first use (it keeps
    what workers write from then on)."""
    global _installed
    with _install_lock:
        if _installed is None:
            logs = WorkerLogs(lines)
            logs.install()
            _installed = logs
        return _installed
