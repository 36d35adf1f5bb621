"""The transport seam: a worker handle needs nothing but its ``Transport``, and the
local pipes behave alike on both of their implementations.

- A handle driven through a loopback transport (the protocol's worker side,
  in this process): what a Ray actor transport would be, minus the actor.
- Real workers on local pipes under asyncio (``CallbackPipes``) and trio
  (``StreamPipes``): calls, streams, crashes with their stderr, a protocol
  break, a start-up failure, and a death seen from the process while a child
  holds its stdout open.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.abc
import pytest

import snakepool
from snakepool import ProtocolError, WorkerCrashed, WorkerStartError
from snakepool import protocol as p
from snakepool.pool._calls import PendingCall
from snakepool.pool._launch import WorkerLaunch
from snakepool.pool._transport import Receiver, Transport
from snakepool.pool._worker import WorkerHandle, WorkerState
from waiting import all_ready, gone, restarts, wait_until

pytestmark = pytest.mark.anyio

LOOPBACK_PID = 4242


class Loopback(Transport):
    """A worker inside this process: the worker side of the protocol answering
    ``echo`` calls and pings; ``hang`` calls are never answered."""

    def __init__(self, receiver: Receiver) -> None:
        self.receiver = receiver
        self.worker = p.Connection(p.Role.WORKER)
        self.to_host, self.from_worker = anyio.create_memory_object_stream[bytes](math.inf)
        self.exit_code: int | None = None
        self.exited = anyio.Event()
        self.signals: list[signal.Signals] = []
        self.released = False

    @contextlib.asynccontextmanager
    async def open(self, launch: WorkerLaunch) -> AsyncIterator[None]:
        self.pid = LOOPBACK_PID
        self.receiver.stderr_line(b"loopback: starting")  # (held until hello)
        try:
            yield
        finally:
            self.released = True

    async def receive(self) -> None:
        async for data in self.from_worker:
            if self.receiver.feed_stdout(data):
                return
        self.receiver.feed_stdout(b"")

    def write(self, frame: bytes, batch: bool = False) -> None:
        for message in self.worker.receive_data(frame):
            match message:
                case p.Init():
                    hello = p.Hello(
                        version=p.PROTOCOL_VERSION,
                        pid=LOOPBACK_PID,
                        worker_id=message.worker_id,
                        adapter=message.adapter,
                        commands=["echo", "hang"],
                    )
                    self._send(hello)
                case p.Call(command="echo"):
                    self._send(p.Result(id=message.id, value=message.args["value"]))
                case p.Ping():
                    self._send(p.Pong(id=message.id))

    def _send(self, message: p.Message) -> None:
        if self.exit_code is None:
            self.to_host.send_nowait(self.worker.send(message))

    def _exit(self, code: int) -> None:
        if self.exit_code is None:
            self.exit_code = code
            self.to_host.close()  # (the host reads what was sent, then EOF)
            self.exited.set()

    def close_stdin(self) -> None:
        self._send(p.Goodbye(reason="its input ended"))
        self._exit(0)

    def signal(self, sig: signal.Signals) -> None:
        self.signals.append(sig)
        if sig == signal.SIGKILL:
            self._exit(-signal.SIGKILL)

    async def wait(self) -> int:
        await self.exited.wait()
        assert self.exit_code is not None
        return self.exit_code

    def rss_bytes(self) -> int | None:
        return 1234


LAUNCH = WorkerLaunch(
    argv=("loopback",),
    env={},
    cwd=None,
    init=p.Init(version=p.PROTOCOL_VERSION, worker_id=0, pool="lb", adapter="loopback"),
    max_frame_bytes=2**20,
    startup_timeout=5.0,
)


@contextlib.asynccontextmanager
async def loopback_handle() -> AsyncIterator[tuple[WorkerHandle, list[WorkerHandle]]]:
    transports: list[Loopback] = []
    exits: list[WorkerHandle] = []

    def make(receiver: Receiver) -> Transport:
        transports.append(Loopback(receiver))
        return transports[-1]

    handle = WorkerHandle(
        pool="lb", slot=0, restarts=0, concurrency=1, gpu=None,
        on_capacity=lambda worker: None, on_exit=exits.append, transport=make,
    )  # fmt: skip
    async with anyio.create_task_group() as tg:
        await tg.start(handle.run, LAUNCH)
        await handle.wait_ready(5.0)
        yield handle, exits
    assert transports[0].released  # left open() only after the worker was gone


def _submit(handle: WorkerHandle, call_id: int, command: str, value: Any) -> PendingCall:
    call = PendingCall(call_id, command, {"value": value}, p.CallMode.CALL)
    handle.reserved += 1  # (as the dispatcher reserves the slot)
    frame = p.Connection(p.Role.HOST).send(
        p.Call(id=call_id, command=command, args={"value": value})
    )
    handle.submit(call, frame)
    return call


async def test_a_handle_needs_nothing_but_its_transport() -> None:
    async with loopback_handle() as (handle, exits):
        assert handle.pid == LOOPBACK_PID and handle.is_ready
        assert handle.stderr_tail() == "loopback: starting"
        call = _submit(handle, 1, "echo", "hi")
        await call.done.wait()
        assert call.value == "hi" and not handle.pending and handle.state is WorkerState.IDLE
        assert await handle.ping(5.0)
        assert handle.rss_bytes() == 1234
        await handle.stop(grace=5.0)  # input closed: it says goodbye and exits
    info = handle.exit_info
    assert info is not None and info.planned and info.exit_code == 0
    assert info.reason == "planned exit: stopped by the pool"
    assert "loopback: starting" in info.stderr_tail
    assert exits == [handle] and handle.state is WorkerState.EXITED
    assert handle.rss_bytes() is None


async def test_a_kill_through_the_transport_fails_what_the_worker_held() -> None:
    async with loopback_handle() as (handle, exits):
        call = _submit(handle, 1, "hang", None)
        handle.kill("the test killed it")
        await handle.exited.wait()
    assert isinstance(call.error, WorkerCrashed)
    assert "killed by the pool: the test killed it" in str(call.error)
    assert call.error.exit_code == -signal.SIGKILL
    info = handle.exit_info
    assert info is not None and not info.planned and info.exit_code == -signal.SIGKILL
    assert exits == [handle]


# --- local pipes on both implementations ---------------------------------------------


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    if request.param == "trio":
        pytest.importorskip("trio")  # (snakepool's dev extra installs it)
    backend: str = request.param
    return backend


async def test_local_pipes_carry_calls_and_report_crashes(anyio_backend: str) -> None:
    async with snakepool.Pool("sp_adapters:Basic", size=1) as pool:
        assert await pool.call("echo", {"value": b"x" * 300_000}) == b"x" * 300_000
        assert [x async for x in pool.stream("count", {"n": 3})] == [0, 1, 2]
        with pytest.raises(WorkerCrashed) as crash:
            await pool.call("fail", {"how": "exit_code"}, timeout=20)
        assert crash.value.exit_code == 7
        assert "about to exit with code 7" in crash.value.stderr_tail
        await wait_until(lambda: restarts(pool) == 1 and all_ready(pool))
        with pytest.raises(ProtocolError, match="broke the protocol"):
            await pool.call("fail", {"how": "garbage"}, timeout=20)
        await wait_until(lambda: restarts(pool) == 2 and all_ready(pool))
        assert await pool.call("add", {"a": 2, "b": 3}) == 5


async def test_local_pipes_quote_a_failed_start(anyio_backend: str) -> None:
    pool = snakepool.Pool("sp_adapters:Basic", size=1, adapter_config={"fail_setup": "exit_code"})
    with pytest.raises(WorkerStartError) as info:
        await pool.start()
    assert "about to exit with code 7" in info.value.stderr_tail


async def test_local_pipes_see_a_death_while_a_child_holds_stdout(anyio_backend: str) -> None:
    async with snakepool.Pool("sp_descendants:Spawner", size=1) as pool:
        holder = await pool.call("c_fork_holder")  # keeps the worker's stdout open
        try:
            with anyio.fail_after(10):  # seen from the process: EOF never comes
                with pytest.raises(WorkerCrashed) as crash:
                    await pool.call("die")
            assert crash.value.exit_code == 3
        finally:
            # (a worker the host spawned has no keeper to take its orphans)
            if not gone(holder):
                os.kill(holder, signal.SIGKILL)
