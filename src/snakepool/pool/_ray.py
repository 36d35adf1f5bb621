"""Ray: the transport of a worker that is a Ray actor somewhere in a cluster.

Each worker slot is an async Ray actor, :class:`~snakepool.workers._ray_node.WorkerNode`,
placed by Ray (``num_cpus``, ``num_gpus``, ``resources``,
``scheduling_strategy``, ``runtime_env``), that runs the usual worker
subprocess on its node and relays its pipes. Ray's cost per message is
paid per *batch*, not per call: the frames of one event-loop turn go to the
actor as one ``write`` (numbered: the actor keeps the host's order), whose
reply brings back what the worker wrote by then (a quick call: one Ray
round trip, as many messages as calling an actor directly); one long poll,
always in flight, brings back what no write did (a slow call's answer,
stderr, and at the end the exit code). The worker's output is numbered in
batches and delivered in that order whichever reply carries it. Under load
the pipeline is paced over Ray's round trip (``_ROUND_TRIP``), so one write
carries some twenty calls and one reply their answers. The handle
(:mod:`._worker`), dispatch and sessions do not know the difference.

Deaths: the worker's own (a crash, a kill on timeout) comes back as its exit
code and stderr, as locally; the actor's (``ray.kill``, its node removed or
lost) is Ray's ``RayActorError`` on the next reply, reported as a kill
(``-SIGKILL``) with a stderr line naming the actor, its node and Ray's
reason. Either way the handle fails the calls the worker had started and
the slot starts another actor, wherever Ray places it.

Ray is imported only here and only when a ``backend="ray"`` pool starts.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import signal
import threading
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import anyio

from ..errors import WorkerStartError
from ..workers._ray_node import NodeOutput, WorkerNode
from ._backend import running_on_asyncio
from ._launch import WorkerLaunch
from ._lines import LineSplitter
from ._pacing import Pacing
from ._transport import Receiver, Transport

__all__ = ["ACTOR_CLASS", "RayCluster", "RayPipes"]

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
#: What Ray adds to a call's round trip, for pacing (``Pacing.latency``): a
#: worker holds about as many calls as it answers in this much more time.
#: Pacing judges a worker by the gap between its answers, and with Ray the
#: answers come in batches a round trip apart: a horizon shorter than a few
#: round trips (1-3 ms here, more under load) paces the worker down to one
#: call per round trip, and it stays there (2 workers, 64 callers: 5 ms made
#: 950 calls/s, 10 ms 6300, 20 ms 6600, as deep as ``send_ahead`` allows).
_ROUND_TRIP = 0.02
#: The class name Ray's state API shows for every worker actor. (They have no
#: names: Ray registers a named actor with its GCS before ``remote()`` returns,
#: which held up starting 16 workers by 2.5-3 s here, 12.2 s against 9.4.)
ACTOR_CLASS = WorkerNode.__name__
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

    def new_actor(self) -> Any:
        """A fresh worker actor, placed by Ray with the pool's options."""
        placement = {key: self.options[key] for key in _PLACEMENT_KEYS if key in self.options}
        return self._actor_class.options(**_ACTOR_OPTIONS, **placement).remote()

    def pacing(self, concurrency: int, ahead: int) -> Pacing:
        """A Ray worker's send-ahead pacing: its pipeline covers Ray's round trip too."""
        return Pacing(concurrency, ahead, latency=_ROUND_TRIP)

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
        self._loop = asyncio.get_running_loop()
        self._next_batch = 0  # the number of the worker's next batch of output
        self._early: dict[int, NodeOutput] = {}  # batches that overtook one
        self._ready: list[bytes] = []  # its stdout, in order, not yet received
        self._died: BaseException | None = None  # why its actor is gone (Ray's error)
        self._closed = False
        self._waiter: asyncio.Future[bool] | None = None  # set by the next reply
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
            self._closed = True
            self._stderr.close()
            self._kill_actor()  # (its worker dies with it; a finished actor just goes)

    async def _start(self, launch: WorkerLaunch) -> None:
        """Create the actor and its worker; ``OSError`` naming why when Ray cannot."""
        import ray

        cluster = self._cluster
        try:
            self._actor = cluster.new_actor()
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
        self._poll()

    async def _started(self, launch: WorkerLaunch) -> dict[str, Any] | None:
        """The actor's ``start``: where its worker runs; None if the cluster went away."""
        python = launch.argv[0] if self._receiver_wants_python(launch) else None
        starting = self._actor.start.remote(
            [python, *launch.argv[1:]], _env_to_send(launch), launch.cwd
        )
        starting = asyncio.wrap_future(starting.future())
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
            self._loop.call_soon(self._flush)

    def _flush(self, close: bool = False) -> None:
        unsent, self._unsent = self._unsent, []
        if not unsent and not close:
            return
        data = unsent[0] if len(unsent) == 1 else b"".join(unsent)
        self._seq += 1
        try:
            reply = self._actor.write.remote(self._seq - 1, data, close)
        except Exception:  # (a dead actor: the long poll reports it)
            return
        self._on_reply(reply)  # (the worker's output, when it answered quickly)

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

    def _poll(self) -> None:
        """Keep one long poll in flight until the worker's end is known."""
        if self._exit_code is not None or self._died is not None or self._closed:
            return
        try:
            reply = self._actor.read.remote()
        except Exception as exc:  # (its handle is unusable: as good as dead)
            self._arrived_error(exc)
            return
        self._on_reply(reply, poll=True)

    def _on_reply(self, reply: Any, poll: bool = False) -> None:
        """Hand ``reply`` (a write's or a poll's) to ``_arrived`` on the loop once it is in."""
        loop = self._loop

        def done(future: concurrent.futures.Future[NodeOutput], _keep: Any = reply) -> None:
            with contextlib.suppress(RuntimeError):  # (the loop is gone: nobody listens)
                loop.call_soon_threadsafe(self._arrived, future, poll)

        reply.future().add_done_callback(done)

    def _arrived(self, future: concurrent.futures.Future[NodeOutput], poll: bool) -> None:
        """A reply: its output, in the worker's order (batches may arrive out of it)."""
        if self._closed:
            return
        try:
            output = future.result()
        except Exception as exc:  # (Ray's errors: the actor died, or the cluster went)
            self._arrived_error(exc)
            return
        number, *_, rss = output
        if rss is not None:
            self._rss = rss
        if number is not None:
            early = self._early
            early[number] = output
            while self._next_batch in early:
                self._use(early.pop(self._next_batch))
                self._next_batch += 1
            self._wake()
        if poll:
            self._poll()

    def _use(self, output: NodeOutput) -> None:
        """One batch, in order: stderr lines go out now, stdout waits for ``receive``."""
        if self._exit_code is not None:
            return
        _, out, err, exit_code, _ = output
        if err:
            self._stderr.feed(err)
        if out:
            self._ready.append(out)
        if exit_code is not None:
            self._exit_code = exit_code

    def _arrived_error(self, exc: BaseException) -> None:
        if self._died is None:
            self._died = exc
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(True)

    async def receive(self) -> None:
        feed = self._receiver.feed_stdout
        while out := await self._next():
            if feed(out):
                self._stdout_over = True
                return
        self._stdout_over = True
        feed(b"")

    async def wait(self) -> int:
        while self._exit_code is None:
            await self._next()
        return self._exit_code

    async def _next(self) -> bytes:
        """The worker's stdout that arrived since the last time, waiting for some;
        ``b""``: it ended (its exit code is known, or its actor is seen dead).

        Every ``_TICK`` without news the cluster is checked, and a kill the
        actor did not carry out is escalated to the actor itself.
        """
        while True:
            ready = self._ready
            if ready:
                out = ready[0] if len(ready) == 1 else b"".join(ready)
                ready.clear()
                return out
            if self._exit_code is not None:
                return b""
            if self._died is not None:
                await self._cluster.check_alive()
                self._actor_died(self._died)
                return b""
            if not await self._news(_TICK):
                self._on_quiet()
                if not await self._cluster.check_alive():
                    self._died = ConnectionError(self._cluster.gone)

    async def _news(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for a reply; false if none came."""
        waiter = self._waiter = self._loop.create_future()
        timer = self._loop.call_later(timeout, _settle, waiter, False)
        try:
            return bool(await waiter)
        finally:
            timer.cancel()
            self._waiter = None

    def _on_quiet(self) -> None:
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


def _settle(waiter: asyncio.Future[bool], value: bool) -> None:
    if not waiter.done():
        waiter.set_result(value)
