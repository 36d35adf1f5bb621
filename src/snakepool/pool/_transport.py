"""The transport seam: how frames reach one worker and how its death is seen.

A :class:`~._worker.WorkerHandle` speaks the protocol (pending calls, the
``Connection``, hello, pings, recycling); a :class:`Transport` moves its bytes
and watches the process: it starts the worker, writes frames (batched per
event-loop turn where it can), delivers what the worker sends to the handle's
``feed_stdout`` and its log lines to ``stderr_line``, signals it, and says how
it ended. The handle owns every decision (why a worker was killed, what an
exit means for the calls it held); the transport only reports facts.

The transports are local pipes (:mod:`._pipes`): a subprocess spawned by
the host or forked by the pool's template, its stdin/stdout/stderr pipes
served by asyncio callbacks or, on other backends, by anyio streams; and
Ray (:mod:`._ray`, ``backend="ray"``): a worker subprocess supervised by a
Ray actor on some node of a cluster, its pipes relayed in batches.

What the Ray transport implements (dispatch, sessions and recovery untouched):

- ``open(launch)``: create the actor (``launch.argv``/``env`` become its
  runtime environment), set ``pid`` to an identity worth printing in
  ``describe()`` (the worker's pid on its node), and keep one long poll of
  the actor's output (frames, log lines) in flight for the life of the context;
- ``write``: append frames to a buffer flushed once per loop turn as one
  remote call (the actor feeds them to the worker's stdin; its reply brings
  back what the worker answered by then);
- ``receive``: hand the worker's output, in order, to ``receiver.feed_stdout``
  until it returns true, the stream ends, or the actor is seen dead (Ray's
  ``ActorDiedError``: its death seen from the actor itself, not only from its
  stream, like ``_watch_exit`` does for a local process);
- ``wait``: the exit code (negative: the signal that killed it; a lost node
  reads as ``-SIGKILL``); ``signal``: SIGKILL is ``ray.kill``, others are
  forwarded to the actor's process group; ``close_stdin``: a final remote
  call that closes the worker's stdin (its planned exit);
- ``rss_bytes``: the actor's process tree, as its node reports it.
"""

from __future__ import annotations

import abc
import contextlib
import logging
import signal
from collections.abc import Callable
from typing import Protocol

from ._launch import WorkerLaunch

__all__ = ["Receiver", "Transport", "TransportFactory"]


class Receiver(Protocol):
    """What a transport delivers to: the worker's handle."""

    log: logging.Logger

    def describe(self) -> str:
        """The worker, for log lines ("worker pool/0 (pid 123)")."""
        ...

    def feed_stdout(self, data: bytes) -> bool:
        """Bytes from the worker (``b""``: the end); true once the stream is over
        (ended, or broke the protocol): deliver nothing more."""
        ...

    def stderr_line(self, raw: bytes) -> None:
        """One line the worker wrote to its stderr (without the newline)."""
        ...

    @property
    def missing_bytes(self) -> int:
        """Bytes of the frame being received not received yet (a transport may
        size its reads by it)."""
        ...


class Transport(abc.ABC):
    """One worker's bytes and life, seen from the host.

    The handle drives it in this order::

        async with transport.open(launch):   # the process exists (OSError: it could not start)
            transport.write(...)             # any time in here, never blocks
            await transport.receive()        # until its output ends
            ... transport.signal(...)        # make sure it is gone
            code = await transport.wait()
        # leaving open(): its last stderr lines are in, its pipes released
    """

    #: The worker's process id (its process group's too), once ``open`` started it.
    pid: int | None = None
    #: Where it runs, when that is not this machine ("Ray actor ... on node ..."):
    #: part of the worker's ``describe()``, hence of every error naming it.
    where: str = ""
    #: The node it runs on (Ray's node id, and its address) and the GPUs it was
    #: given there (Ray's ids); None and empty for a local worker.
    node_id: str | None = None
    node_address: str | None = None
    gpu_ids: tuple[str, ...] = ()

    @abc.abstractmethod
    def open(self, launch: WorkerLaunch) -> contextlib.AbstractAsyncContextManager[None]:
        """Start the worker; inside the context its output is delivered.

        Starting is shielded from cancellation (a half-started worker would be
        an orphan); ``OSError`` when it cannot start. Leaving the context waits
        (briefly, even when cancelled) for the worker's last stderr lines, then
        releases everything: the handle leaves it only once ``wait()`` returned.
        """

    @abc.abstractmethod
    async def receive(self) -> None:
        """Deliver the worker's output to the receiver until it ends.

        Returns when the receiver said the stream is over, at EOF, or a short
        while after the process exited even if something still holds its
        output open (the death is seen from the process itself).
        """

    @abc.abstractmethod
    def write(self, frame: bytes, batch: bool = False) -> None:
        """Queue one frame for the worker (never blocks; order is kept).

        ``batch``: it may wait until the end of this event-loop turn and go out
        in one write with the turn's other frames (the worker is busy anyway).
        Frames written after the worker is gone are dropped (and the handle
        writes none before ``open``).
        """

    @abc.abstractmethod
    def close_stdin(self) -> None:
        """Send what is queued, then end the worker's input (it exits gracefully)."""

    @abc.abstractmethod
    def signal(self, sig: signal.Signals) -> None:
        """Send ``sig`` to the worker and everything it started (best effort)."""

    @abc.abstractmethod
    async def wait(self) -> int:
        """The worker's exit code once it exited (negative: killed by that signal)."""

    @abc.abstractmethod
    def rss_bytes(self) -> int | None:
        """Resident memory of the worker and its children; None if unknown."""


#: Makes the transport of one handle, given the handle (``WorkerHandle(transport=...)``).
TransportFactory = Callable[[Receiver], Transport]
