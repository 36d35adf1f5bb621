"""The worker's hot path, in-process: what it skips must not change what it does.

A plain sync call gets no CallContext and its Result map is built by hand;
``_FrameWriter`` writes a small frame with one ``os.write``. These tests pin
the bytes and the behaviour those shortcuts must keep.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from snakepool import protocol as p
from snakepool.adapters import Adapter, CallContext, command
from snakepool.workers import _runtime, _scheduler, _stdio
from waiting import wait_until

pytestmark = pytest.mark.anyio


class Probe(Adapter):
    """Commands for poking at the worker's call path."""

    @command
    def echo(self, value: Any = None) -> Any:
        return value

    @command
    def whoami(self, ctx: CallContext) -> dict[str, Any]:
        return {
            "call_id": ctx.call_id,
            "command": ctx.command,
            "worker_id": ctx.worker_id,
            "session_id": ctx.session_id,
            "deadline": ctx.deadline,
            "cancelled": ctx.cancelled,
        }

    @command
    def block(self, ctx: CallContext) -> bool:
        """Wait for a cancellation (true) for up to 5 s (false)."""
        return ctx.wait_cancelled(5)

    @command
    def exit_generator(self) -> None:
        raise GeneratorExit

    @command
    def numbers(self, n: int) -> Iterator[int]:
        yield from range(n)

    @command
    async def atwice(self, value: int) -> int:
        return 2 * value

    @command
    async def anumbers(self, n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i


class _Capture:
    """A ``_FrameWriter`` stand-in that keeps the frames written."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []

    def write(self, *parts: bytes) -> None:
        self.frames.append(b"".join(parts))

    def is_closing(self) -> bool:
        return False


class _Inline:
    """A ``_Threads`` stand-in: queued calls start when the test says so."""

    limit = 1

    def __init__(self) -> None:
        self.jobs: list[Any] = []

    def submit(self, job: Any) -> None:
        self.jobs.append(job)

    def take_back(self, call_id: int) -> Any:
        for index, job in enumerate(self.jobs):
            if job.call.id == call_id:
                return self.jobs.pop(index)
        return None

    def release(self) -> None:
        pass  # (an async call's task ended)

    def run_all(self) -> None:
        jobs, self.jobs = self.jobs, []
        for job in jobs:
            job()


def _decode(frames: list[bytes]) -> list[p.Message]:
    decoder = p.FrameDecoder()
    decoder.feed(b"".join(frames))
    messages = []
    while not isinstance(frame := decoder.next_frame(), p.Sentinel):
        messages.append(p.from_wire(frame))
    return messages


async def _worker() -> tuple[_runtime.Worker, _Capture, _Inline]:
    worker = _runtime.Worker(asyncio.get_running_loop())
    capture, inline = _Capture(), _Inline()
    worker.writer = capture  # type: ignore[assignment]
    worker.threads = inline  # type: ignore[assignment]
    init = p.Init(version=p.PROTOCOL_VERSION, pool="t", worker_id=7, adapter=f"{__name__}:Probe")
    # The Init goes through the connection (its handshake), then start() runs
    # here: on_message would wait for the loop this test is running on.
    assert worker.conn.receive_data(p.Connection(p.Role.HOST).send(init)) == [init]
    await worker.start(init)
    assert isinstance(_decode(capture.frames)[0], p.Hello)
    capture.frames.clear()
    return worker, capture, inline


def _call(worker: _runtime.Worker, call: p.Call) -> None:
    worker.receive(p.Connection(p.Role.HOST).send(call))


VALUES = [
    None,
    True,
    0,
    -1,
    2**40,
    -(2**63),
    1.5,
    "",
    "plain",
    "é" * 40,
    b"",
    b"\x00\xff" * 30,
    [1, [2, [3]]],
    {"a": {"b": [1, "c"]}, 1: None},
    b"x" * (_stdio._JOIN_BELOW + 1),  # a frame written with writev
    "y" * 100_000,
]


@pytest.mark.parametrize("value", VALUES, ids=lambda v: type(v).__name__)
async def test_a_result_is_written_as_its_frame(value: Any) -> None:
    worker, capture, inline = await _worker()
    _call(worker, p.Call(id=41, command="echo", args={"value": value}))
    inline.run_all()
    expected = p.FrameEncoder().encode(p.to_wire(p.Result(id=41, value=value)))
    assert capture.frames == [expected]
    assert not worker.running


async def test_a_plain_call_gets_no_context_and_a_ctx_handler_a_full_one() -> None:
    worker, capture, inline = await _worker()
    _call(worker, p.Call(id=1, command="echo", args={"value": 1}))
    assert worker.running[1].ctx is None  # nobody would see it
    before = worker.loop.time()
    _call(worker, p.Call(id=2, command="whoami", args={}, timeout=30.0))
    ctx = worker.running[2].ctx
    assert isinstance(ctx, CallContext)
    inline.run_all()
    one, two = _decode(capture.frames)
    assert one == p.Result(id=1, value=1)
    assert isinstance(two, p.Result)
    assert two.value["deadline"] == pytest.approx(before + 30.0, abs=1.0)
    assert {k: v for k, v in two.value.items() if k != "deadline"} == {
        "call_id": 2,
        "command": "whoami",
        "worker_id": 7,
        "session_id": None,
        "cancelled": False,
    }
    _call(worker, p.Call(id=3, command="whoami", args={}))
    inline.run_all()
    assert _decode(capture.frames[2:])[0].value["deadline"] is None  # type: ignore[attr-defined]


async def test_a_session_call_gets_a_context_even_without_a_ctx_parameter() -> None:
    worker, _, inline = await _worker()
    _call(worker, p.Call(id=1, command="echo", args={"value": 1}, session_id="s1"))
    ctx = worker.running[1].ctx
    assert ctx is not None and ctx.session_id == "s1"
    inline.run_all()


async def test_a_call_cancelled_or_withdrawn_while_it_waits_never_runs() -> None:
    worker, capture, inline = await _worker()
    _call(worker, p.Call(id=1, command="whoami", args={}))
    _call(worker, p.Call(id=2, command="echo", args={"value": "v"}))
    _call(worker, p.Call(id=3, command="atwice", args={"value": 1}))
    _call(worker, p.Call(id=4, command="echo", args={"value": "kept"}))
    worker.on_message(p.Cancel(id=1))
    worker.on_message(p.Withdraw(id=2))
    worker.on_message(p.Cancel(id=3))
    assert set(worker.running) == {4} and len(inline.jobs) == 1
    inline.run_all()
    answers = [(m.id, getattr(m, "kind", None)) for m in _decode(capture.frames)]  # type: ignore[attr-defined]
    assert answers == [
        (1, p.FailureKind.CANCELLED),
        (2, p.FailureKind.WITHDRAWN),
        (3, p.FailureKind.CANCELLED),
        (4, None),  # the Result of the one left
    ]
    worker.on_message(p.Withdraw(id=4))  # answered already: ignored
    worker.on_message(p.Cancel(id=4))
    assert len(capture.frames) == 4


@pytest.mark.parametrize("cancelled", [False, True])
async def test_generator_exit_after_a_cancel_still_reads_as_cancelled(cancelled: bool) -> None:
    worker, capture, inline = await _worker()
    _call(worker, p.Call(id=5, command="exit_generator", args={}))
    if cancelled:
        worker.cancel_call(5)
    inline.run_all()
    (failure,) = _decode(capture.frames)
    assert isinstance(failure, p.Failure)
    if cancelled:
        assert (failure.kind, failure.type) == (p.FailureKind.CANCELLED, "Cancelled")
    else:
        assert (failure.kind, failure.type) == (p.FailureKind.APPLICATION, "GeneratorExit")


async def test_streams_async_calls_and_refusals_keep_their_paths() -> None:
    worker, capture, inline = await _worker()
    _call(worker, p.Call(id=1, command="numbers", args={"n": 3}, mode=p.CallMode.STREAM))
    _call(worker, p.Call(id=2, command="numbers", args={"n": 3}))  # not pool.stream()
    _call(worker, p.Call(id=3, command="echo", args={"value": 1}, mode=p.CallMode.STREAM))
    _call(worker, p.Call(id=4, command="echo", args={"value": 4}, mode=p.CallMode.CAST))
    _call(worker, p.Call(id=5, command="echo", args={"nope": 1}))
    _call(worker, p.Call(id=6, command="missing", args={}))
    _call(worker, p.Call(id=7, command="atwice", args={"value": 21}))
    _call(worker, p.Call(id=8, command="anumbers", args={"n": 2}, mode=p.CallMode.STREAM))
    inline.run_all()
    for _ in range(20):
        await asyncio.sleep(0)
    got: dict[int, list[Any]] = {}
    for message in _decode(capture.frames):
        got.setdefault(message.id, []).append(message)  # type: ignore[attr-defined]
    assert got[1] == [p.Item(id=1, value=i) for i in range(3)] + [p.End(id=1)]
    assert got[2][0].kind == p.FailureKind.WRONG_MODE
    assert got[3][0].kind == p.FailureKind.WRONG_MODE
    assert got[4] == [p.Result(id=4, value=4)]
    assert got[5][0].kind == p.FailureKind.BAD_ARGUMENTS
    assert got[6][0].kind == p.FailureKind.UNKNOWN_COMMAND
    assert got[7] == [p.Result(id=7, value=42)]
    assert got[8] == [p.Item(id=8, value=0), p.Item(id=8, value=1), p.End(id=8)]
    assert not worker.running


# --- _FrameWriter -------------------------------------------------------------


class _Dribble:
    """``os`` for _runtime, writing at most ``step`` bytes per call (as a signal might)."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def write(self, fd: int, data: bytes) -> int:
        self.calls.append("write")
        return os.write(fd, bytes(memoryview(data)[: self.step]))

    def writev(self, fd: int, buffers: Any) -> int:
        self.calls.append("writev")
        joined = b"".join(bytes(b) for b in buffers)
        return os.write(fd, joined[: self.step])


def _read_all(fd: int, into: bytearray) -> None:
    while chunk := os.read(fd, 1 << 16):
        into += chunk


@pytest.mark.parametrize("size", [10, _stdio._JOIN_BELOW, _stdio._JOIN_BELOW + 1, 300_000])
@pytest.mark.parametrize("step", [None, 3, 1000])
def test_the_frame_writer_writes_whole_frames(
    monkeypatch: pytest.MonkeyPatch, size: int, step: int | None
) -> None:
    dribble = _Dribble(step) if step else None
    if dribble is not None:
        monkeypatch.setattr(_stdio, "os", dribble)
    read_fd, write_fd = os.pipe()
    received = bytearray()
    reader = threading.Thread(target=_read_all, args=(read_fd, received))
    reader.start()
    try:
        writer = _stdio.FrameWriter(write_fd)
        header, body = p.FrameEncoder().encode_parts({"t": "result", "i": 1, "r": b"z" * size})
        writer.write(header, body)
        writer.write(b"\x00\x00\x00\x01\xc0")  # one part: written as it is
    finally:
        os.close(write_fd)
        reader.join(10)
        os.close(read_fd)
    assert bytes(received) == header + body + b"\x00\x00\x00\x01\xc0"
    if dribble is not None:
        first = "write" if len(body) <= _stdio._JOIN_BELOW else "writev"
        assert dribble.calls[0] == first


def test_the_frame_writer_goes_quiet_once_the_host_is_gone() -> None:
    read_fd, write_fd = os.pipe()
    os.close(read_fd)
    writer = _stdio.FrameWriter(write_fd)
    try:
        writer.write(b"\x00\x00\x00\x01", b"\xc0")  # EPIPE: no exception
        assert writer.is_closing()
        writer.write(b"\x00\x00\x00\x01\xc0")
    finally:
        os.close(write_fd)


# --- Scheduler: the leader loop over a real pipe ------------------------------


async def test_the_leader_answers_pipelined_calls_in_order_and_hands_over_when_stuck() -> None:
    worker, _, _ = await _worker()
    to_worker_r, to_worker_w = os.pipe()
    from_worker_r, from_worker_w = os.pipe()
    worker.writer = _stdio.FrameWriter(from_worker_w)
    threads = worker.threads = _scheduler.Scheduler(worker, to_worker_r)
    out = p.Connection(p.Role.HOST)
    host = p.FrameDecoder()

    def frames(*calls: p.Call) -> bytes:
        return b"".join(out.send(c) for c in calls)

    def waiting(call_id: int) -> bool:
        with threads._lock:
            return any(job.call.id == call_id for job, _ in threads._jobs)

    def started(call_id: int) -> bool:  # read, and taken off the queue
        return call_id in worker.running and not waiting(call_id)

    def answers(n: int) -> list[p.Message]:
        got: list[p.Message] = []
        while len(got) < n:
            frame = host.next_frame()
            if frame is p.NEED_DATA:
                host.feed(os.read(from_worker_r, 1 << 16))
            else:
                assert isinstance(frame, dict)
                got.append(p.from_wire(frame))
        return got

    threads.start()
    try:
        # Many calls in one read: the leader runs them one after another, in order.
        batch = [p.Call(id=i, command="echo", args={"value": i}) for i in range(1, 51)]
        os.write(to_worker_w, frames(*batch))
        got = await asyncio.to_thread(answers, 50)
        assert got == [p.Result(id=i, value=i) for i in range(1, 51)]
        # The leader blocks in a call; the watchdog takes reading over, so the
        # cancellation sent next still reaches the call, and the call queued
        # behind it (the only slot is busy) runs once it returns.
        # (Each frame is written once the one before it was read: separate reads.)
        os.write(to_worker_w, frames(p.Call(id=60, command="block", args={})))
        await wait_until(lambda: started(60))
        os.write(to_worker_w, frames(p.Call(id=61, command="echo", args={"value": 61})))
        await wait_until(lambda: waiting(61))  # read while 60 runs: queued behind it
        os.write(to_worker_w, out.send(p.Cancel(id=60)))
        got = await asyncio.to_thread(answers, 2)
        assert got == [p.Result(id=60, value=True), p.Result(id=61, value=61)]
    finally:
        os.close(to_worker_w)  # EOF: the worker shuts down
        code = await asyncio.wait_for(worker.finished, 5)
        for fd in (to_worker_r, from_worker_r, from_worker_w):
            os.close(fd)
    assert code == _stdio.EXIT_OK
    assert not threads._reading
