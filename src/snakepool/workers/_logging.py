"""Log records of the worker's code, forwarded to the host as ``Log`` messages."""

from __future__ import annotations

import logging
from collections.abc import Callable

from .. import protocol as p

__all__ = ["install_log_forwarding"]


class _ForwardingHandler(logging.Handler):
    """Sends log records to the host as ``Log`` messages."""

    def __init__(self, send: Callable[[p.Message], None]) -> None:
        super().__init__(level=logging.INFO)
        self.send = send

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
            self.send(p.Log(level=record.levelno, logger=record.name, message=message))
        except Exception:
            self.handleError(record)


def install_log_forwarding(send: Callable[[p.Message], None], log: logging.Logger) -> None:
    """Root logging (WARNING and up) and ``log`` (INFO and up) reach the host."""
    root = logging.getLogger()
    handler = _ForwardingHandler(send)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root.addHandler(handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.WARNING)
    log.setLevel(logging.INFO)
