"""Ray: the transport of a worker that is a Ray actor somewhere in a cluster.

Each worker slot is an async Ray actor, :class:`~snakepool.workers._ray_node.WorkerNode`,
placed by Ray (``num_cpus``, ``num_gpus``, ``resources``,
``scheduling_strategy``, ``runtime_env``), that runs the usual worker
subprocess on its node and relays its pipes. Ray's cost per message is
paid per *batch*, not per call: the frames of one event-loop turn go to the
actor as one ``write`` (numbered: the actor keeps the host's order), and
one long-polling ``read`` brings back everything the worker wrote since
the last one (answers, stderr, and at the end its exit code). The handle
(:mod:`._worker`), dispatch and sessions do not know the difference.

Deaths: the worker's own (a crash, a kill on timeout) comes back as its exit
code and stderr, as locally; the actor's (``ray.kill``, its node removed or
lost) is Ray's ``RayActorError`` on the next read, reported as a kill
(``-SIGKILL``) with a stderr line naming the actor, its node and Ray's
reason. Either way the handle fails the calls the worker had started and
the slot starts another actor, wherever Ray places it.

Ray is imported only here and only when a ``backend="ray"`` pool starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import anyio

from ..errors import WorkerStartError
from ..workers._ray_node import NodeOutput, WorkerNode
from ._backend import running_on_asyncio
from ._launch import WorkerLaunch
from ._lines import LineSplitter
from ._transport import Receiver, Transport

__all__ = ["ACTOR_PREFIX", "RayCluster", "RayPipes"]

_log = logging.getLogger("snakepool.ray")
#: An actor asked to kill its worker that has not reported the exit by then is killed itself.
_KILL_FALLBACK = 5.0
#: Seconds the cluster's GCS has to accept a connection when it is checked.
_GCS_PATIENCE = 2.0
#: While a read or a start waits, the cluster is checked this often (at most
#: once per tick for all of a process's workers: see ``RayCluster.check_alive``).
_TICK = 2.0
#: Actor options that are snakepool's, not the user's: many reads and writes at
#: once, and no restart (a dead worker's slot starts a fresh actor instead).
_ACTOR_OPTIONS: dict[str, Any] = {"max_concurrency": 1000, "max_restarts": 0}
#: Every worker actor's name starts so.
ACTOR_PREFIX = "snakepool:"
_PLACEMENT_KEYS = ("num_cpus", "num_gpus", "resources", "runtime_env", "scheduling_strategy")


class RayCluster:
    """This process's connection to a Ray cluster, shared by the pools that use it.

    The first pool connects (``ray.init``: ``address`` as Ray reads it, but
    never a new cluster unless ``address="local"``); the connection is closed
    when the last pool that opened it closes, if snakepool opened it (a
    connection the program made itself is left alone).
    """

    _lock = threading.Lock()
    _users = 0
    _ours = False

    def __init__(self, options: Mapping[str, Any]) -> None:
        self.options = dict(options)
        self.address = "?"
        self._actor_class: Any = None
        self._connected = False
        #: Why the cluster is gone (its GCS does not answer), once it is.
        self.gone: str | None = None
        self._checked_at = -_TICK
        #: Called once when the cluster is seen gone (the pool breaks).
        self.on_gone: Callable[[str], None] | None = None

    def connect(self) -> None:
        """Connect (blocking: run it in a thread); ``WorkerStartError`` if it cannot."""
        try:
            import ray
        except ImportError:
            raise WorkerStartError(
                "backend='ray' needs Ray: pip install 'snakepool[ray]'"
            ) from None
        options = self.options
        with RayCluster._lock:
            if not ray.is_initialized():
                address = options.get("address") or os.environ.get("RAY_ADDRESS") or "auto"
                try:
                    if address == "local":  # the one case where a pool starts a cluster
                        ray.init(
                            namespace=options.get("namespace"),
                            include_dashboard=False,
                            log_to_driver=False,
                        )
                    else:
                        ray.init(
                            address=address,
                            namespace=options.get("namespace"),
                            log_to_driver=False,
                        )
                except (ConnectionError, RuntimeError, ValueError) as exc:
                    raise WorkerStartError(
                        f"cannot connect to the Ray cluster at {address!r} "
                        f"(ray={{'address': ...}}; 'local' starts one on this machine): {exc}"
                    ) from None
                RayCluster._ours = True
            RayCluster._users += 1
            self._connected = True
        self.address = ray.get_runtime_context().gcs_address
        self._actor_class = ray.remote(WorkerNode)

    async def check_alive(self) -> bool:
        """After an actor died: is the cluster still there? (Its GCS accepts a
        connection.) When not, ``gone`` says so and ``on_gone`` is told, once."""
        if self.gone is not None:
            return False
        now = anyio.current_time()
        if now - self._checked_at < _TICK:
            return True
        self._checked_at = now
        host, _, port = self.address.rpartition(":")
        try:
            with anyio.fail_after(_GCS_PATIENCE):
                stream = await anyio.connect_tcp(host, int(port))
            await stream.aclose()
            return True
        except (OSError, TimeoutError, ValueError) as exc:
            if self.gone is None:
                self.gone = f"the Ray cluster at {self.address} is gone ({exc or 'no answer'})"
                if self.on_gone is not None:
                    self.on_gone(self.gone)
            return False

    def disconnect(self) -> None:
        """This pool is done with the cluster (blocking)."""
        if not self._connected:
            return
        self._connected = False
        import ray

        with RayCluster._lock:
            RayCluster._users -= 1
            if RayCluster._users == 0 and RayCluster._ours:
                RayCluster._ours = False
                if self.gone is None:  # (a driver whose cluster is gone cannot say goodbye)
                    ray.shutdown()

    def new_actor(self, worker: str) -> Any:
        """A fresh worker actor, placed by Ray with the pool's options; named
        ``snakepool:POOL.SLOT:UNIQUE`` (``ray.util.list_named_actors`` shows it)."""
        placement = {key: self.options[key] for key in _PLACEMENT_KEYS if key in self.options}
        name = f"{ACTOR_PREFIX}{worker}:{uuid.uuid4().hex[:12]}"
        return self._actor_class.options(**_ACTOR_OPTIONS, **placement, name=name).remote()

    def transport(self, receiver: Receiver) -> Transport:
        """The ``TransportFactory`` of a Ray-backed pool's handles."""
        return RayPipes(receiver, self)

    def describe_placement(self) -> str:
        asked = {key: self.options[key] for key in _PLACEMENT_KEYS if key in self.options}
        return f"cluster at {self.address}" + (f", asking {asked}" if asked else "")


def _env_to_send(launch: WorkerLaunch) -> dict[str, str]:
    """What the worker's environment adds to its node's: what the pool set (not the
    host's own variables, which describe this machine, not that node)."""
    return {
        key: value
        for key, value in launch.env.items()
        if os.environ.get(key) != value and key != "SNAKEPOOL_HOST_PID"
    }


class RayPipes(Transport):
    """One worker's frames to and from its Ray actor (see the module's docstring)."""

    def __init__(self, receiver: Receiver, cluster: RayCluster) -> None:
        if not running_on_asyncio():
            raise WorkerStartError("backend='ray' runs on asyncio (Ray's futures are asyncio's)")
        self._receiver = receiver
        self._cluster = cluster
        self._actor: Any = None
        self._unsent: list[bytes] = []
        self._seq = 0
        self._closed_stdin = False
        self._stdout_over = False
        self._exit_code: int | None = None
        self._kill_asked_at: float | None = None
        self._reading: asyncio.Future[NodeOutput] | None = None  # the read in flight
        self._rss: int | None = None
        self._stderr = LineSplitter(receiver.stderr_line)
        self.actor_id: str | None = None
        self.node_id: str | None = None
        self.node_address: str | None = None
        self.gpu_ids: tuple[str, ...] = ()

    # --- start and end ---------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def open(self, launch: WorkerLaunch) -> AsyncIterator[None]:
        with anyio.CancelScope(shield=True):  # a half-started actor would be an orphan
            await self._start(launch)
        try:
            yield
        finally:
            self._stderr.close()
            self._kill_actor()  # (its worker dies with it; a finished actor just goes)

    async def _start(self, launch: WorkerLaunch) -> None:
        """Create the actor and its worker; ``OSError`` naming why when Ray cannot."""
        import ray

        cluster = self._cluster
        try:
            self._actor = cluster.new_actor(self._receiver.log.name.rpartition("worker.")[2])
        except (ray.exceptions.RayError, ValueError, TypeError) as exc:
            raise OSError(
                f"Ray refused the worker's actor ({cluster.describe_placement()}): {exc}"
            ) from None
        try:
            info = await self._started(launch)
        except TimeoutError:
            self._kill_actor()
            raise OSError(
                f"Ray did not start the worker's actor within startup_timeout="
                f"{launch.startup_timeout:g}s ({cluster.describe_placement()}): not enough "
                "free resources for it, or a slow runtime_env"
            ) from None
        except ray.exceptions.RayError as exc:
            self._kill_actor()
            raise OSError(
                f"the worker's Ray actor failed to start ({cluster.address}): {exc}"
            ) from None
        if info is None:
            raise OSError(str(cluster.gone))
        self.pid = info["pid"]
        self.actor_id = info["actor_id"]
        self.node_id = info["node_id"]
        self.node_address = info["node_ip"]
        self.gpu_ids = tuple(info["gpu_ids"])
        self.where = f"Ray actor {self.actor_id} on node {self.node_id} ({self.node_address})"

    async def _started(self, launch: WorkerLaunch) -> dict[str, Any] | None:
        """The actor's ``start``: where its worker runs; None if the cluster went away."""
        python = launch.argv[0] if self._receiver_wants_python(launch) else None
        starting = self._actor.start.remote(
            [python, *launch.argv[1:]], _env_to_send(launch), launch.cwd
        ).as_future()
        with anyio.fail_after(launch.startup_timeout):
            while not starting.done():
                await asyncio.wait({starting}, timeout=_TICK)
                if not starting.done() and not await self._cluster.check_alive():
                    starting.cancel()
                    return None
        info: dict[str, Any] = starting.result()
        return info

    def _receiver_wants_python(self, launch: WorkerLaunch) -> bool:
        """``python=`` was set: run that interpreter on the node; else the node's own."""
        import sys

        return os.path.realpath(launch.argv[0]) != os.path.realpath(sys.executable)

    def _kill_actor(self) -> None:
        actor = self._actor
        if actor is None:
            return
        import ray

        with contextlib.suppress(Exception):  # (gone already, or the cluster is)
            ray.kill(actor, no_restart=True)

    # --- frames to the worker ---------------------------------------------------------

    def write(self, frame: bytes, batch: bool = False) -> None:
        """Every frame waits for the end of the loop turn: one remote call per turn."""
        if self._actor is None or self._closed_stdin:
            return
        unsent = self._unsent
        unsent.append(frame)
        if len(unsent) == 1:
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self, close: bool = False) -> None:
        unsent, self._unsent = self._unsent, []
        if not unsent and not close:
            return
        data = unsent[0] if len(unsent) == 1 else b"".join(unsent)
        self._seq += 1
        with contextlib.suppress(Exception):  # (a dead actor: its reader reports it)
            self._actor.write.remote(self._seq - 1, data, close)

    def close_stdin(self) -> None:
        if self._actor is not None and not self._closed_stdin:
            self._closed_stdin = True
            self._flush(close=True)

    def signal(self, sig: signal.Signals) -> None:
        """Forwarded to the worker's process group by its actor; a SIGKILL the
        actor does not carry out within ``_KILL_FALLBACK`` kills the actor."""
        if self._actor is None or self._exit_code is not None:
            return
        if sig == signal.SIGKILL and self._kill_asked_at is None:
            self._kill_asked_at = anyio.current_time()
        with contextlib.suppress(Exception):
            self._actor.signal.remote(int(sig))

    # --- what the worker sends -----------------------------------------------------

    async def receive(self) -> None:
        feed = self._receiver.feed_stdout
        while self._exit_code is None:
            out = await self._read()
            if out and feed(out):
                self._stdout_over = True
                return
        self._stdout_over = True
        feed(b"")

    async def wait(self) -> int:
        while self._exit_code is None:
            await self._read()
        return self._exit_code

    async def _read(self) -> bytes:
        """One long poll: the worker's stdout since the last (stderr and exit noted).

        The poll is not cancelled while it waits (what it brings would be lost):
        every ``_TICK`` the cluster is checked, and a kill the actor did not
        carry out is escalated to the actor itself.
        """
        import ray

        reading = self._reading
        if reading is None:
            reading = self._reading = self._actor.read.remote().as_future()
        while not reading.done():
            await asyncio.wait({reading}, timeout=_TICK)
            if reading.done():
                break
            if self._kill_asked_at is not None and (
                anyio.current_time() - self._kill_asked_at > _KILL_FALLBACK
            ):
                self._receiver.log.warning(
                    "%s: its actor did not kill it within %gs: killing the actor",
                    self._receiver.describe(),
                    _KILL_FALLBACK,
                )
                self._kill_asked_at = None
                self._kill_actor()
            elif not await self._cluster.check_alive():
                self._reading = None
                self._actor_died(ConnectionError(self._cluster.gone))
                return b""
        self._reading = None
        try:
            output: NodeOutput = reading.result()
        except ray.exceptions.RayError as exc:
            await self._cluster.check_alive()
            self._actor_died(exc)
            return b""
        out, err, exit_code, rss = output
        if rss is not None:
            self._rss = rss
        if err:
            self._stderr.feed(err)
        if exit_code is not None:
            self._exit_code = exit_code
        return out

    def _actor_died(self, exc: BaseException) -> None:
        why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        self._stderr.close()
        self._receiver.stderr_line(
            f"[snakepool] its Ray actor {self.actor_id} on node {self.node_id} "
            f"({self.node_address}) died: {type(exc).__name__}: {why}".encode()
        )
        self._exit_code = -signal.SIGKILL
        gone = self._cluster.gone
        if gone is not None:
            self._receiver.stderr_line(f"[snakepool] {gone}".encode())
        else:
            self._kill_actor()

    def rss_bytes(self) -> int | None:
        return self._rss
