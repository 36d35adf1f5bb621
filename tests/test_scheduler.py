"""The worker's scheduler on its own: a fake worker, a real pipe, real threads.

What the worker relies on: calls start in the order they arrive, at most
``limit`` at once; a call not started yet can be taken back (and one started
cannot); a call that runs long does not stop the reading (the watchdog takes
the reader role over); shutting down hands back what never started.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator

import pytest

from conftest import wait_for
from snakepool import protocol as p
from snakepool.workers._calls import Calls, LaneCall, Running
from snakepool.workers._scheduler import Scheduler
from snakepool.workers._stdio import FrameWriter

HOST = p.Connection(p.Role.HOST)  # (encodes what the host sends; keeps no state that matters)


class FakeWorker:
    """Decodes what the scheduler reads and queues every call; each call's body
    records its start and waits until the test releases it."""

    def __init__(self) -> None:
        self.conn = p.Connection(p.Role.WORKER)
        init = p.Init(version=p.PROTOCOL_VERSION, worker_id=0, pool="t", adapter="x:Y")
        assert self.conn.receive_data(HOST.send(init)) == [init]  # (the handshake first)
        self.writer: FrameWriter | None = None
        self.calls = Calls(lambda message: None, lambda ctx: None)
        self.scheduler: Scheduler | None = None
        self.started: list[int] = []
        self.running_now = 0
        self.most_at_once = 0
        self.releases: dict[int, threading.Event] = {}
        self.control: list[p.Message] = []
        self._lock = threading.Lock()

    def decode(self, data: bytes | bytearray | memoryview) -> list[p.Message]:
        return self.conn.receive_data(bytes(data))

    def dispatch(self, messages: list[p.Message]) -> None:
        for message in messages:
            if isinstance(message, p.Call):
                self.releases[message.id] = threading.Event()
                job = Running(message, lambda: None, {}, None, self._body)
                assert self.scheduler is not None
                self.scheduler.submit(job)
            else:
                self.control.append(message)

    def lane_calls(self, messages: list[p.Message]) -> list[LaneCall] | None:
        return None  # (the general path: every call is queued)

    def queued_from_lane(self, entry: LaneCall) -> Running:
        raise AssertionError("no lane here")

    def _body(self, running: Running) -> None:
        with self._lock:
            self.started.append(running.call.id)
            self.running_now += 1
            self.most_at_once = max(self.most_at_once, self.running_now)
        try:
            assert self.releases[running.call.id].wait(30), "never released"
        finally:
            with self._lock:
                self.running_now -= 1


@pytest.fixture
def fake() -> Iterator[tuple[FakeWorker, Scheduler, int]]:
    """A scheduler reading a pipe (its write end is yielded) for a fake worker."""
    read_fd, write_fd = os.pipe()
    worker = FakeWorker()
    scheduler = worker.scheduler = Scheduler(worker, read_fd)
    scheduler.limit = 2
    scheduler.start()
    try:
        yield worker, scheduler, write_fd
    finally:
        for release in worker.releases.values():
            release.set()
        os.close(write_fd)  # EOF: the threads stop reading and exit
        wait_for(lambda: not scheduler._reading, 10)
        os.close(read_fd)


def send(write_fd: int, *messages: p.Message) -> None:
    os.write(write_fd, b"".join(HOST.send(message) for message in messages))


def calls(*ids: int) -> list[p.Call]:
    return [p.Call(id=i, command="c", args={}) for i in ids]


def test_calls_start_in_order_and_at_most_limit_at_once(
    fake: tuple[FakeWorker, Scheduler, int],
) -> None:
    worker, _, write_fd = fake
    send(write_fd, *calls(1, 2, 3, 4, 5))
    wait_for(lambda: worker.started == [1, 2])  # the watchdog helps the busy leader
    worker.releases[1].set()
    wait_for(lambda: worker.started == [1, 2, 3])
    for call_id in (2, 3, 4):
        worker.releases[call_id].set()
    wait_for(lambda: worker.started == [1, 2, 3, 4, 5])
    assert worker.most_at_once == 2


def test_a_call_not_started_can_be_taken_back_and_a_started_one_cannot(
    fake: tuple[FakeWorker, Scheduler, int],
) -> None:
    worker, scheduler, write_fd = fake
    send(write_fd, *calls(1, 2, 3))
    wait_for(lambda: worker.started == [1, 2])
    taken = scheduler.take_back(3)
    assert taken is not None and taken.call.id == 3
    assert scheduler.take_back(1) is None  # running: it finishes where it is
    assert scheduler.take_back(99) is None  # unknown
    worker.releases[1].set()
    worker.releases[2].set()
    send(write_fd, *calls(4))
    wait_for(lambda: worker.started == [1, 2, 4])  # 3 never ran


def test_reading_goes_on_while_calls_run_long(fake: tuple[FakeWorker, Scheduler, int]) -> None:
    worker, _, write_fd = fake
    send(write_fd, *calls(1, 2))
    wait_for(lambda: worker.started == [1, 2])  # both slots busy, the leader inside one
    send(write_fd, p.Cancel(id=1), p.Ping(id=7))
    wait_for(lambda: worker.control == [p.Cancel(id=1), p.Ping(id=7)])


def test_draining_hands_back_the_calls_that_never_started(
    fake: tuple[FakeWorker, Scheduler, int],
) -> None:
    worker, scheduler, write_fd = fake
    send(write_fd, *calls(1, 2, 3, 4))
    wait_for(lambda: worker.started == [1, 2])
    left = scheduler.drain()
    assert [job.call.id for job in left] == [3, 4]
    worker.releases[1].set()
    worker.releases[2].set()
    assert scheduler.take_back(3) is None  # nothing waits any more
