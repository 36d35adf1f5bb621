"""Imported only inside a worker (tests/sp_promises.py): the host never imports it."""

from __future__ import annotations


class WorkerOnlyError(Exception):
    """A handler's exception whose module the host has not imported."""
