"""The raw asyncio loop, the practical limit of the design: bare worker scripts
reading length-prefixed MessagePack frames from stdin and echoing them, driven
straight over their pipes with every caller's request in flight at once."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from typing import Any, cast

import msgpack

from ._common import Peer

#: The bare worker of the raw loop: read a frame, answer it, flush, repeat.
RAW_WORKER = """\
import sys
import msgpack
read = sys.stdin.buffer.read
out = sys.stdout.buffer
pack = msgpack.Packer(use_bin_type=True).pack
unpackb = msgpack.unpackb
while True:
    header = read(4)
    if len(header) < 4:
        break
    request = unpackb(read(int.from_bytes(header, "big")))
    reply = pack({"id": request["id"], "result": request["value"]})
    out.write(len(reply).to_bytes(4, "big"))
    out.write(reply)
    out.flush()
"""


class _RawWorker(asyncio.SubprocessProtocol):
    """One bare worker's pipes: frames out on stdin, replies parsed from stdout."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.pending: dict[int, asyncio.Future[Any]] = {}
        self.transport: asyncio.SubprocessTransport | None = None
        self.stdin: asyncio.WriteTransport | None = None
        self.exited: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (duck-typed: uvloop's transports do not subclass asyncio's)
        self.transport = cast(asyncio.SubprocessTransport, transport)
        self.stdin = cast(asyncio.WriteTransport, self.transport.get_pipe_transport(0))

    def send(self, request_id: int, value: Any) -> asyncio.Future[Any]:
        assert self.stdin is not None
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if self.exited.done():
            future.set_exception(ConnectionError("the raw worker exited"))
            return future
        self.pending[request_id] = future
        body: bytes = msgpack.packb({"id": request_id, "value": value}, use_bin_type=True)
        self.stdin.write(len(body).to_bytes(4, "big") + body)
        return future

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        if fd != 1:
            return
        buffer = self.buffer
        buffer += data
        start = 0
        available = len(buffer)
        while available - start >= 4:
            length = int.from_bytes(buffer[start : start + 4], "big")
            end = start + 4 + length
            if end > available:
                break
            reply = msgpack.unpackb(bytes(buffer[start + 4 : end]))
            start = end
            future = self.pending.pop(reply["id"], None)
            if future is not None and not future.done():
                future.set_result(reply["result"])
        if start:
            del buffer[:start]

    def process_exited(self) -> None:
        for future in self.pending.values():
            if not future.done():
                future.set_exception(ConnectionError("the raw worker exited"))
        self.pending.clear()
        if not self.exited.done():
            self.exited.set_result(None)

    async def aclose(self) -> None:
        if self.stdin is not None and not self.stdin.is_closing():
            self.stdin.close()
        try:
            await asyncio.wait_for(asyncio.shield(self.exited), 5.0)
        except TimeoutError:
            if self.transport is not None:
                with contextlib.suppress(ProcessLookupError):
                    self.transport.kill()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(self.exited), 5.0)
        if self.transport is not None:
            self.transport.close()


async def _spawn_raw_worker() -> _RawWorker:
    loop = asyncio.get_running_loop()
    _, protocol = await loop.subprocess_exec(
        _RawWorker,
        sys.executable,
        "-c",
        RAW_WORKER,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=None,
    )
    return protocol


class RawLoopPeer(Peer):
    """The practical limit: each call is one frame written to the least-loaded worker."""

    def __init__(self, workers: int) -> None:
        self.size = workers
        self.workers: list[_RawWorker] = []
        self._next_id = 0
        self.how = (
            f"{workers} bare `python -c` workers reading 4-byte length + msgpack frames from "
            "stdin and echoing them; the host writes each call to the least-loaded worker's "
            "pipe at once, so every caller's request is in flight (pipelined)"
        )

    async def start(self) -> None:
        spawned = await asyncio.gather(
            *(_spawn_raw_worker() for _ in range(self.size)), return_exceptions=True
        )
        self.workers = [w for w in spawned if isinstance(w, _RawWorker)]
        for failure in spawned:
            if isinstance(failure, BaseException):
                raise failure
        # Ready = each worker answered one frame.
        await asyncio.gather(*(self._call_on(w, None) for w in self.workers))

    def _call_on(self, worker: _RawWorker, value: Any) -> asyncio.Future[Any]:
        self._next_id += 1
        return worker.send(self._next_id, value)

    async def call(self, value: Any) -> Any:
        workers = self.workers
        worker = workers[0]
        for candidate in workers:
            if len(candidate.pending) < len(worker.pending):
                worker = candidate
        return await self._call_on(worker, value)

    async def aclose(self) -> None:
        workers, self.workers = self.workers, []
        await asyncio.gather(*(w.aclose() for w in workers), return_exceptions=True)
