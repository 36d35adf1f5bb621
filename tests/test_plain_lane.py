"""The worker's lane: reads of sync calls run by the reader itself.

A read whose messages are all calls of sync commands that are not streams,
with arguments that fit (with a session or a ``ctx`` or without), skips the
queue (``Scheduler._run_lane``); a call with neither a session nor a ``ctx``
skips the ``Running`` record too. Everything a caller can see must
stay as on the general path: answers, errors, order, and a worker that keeps
reading (pings, later calls) while a plain call blocks.

Most tests drive a real worker process over its pipes, writing several frames
with one ``os.write`` so that the worker reads them together.
"""

from __future__ import annotations

import asyncio
import collections
import os
import select
import subprocess
import sys
from typing import Any

import pytest

from conftest import TESTS_DIR
from snakepool import protocol as p
from snakepool.errors import ProtocolError
from snakepool.workers import _runtime, _stdio

pytestmark = pytest.mark.timeout(60)


class WorkerPipe:
    """A bare worker process and the host's end of its protocol pipes."""

    def __init__(self, *, concurrency: int = 1, max_frame_bytes: int = 64 * 2**20) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "snakepool.workers"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        self.conn = p.Connection(p.Role.HOST, max_frame_bytes=max_frame_bytes)
        self.ids = iter(range(1, 10**6))
        self.inbox: collections.deque[p.Message] = collections.deque()
        self.write(
            p.Init(
                version=p.PROTOCOL_VERSION,
                worker_id=1,
                pool="lane",
                adapter="sp_adapters:Basic",
                concurrency=concurrency,
                max_frame_bytes=max_frame_bytes,
                sys_path=[str(TESTS_DIR)],
            )
        )
        assert isinstance(self.next(), p.Hello)

    def call(
        self, command: str, session_id: str | None = None, mode: str = "call", **args: Any
    ) -> p.Call:
        return p.Call(
            id=next(self.ids), command=command, args=args, mode=mode, session_id=session_id
        )

    def write(self, *messages: p.Message) -> None:
        """All ``messages`` in one write: the worker reads them together."""
        assert self.proc.stdin is not None
        os.write(self.proc.stdin.fileno(), b"".join(self.conn.send(m) for m in messages))

    def next(self, timeout: float = 20.0) -> p.Message:
        """The next message (logs skipped); fails the test after ``timeout`` seconds."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while True:
            while self.inbox:
                message = self.inbox.popleft()
                if not isinstance(message, p.Log):
                    return message
            ready, _, _ = select.select([fd], [], [], timeout)
            assert ready, f"no message from the worker within {timeout}s"
            self.inbox.extend(self.conn.receive_data(os.read(fd, 65536)))

    def answers(self, n: int) -> list[p.Message]:
        return [self.next() for _ in range(n)]

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        assert self.proc.stdout is not None
        self.proc.stdout.close()


@pytest.fixture
def worker() -> Any:
    pipe = WorkerPipe()
    yield pipe
    pipe.close()


VALUES = [None, True, -(2**63), 1.5, "é" * 40, b"\x00\xff" * 30, [1, [2]], {"a": {1: None}}]


def test_plain_calls_read_together_are_answered_in_order(worker: WorkerPipe) -> None:
    calls = [worker.call("echo", value=VALUES[i % len(VALUES)]) for i in range(60)]
    worker.write(*calls)
    assert worker.answers(len(calls)) == [p.Result(id=c.id, value=c.args["value"]) for c in calls]


def _shape(message: p.Message) -> tuple[Any, ...]:
    """What a caller sees of an answer, without its id (and a traceback's presence)."""
    if isinstance(message, p.Failure):
        return ("failure", message.kind, message.type, message.message, bool(message.traceback))
    assert isinstance(message, p.Result), message
    return ("result", message.value)


CASES: list[tuple[str, dict[str, Any]]] = [
    ("add", {"a": 2, "b": 3}),
    ("fail", {"how": "exception"}),  # the handler raised
    ("raise_unprintable", {}),
    ("unserializable", {}),  # the result cannot be packed
    ("blob", {"size": 200_000}),  # a large result (written with writev)
    ("add", {"a": 1}),  # a missing argument: the general path explains it
    ("add", {"a": 1, "b": 2, "c": 3}),  # an unexpected one
    ("add", {"a": 1, "b": 2, "ctx": 3}),
    ("no_such_command", {}),
    ("count", {"n": 2}),  # a stream called with call()
]


@pytest.mark.parametrize(("command", "args"), CASES, ids=[f"{c}-{len(a)}" for c, a in CASES])
def test_an_answer_from_the_lane_is_the_general_paths(
    worker: WorkerPipe, command: str, args: dict[str, Any]
) -> None:
    # The same call without a session (the lane, where it qualifies) and in
    # one (always the general path: a session call gets a context).
    plain, in_session = worker.call(command, **args), worker.call(command, "s1", **args)
    worker.write(plain)
    lane = worker.next()
    worker.write(in_session)
    general = worker.next()
    assert (lane.id, general.id) == (plain.id, in_session.id)  # type: ignore[attr-defined]
    if command == "blob":  # random bytes: compare their size
        assert isinstance(lane, p.Result) and isinstance(general, p.Result)
        assert len(lane.value) == len(general.value) == args["size"]
    else:
        assert _shape(lane) == _shape(general)


def test_a_result_over_max_frame_bytes_fails_and_the_worker_goes_on() -> None:
    pipe = WorkerPipe(max_frame_bytes=64 * 1024)
    try:
        pipe.write(pipe.call("blob", size=100_000), pipe.call("echo", value="after"))
        failure, after = pipe.answers(2)
        assert isinstance(failure, p.Failure)
        assert failure.kind == p.FailureKind.SERIALIZATION
        assert "too large" in failure.message
        assert isinstance(after, p.Result) and after.value == "after"
    finally:
        pipe.close()


def test_a_read_mixing_calls_and_other_messages_is_answered_whole(worker: WorkerPipe) -> None:
    first, second = worker.call("echo", value=1), worker.call("echo", value=2)
    worker.write(first, p.Ping(id=77), second)
    answers = worker.answers(3)
    assert p.Pong(id=77) in answers
    assert [a for a in answers if isinstance(a, p.Result)] == [
        p.Result(id=first.id, value=1),
        p.Result(id=second.id, value=2),
    ]


def test_the_worker_keeps_reading_while_a_plain_call_blocks_and_order_holds(
    worker: WorkerPipe,
) -> None:
    slow, quick = worker.call("doze", seconds=1.5), worker.call("echo", value="quick")
    worker.write(slow, quick)  # one read: both in the lane, run one after the other
    worker.write(p.Ping(id=5))  # the watchdog takes reading over from the busy reader
    assert worker.next() == p.Pong(id=5)
    later = worker.call("echo", value="later")
    worker.write(later)  # read while the lane still holds its slot: it waits
    answers = worker.answers(3)
    assert [a.id for a in answers] == [slow.id, quick.id, later.id]  # type: ignore[attr-defined]
    assert answers[1:] == [p.Result(id=quick.id, value="quick"), p.Result(later.id, "later")]


def test_with_concurrency_calls_read_together_still_run_side_by_side() -> None:
    pipe = WorkerPipe(concurrency=2)
    try:
        first, second = pipe.call("doze", seconds=0.5), pipe.call("doze", seconds=0.5)
        pipe.write(first, second)
        spans = [a.value for a in pipe.answers(2)]  # type: ignore[attr-defined]
        assert spans[0]["start"] < spans[1]["end"] and spans[1]["start"] < spans[0]["end"]
    finally:
        pipe.close()


# --- which reads the lane takes (in-process) -------------------------------------


def _frame(**wire: Any) -> bytes:
    base: dict[str, Any] = {"t": "call", "i": 1, "c": "add", "a": {"a": 1, "b": 2}, "m": "call"}
    base.update(wire)
    return p.FrameEncoder().encode({k: v for k, v in base.items() if v is not _ABSENT})


_ABSENT = object()

TAKEN: list[tuple[str, bytes]] = [
    ("usual", _frame()),
    ("with a timeout", _frame(o=30.0)),
    ("no mode", _frame(m=_ABSENT)),
    ("default argument left out", _frame(c="echo", a={})),
    ("several", _frame() + _frame(i=2) + _frame(i=3, c="echo", a={"value": [1]})),
    ("session", _frame(s="s1")),
    ("ctx command", _frame(c="cooperative", a={})),
    ("mixed", _frame() + _frame(i=2, s="s1") + _frame(i=3, c="cooperative", a={})),
]
LEFT: list[tuple[str, bytes]] = [
    ("async command", _frame(c="nap", a={"seconds": 0.0})),
    ("stream command", _frame(c="count", a={"n": 1}, m="stream")),
    ("stream mode", _frame(m="stream")),
    ("unknown command", _frame(c="nope")),
    ("missing argument", _frame(a={"a": 1})),
    ("extra argument", _frame(a={"a": 1, "b": 2, "c": 3})),
    ("half a frame", _frame()[:-3]),
    ("a ping after a call", _frame() + p.Connection(p.Role.HOST).send(p.Ping(id=1))),
]
#: Not messages at all: the connection refuses them before any lane sees them.
REFUSED: list[tuple[str, bytes]] = [
    ("float id", _frame(i=1.0)),
    ("bool id", _frame(i=True)),
    ("list args", _frame(a=[1, 2])),
    ("list command", _frame(c=["add"])),
    ("string timeout", _frame(o="soon")),
    ("a bad frame after a call", _frame() + b"\x00\x00\x00\x02\xc1\xc1"),
]


async def _started_worker() -> _runtime.Worker:
    worker = _runtime.Worker(asyncio.get_running_loop())
    init = p.Init(
        version=p.PROTOCOL_VERSION,
        worker_id=1,
        pool="t",
        adapter="sp_adapters:Basic",
        sys_path=[str(TESTS_DIR)],
    )
    assert worker.conn.receive_data(p.Connection(p.Role.HOST).send(init)) == [init]
    worker.writer = _stdio.FrameWriter(os.open(os.devnull, os.O_WRONLY))
    await worker.start(init)
    return worker


@pytest.mark.anyio
@pytest.mark.parametrize(("what", "data"), TAKEN, ids=[t[0] for t in TAKEN])
async def test_the_lane_takes_reads_of_plain_calls(what: str, data: bytes) -> None:
    worker = await _started_worker()
    calls = worker.lane_calls(worker.conn.receive_data(data))
    assert calls is not None and len(calls) == data.count(b"\xa1t\xa4call")


@pytest.mark.anyio
@pytest.mark.parametrize(("what", "data"), LEFT, ids=[t[0] for t in LEFT])
async def test_the_lane_leaves_everything_else_to_the_general_path(what: str, data: bytes) -> None:
    worker = await _started_worker()
    assert worker.lane_calls(worker.conn.receive_data(data)) is None


@pytest.mark.anyio
@pytest.mark.parametrize(("what", "data"), REFUSED, ids=[t[0] for t in REFUSED])
async def test_what_is_not_a_message_never_reaches_the_lane(what: str, data: bytes) -> None:
    worker = await _started_worker()
    with pytest.raises(ProtocolError):
        worker.conn.receive_data(data)


@pytest.mark.anyio
async def test_the_lane_is_closed_before_the_handshake() -> None:
    fresh = _runtime.Worker(asyncio.get_running_loop())
    assert fresh.lane_calls([p.Call(id=1, command="add", args={"a": 1, "b": 2})]) is None


def test_a_lane_call_with_a_ctx_sees_its_cancel(worker: WorkerPipe) -> None:
    # Run by the reader itself, then the watchdog reads: a cancel reaches its ctx.
    # (Written with a quick call and nothing else, so the lane takes them: the
    # ping goes only once the quick one answered.)
    quick, call = worker.call("echo", value=1), worker.call("cooperative")
    worker.write(quick, call)
    assert worker.next() == p.Result(id=quick.id, value=1)
    worker.write(p.Ping(id=9))
    assert worker.next() == p.Pong(id=9)  # a new reader: the call is under way
    worker.write(p.Cancel(id=call.id))
    assert worker.next() == p.Result(id=call.id, value="stopped")


def test_calls_read_with_a_long_one_can_still_be_cancelled_before_they_start(
    worker: WorkerPipe,
) -> None:
    slow, waiting = worker.call("doze", seconds=1.5), worker.call("echo", value="never")
    worker.write(slow, waiting)
    worker.write(p.Ping(id=9))
    assert worker.next() == p.Pong(id=9)  # a new reader: the long call is under way
    worker.write(p.Cancel(id=waiting.id))
    cancelled = worker.next()
    assert isinstance(cancelled, p.Failure) and cancelled.id == waiting.id
    assert cancelled.kind == p.FailureKind.CANCELLED
    done = worker.next()
    assert isinstance(done, p.Result) and done.id == slow.id
