"""One client connection of the socket server, as an asyncio protocol.

Speed. Bytes are decoded in batches as they arrive (whole frames of a read
at once). A plain call or cast takes its pool's route without a task: it
reaches its worker within the read that brought it, and the call's waiter is
its :class:`Request`, which has the connection answer it (every answer of a
loop turn together: see ``_answer_soon``); other requests are tasks. Answers
are encoded into a list that is written once per event-loop iteration, so 64
answers ready together cost one write.

Order. Requests start in the order received (a plain call runs at once
only while no earlier request's task is still to take its first step), so
plain calls and casts enter their pool's queue in that order (they may
finish in any order). Requests
that name the same session of the same pool also *take effect* in that order
(a lane per session): a session operation waits until every earlier request
of that session on this connection has taken effect, and a call waits for
the operations before it. A call has taken effect once it was answered (a
stream: once its first item or its end came), an operation once it is done.

Back-pressure. At most ``max_inflight`` requests run at once, and a new one
starts only while the bytes of the requests running plus the answers not yet
taken by the client stay under ``max_bytes``. Requests beyond that wait
(held back, in order: a later one never overtakes an earlier one); the
connection keeps reading, so a ``cancel`` still arrives, until the requests
held add up to ``max_bytes``, and then stops reading the socket until they
shrink. A stream sends an item only while the client's socket takes them
(and, when the client asked for a window ``w``, while it has credit). So the
server holds at most a few times ``max_bytes`` for a client, whatever it does.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from .. import protocol as p
from ..errors import PoolClosed, ProtocolError, SnakepoolError
from ..observability._remote import OBSERVE_REQUESTS, observe
from ._inflight import DONE as _DONE
from ._inflight import HELD as _HELD
from ._inflight import RUNNING as _RUNNING
from ._inflight import WOKEN as _WOKEN
from ._inflight import Lane, Request
from ._requests import Refused, bad_request, check_call, draining_message, session_operation, shown
from ._wire import (
    CLIENT_PROTOCOL_VERSIONS,
    HELLO_FRAME_BYTES,
    error_to_wire,
    jsonable,
    new_decoder,
    new_encoder,
)

if TYPE_CHECKING:
    from ..pool import Pool
    from ._server import SocketServer

__all__ = ["Connection", "ConnectionStatistics"]

_log = logging.getLogger("snakepool.server")
#: A client that has not taken any of its answers for this long is dropped.
SEND_TIMEOUT = 30.0
#: Frames this large are measured and decoded in a worker thread, so that one
#: client's big frame (about 0.1 s a MiB of small values) holds up nobody else.
_DECODE_IN_THREAD = 512 * 1024
#: The socket's write buffer above which the client counts as not reading.
_WRITE_HIGH_WATER = 256 * 1024
#: How long a dropped client's ``error`` frame may take to leave.
_ERROR_GRACE = 1.0
_REQUESTS = frozenset({"call", "session", "status", "connections", *OBSERVE_REQUESTS})
_CAST_TIMEOUT = "a cast takes no timeout 'o' (it gets the pool's call_timeout)"
_CALL = p.CallMode.CALL


def _call_mode(frame: dict[str, Any]) -> Any:
    """A call frame's mode ``m``: nil, as every absent optional field, is ``call``."""
    mode = frame.get("m")
    return "call" if mode is None else mode


class _Drop(Exception):
    """This client must go (with ``message`` in an ``error`` frame)."""


@dataclass(frozen=True, slots=True)
class ConnectionStatistics:
    """A snapshot of one client connection."""

    id: int  #: the server's number for it (1, 2, ... in the order accepted)
    peer: str  #: ``unix`` or ``HOST:PORT``
    calls: int  #: requests received (calls, streams, casts, session operations, status)
    bytes_in: int  #: bytes read from the client
    bytes_out: int  #: bytes written to the client
    in_flight: int  #: requests running now (a session cast until it has run)
    held: int  #: requests received and held back now (waiting for room)
    held_back: int  #: requests that had to wait for room, since the connection opened
    streams_paused: int  #: streams waiting now to send an item (no credit, or not read)
    reading_paused: bool  #: the server stopped reading this socket (too much held)
    writing_paused: bool  #: the client is not taking its answers
    buffered_bytes: int  #: bytes held for it: requests held and running, answers unsent


class Connection(asyncio.BufferedProtocol):
    """One client: reads requests, runs them in the pools, writes the answers."""

    def __init__(
        self, server: SocketServer, connection_id: int, peer: str, needs_token: bool
    ) -> None:
        self.server = server
        self.id = connection_id
        self.peer = peer
        self.needs_token = needs_token
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        # Until it has said hello (with its token), a client gets small frames only.
        self.decoder = new_decoder(
            min(HELLO_FRAME_BYTES, server.max_frame_bytes), decode_factor=server.decode_factor
        )
        self.encoder = new_encoder(server.max_frame_bytes)
        self.greeted = False
        self.closing = False  # dropped or closed: nothing more is read or started
        self.inflight: dict[int, Request] = {}
        self.background: set[Request] = set()  # session casts acknowledged, still running
        self.held: collections.OrderedDict[int, Request] = collections.OrderedDict()
        self.lanes: dict[tuple[str, str], Lane] = {}
        self.calls = self.bytes_in = self.bytes_out = self.held_back = self.streams_paused = 0
        self.held_bytes = self.inflight_bytes = 0
        self._unstarted = 0  # requests whose task has not taken its first step
        self._unattributed = 0  # bytes read not yet shared out among requests
        self._unsized: list[Request] = []  # requests of this read, to share them among
        self._out: list[bytes] = []
        self._answers: list[Request] = []  # plain calls woken, to answer this loop turn
        self._out_bytes = 0
        self._flush_soon = False
        self._decoding = False  # a large frame is being decoded in a thread
        self.reading_paused = False
        self.writing_paused = False
        self._timer: asyncio.TimerHandle | None = None  # hello deadline, then not-reading

    # --- asyncio callbacks ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (duck-typed: uvloop's transports do not subclass asyncio's)
        self.transport = cast(asyncio.Transport, transport)
        high = max(1, min(_WRITE_HIGH_WATER, self.server.max_bytes_per_client // 4))
        self.transport.set_write_buffer_limits(high=high)
        self.server._connection_opened(self)
        timeout = self.server.hello_timeout
        if timeout is not None:
            self._timer = self.loop.call_later(timeout, self._no_hello, timeout)

    def get_buffer(self, sizehint: int) -> memoryview:
        # (one buffer for every connection: what is read is used or copied at once)
        return self.server._read_buffer

    def buffer_updated(self, nbytes: int) -> None:
        if self.closing:
            return
        self.bytes_in += nbytes
        self._unattributed += nbytes
        with self.server._read_buffer[:nbytes] as data:
            self._guarded(self._read, data)

    def eof_received(self) -> bool:
        return False  # the client left: close (its calls are cancelled)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        if self._timer is not None:
            self._timer.cancel()
        for request in list(self.inflight.values()):  # (session casts acknowledged run on)
            if request.task is not None:
                request.task.cancel()
            elif request.call is not None:  # (a plain call: it leaves its pool now)
                self._leave(request)
        for request in self.held.values():
            request.state = _DONE
        self.held.clear()
        self._wake_streams()
        self.server._connection_closed(self)

    def pause_writing(self) -> None:
        self.writing_paused = True
        if self._timer is None and self.greeted:
            self._timer = self.loop.call_later(SEND_TIMEOUT, self._not_reading)

    def resume_writing(self) -> None:
        self.writing_paused = False
        if self._timer is not None and self.greeted:
            self._timer.cancel()
            self._timer = None
        self._wake_streams()
        self._start_held()

    # --- reading ----------------------------------------------------------------------

    def _guarded(self, step: Any, *args: Any) -> None:
        """Run ``step``; a rule broken drops the client, a bug closes this connection."""
        try:
            step(*args)
        except _Drop as drop:
            self.drop(str(drop))
        except Exception:
            self.server.connection_errors += 1
            _log.exception(
                "snakepool server: an unexpected error closed a client connection "
                "(the server and its other connections carry on)"
            )
            self.drop("internal server error; the connection is closed (see the server log)",
                      counted=False)  # fmt: skip

    def _read(self, data: memoryview) -> None:
        frames = self.decoder.whole_frames(data)  # (the usual: whole small frames, at once)
        if frames is None:
            self.decoder.feed(data)
            self._handle_frames()
            return
        try:
            for frame in frames:
                if self.closing:
                    break
                self._on_frame(frame)
        finally:
            self._attribute_bytes()
        self._update_reading()

    def _handle_frames(self) -> None:
        """Handle every whole frame read, in order, until a large one needs a thread."""
        decoder = self.decoder
        try:
            while not self.closing:
                if decoder.whole_frame_bytes >= _DECODE_IN_THREAD:
                    self._decoding = True
                    self._update_reading()
                    self.loop.create_task(self._decode_in_thread())
                    break
                frame = decoder.next_frame()
                if type(frame) is not dict:
                    break
                self._on_frame(frame)
        except ProtocolError as exc:
            raise _Drop(f"protocol error: {exc}") from None
        finally:
            self._attribute_bytes()
        self._update_reading()

    async def _decode_in_thread(self) -> None:
        # (measuring and decoding it takes a while: not on the event loop)
        try:
            frame = await asyncio.to_thread(self.decoder.next_frame)
        except ProtocolError as exc:
            self.drop(f"protocol error: {exc}")
            return
        self._decoding = False
        if self.closing:
            return
        if type(frame) is dict:
            self._guarded(self._on_frame, frame)
        self._guarded(self._handle_frames)

    def _attribute_bytes(self) -> None:
        """Share the bytes read among the requests they carried (an average per
        read: the sum is exact, which is what the bounds count)."""
        unsized = self._unsized
        used = self._unattributed - self.decoder.buffered_bytes
        if not unsized or used <= 0:
            return
        share = max(1, used // len(unsized))
        self._unattributed -= used
        for request in unsized:
            request.size = share
            if request.state == _HELD:
                self.held_bytes += share
            elif request.state != _DONE:  # (running)
                self.inflight_bytes += share
        unsized.clear()

    def _update_reading(self) -> None:
        """Stop reading the socket while a frame decodes in a thread or while the
        requests held back reach ``max_bytes``; read again once they shrink."""
        transport = self.transport
        if transport is None or self.closing:
            return
        cap = self.server.max_bytes_per_client
        full = self.held_bytes >= cap or self._decoding
        if full and not self.reading_paused:
            self.reading_paused = True
            transport.pause_reading()
        elif self.reading_paused and not self._decoding and self.held_bytes < cap // 2:
            self.reading_paused = False
            transport.resume_reading()

    def _on_frame(self, frame: dict[str, Any]) -> None:
        kind = frame.get("t")
        request_id = frame.get("i")
        if kind not in _REQUESTS or type(request_id) is not int or not self.greeted:
            self._on_control(frame, kind, request_id)
            return
        if request_id in self.inflight or request_id in self.held:
            raise _Drop(f"request id {request_id} is already in flight")
        self.calls += 1
        request = Request(self, request_id, kind, frame)
        self._unsized.append(request)
        if self.held or self.server._draining or not self._room():
            self._start_later(request)
        else:
            self._start(request)

    def _on_control(self, frame: dict[str, Any], kind: Any, request_id: Any) -> None:
        """A frame that is no request: ``hello``, ``cancel``, ``credit``, or a broken rule."""
        if not self.greeted:
            self._greet(frame)
        elif kind == "hello":
            raise _Drop("'hello' comes once, first; this connection was welcomed already")
        elif type(request_id) is not int:
            raise _Drop(f"{kind!r} frame without an integer request id 'i'")
        elif kind == "cancel":
            self._cancel(request_id)
        elif kind == "credit":
            self._credit(request_id, frame.get("n"))
        else:
            raise _Drop(f"unknown message type {kind!r}")

    def _start_later(self, request: Request) -> None:
        """A request that cannot start now: refused while the server drains,
        held back while the connection is at its bounds (or others are held)."""
        if self.server._draining and request.kind in ("call", "session"):
            request.state = _DONE  # (answered now: its bytes are not running)
            try:
                self._pool(request.frame)  # (a pool not served is named as such, even now)
            except Refused as exc:
                self._failed(request, exc)
            else:
                self._fail(request.id, PoolClosed(draining_message(request.frame)))
        elif self.held or not self._room():
            request.state = _HELD
            self.held[request.id] = request
            self.held_back += 1
        else:
            self._start(request)

    def _greet(self, frame: dict[str, Any]) -> None:
        if frame.get("t") != "hello":
            raise _Drop("the first message must be 'hello'")
        version = frame.get("v")
        if type(version) is not int or version not in CLIENT_PROTOCOL_VERSIONS:
            supported = " or ".join(str(v) for v in CLIENT_PROTOCOL_VERSIONS)
            raise _Drop(
                f"hello 'v' must be an integer client protocol version ({supported}); "
                f"got {shown(version)} ({type(version).__name__})"
            )
        if self.needs_token:
            token = frame.get("k")
            expected = (self.server.token or "").encode()
            # Bytes, not str: compare_digest refuses a str that is not ASCII.
            if not isinstance(token, str) or not hmac.compare_digest(
                token.encode("utf-8", "surrogatepass"), expected
            ):
                raise _Drop("a valid token is required on TCP")
        self.greeted = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.decoder = self.decoder.with_limit(self.server.max_frame_bytes)
        self._send({"t": "welcome", "v": version, "pools": sorted(self.server.pools)})

    def _no_hello(self, timeout: float) -> None:
        self._timer = None
        if not self.greeted:
            self.drop(f"no hello within {timeout:g}s")

    def _not_reading(self) -> None:
        self._timer = None
        self.drop(f"the client did not read for {SEND_TIMEOUT:g}s")

    # --- running requests -------------------------------------------------------------

    def _room(self) -> bool:
        """Whether one more request may start now."""
        server = self.server
        if len(self.inflight) + len(self.background) >= server.max_inflight_per_client:
            return False
        unsent = self._out_bytes + self.transport.get_write_buffer_size()  # type: ignore[union-attr]
        if self.inflight_bytes + unsent < server.max_bytes_per_client:
            return True
        return not self.inflight and not unsent  # (one request larger than the bound)

    @property
    def unsent_bytes(self) -> int:
        """Answers the client has not taken yet (queued here or in the socket's buffer)."""
        transport = self.transport
        buffered = transport.get_write_buffer_size() if transport is not None else 0
        return self._out_bytes + buffered

    def _start_held(self) -> None:
        held = self.held
        while held and not self.closing and self._room():
            _, request = held.popitem(last=False)
            self.held_bytes -= request.size
            self._start(request)
        self._update_reading()

    def _start(self, request: Request) -> None:
        request.state = _RUNNING
        self.inflight_bytes += request.size
        self.inflight[request.id] = request
        frame = request.frame
        kind = request.kind
        if kind == "call" and frame.get("s") is None and not self._unstarted:
            mode = _call_mode(frame)
            if mode == "call" or mode == "cast":
                self._plain_call(request, mode)  # (the usual)
                return
        if kind == "call" or kind == "session":
            session = frame.get("s")
            name = frame.get("p")
            if type(session) is str and type(name) is str:
                self._enter_lane(request, (name, session), op=kind == "session")
        # (a request after this one starts only once this task has: they start in order)
        self._unstarted += 1
        request.unstarted = True
        request.task = self.loop.create_task(self._run(request))

    def _enter_lane(self, request: Request, key: tuple[str, str], *, op: bool) -> None:
        lane = self.lanes.get(key)
        if lane is None:
            lane = self.lanes[key] = Lane()
        lane.users += 1
        request.lane = key
        request.effect = effect = self.loop.create_future()
        before = lane.last_op
        waits = [before] if before is not None and not before.done() else []
        if op:
            waits += [f for f in lane.calls if not f.done()]
            lane.last_op, lane.calls = effect, []
        else:
            if len(lane.calls) > 64:
                lane.calls = [f for f in lane.calls if not f.done()]
            lane.calls.append(effect)
        request.waits = waits

    def _plain_call(self, request: Request, mode: str) -> None:
        """A call or cast with no session, on its pool's route (no task: see
        :class:`Request`); a cast is answered (nil) once sent or queued."""
        frame = request.frame
        try:
            name = frame.get("p")
            pool = self.server.pools.get(name) if type(name) is str else None
            if pool is None:
                pool = self._pool(frame)  # (raises, naming what was wrong)
            command, args, timeout = frame.get("c"), frame.get("a"), frame.get("o")
            if type(command) is not str or type(args) is not dict or timeout is not None:
                check_call(command, args, timeout, None)
                if mode == "cast" and timeout is not None:
                    raise bad_request(_CAST_TIMEOUT)
            if mode == "call":  # (what Pool.call does, up to its await)
                route = request.route = pool._route
                started = time.perf_counter()
                call, wire = route.new_call(command, args, timeout, None, _CALL, started)  # type: ignore[arg-type]
                request.call = call
                route.send(call, wire, request)
                return
            pool._cast_nowait(command, args)  # type: ignore[arg-type]
        except Exception as exc:
            self._failed(request, exc)
        else:
            self._result(request.id, None)
        self._finished(request)

    def _answer_soon(self, request: Request) -> None:
        """A plain call was woken (its pool set its waiter): answer it with the
        others of this loop turn. (Not at once: the pool wakes it in the middle
        of reading its worker, and the answer may count, retire a worker, start
        requests held back.)"""
        answers = self._answers
        answers.append(request)
        if len(answers) == 1:
            self.loop.call_soon(self._answer_woken)

    def _answer_woken(self) -> None:
        """Answer the plain calls woken: what ``Pool.call`` does after its await."""
        answers, self._answers = self._answers, []
        for request in answers:
            if request.state != _WOKEN:
                continue  # (cancelled meanwhile, or the connection closed)
            call = request.call
            try:
                value = request.route.outcome(call, call.started)  # type: ignore[union-attr, arg-type]
            except Exception as exc:
                self._failed(request, exc)
            else:
                self._send({"t": "result", "i": request.id, "r": value})
            self._finished(request)

    def _leave(self, request: Request) -> None:
        """A plain call's caller leaves before its answer (a cancel, the connection lost)."""
        request.state = _DONE
        request.route.left(request.call)  # type: ignore[union-attr, arg-type]
        self._finished(request)

    def _failed(self, request: Request, exc: BaseException) -> None:
        """Answer ``request`` with the failure ``exc`` stands for; re-raises a
        cancellation that is not the client's (the connection is closing)."""
        request_id = request.id
        if isinstance(exc, asyncio.CancelledError):
            if not request.by_client:
                raise exc
            self._cancelled(request_id, "cancelled by the client")
        elif isinstance(exc, Refused):
            self._fail(request_id, exc.error, exc.kind)
        elif isinstance(exc, SnakepoolError):
            self._fail(request_id, exc)
        elif isinstance(exc, TypeError | ValueError):  # (the pool's checks of what was sent)
            self._fail(request_id, exc, "bad_request")
        elif isinstance(exc, Exception):  # (a bug, here or in a pool: logged, and this fails)
            _log.exception("snakepool server: a %r request failed unexpectedly", request.kind)
            self._fail(request_id, exc, "internal_error")
        else:
            raise exc

    async def _run(self, request: Request) -> None:
        self._started(request)
        request_id = request.id
        try:
            for earlier in request.waits:
                if not earlier.done():
                    await asyncio.shield(earlier)
            request.waits = ()
            kind = request.kind
            if kind == "call":
                await self._call(request)
            elif kind == "session":
                await self._session(request)
            elif kind in OBSERVE_REQUESTS:  # logs, subscribe (snakepool.observability)
                await self._observe(request)
            elif kind == "status":
                pools = self.server.pools.items()
                self._result(request_id, {name: jsonable(p.statistics()) for name, p in pools})
            else:
                self._result(request_id, jsonable(self.server.statistics()))
        except BaseException as exc:
            self._failed(request, exc)
        finally:
            self._finished(request)

    async def _call(self, request: Request) -> None:
        frame = request.frame
        pool = self._pool(frame)
        command, args, session = frame.get("c"), frame.get("a"), frame.get("s")
        timeout, mode = frame.get("o"), _call_mode(frame)
        check_call(command, args, timeout, session)
        if mode == "call":
            value = await pool.call(command, args, timeout=timeout, session=session)  # type: ignore[arg-type]
            self._result(request.id, value)
        elif mode == "stream":
            await self._stream(request, pool, command, args, timeout, session)
        elif mode == "cast":
            if timeout is not None:
                raise bad_request(_CAST_TIMEOUT)
            if session is None:
                await pool.cast(command, args)  # type: ignore[arg-type]
                self._result(request.id, None)
            else:
                await self._session_cast(request, pool, command, args, session)
        else:
            raise bad_request(f"unknown call mode 'm' {shown(mode)}; one of call, stream, cast")

    async def _stream(
        self, request: Request, pool: Pool, command: Any, args: Any, timeout: Any, session: Any
    ) -> None:
        window = request.frame.get("w")
        if window is not None and (type(window) is not int or window < 1):
            raise bad_request(f"a stream's window 'w' must be an integer >= 1, not {shown(window)}")
        request.credit = window
        request_id = request.id
        async with pool.stream(command, args, timeout=timeout, session=session) as items:
            async for item in items:
                self._took_effect(request)
                if request.credit == 0 or self.writing_paused:  # (the end needs no credit)
                    await self._until_sendable(request)
                self._send({"t": "item", "i": request_id, "r": item})
                if request.credit is not None:
                    request.credit -= 1
        self._send({"t": "end", "i": request_id})

    async def _observe(self, request: Request) -> None:
        """``logs``/``subscribe``: items, with a stream's credit, until done
        (``end``), cancelled, or the server stops."""
        frame = request.frame
        window = frame.get("w")
        if window is not None and (type(window) is not int or window < 1):
            raise bad_request(f"a window 'w' must be an integer >= 1, not {shown(window)}")
        request.credit = window
        try:
            items = observe(request.kind, frame, self.server.pools, self._observing_ends)
        except KeyError as exc:
            raise Refused(exc, "unknown_pool") from None
        async with contextlib.aclosing(items):
            async for item in items:
                if request.credit == 0 or self.writing_paused:
                    await self._until_sendable(request)
                self._send({"t": "item", "i": request.id, "r": item})
                if request.credit is not None:
                    request.credit -= 1
        self._send({"t": "end", "i": request.id})

    def _observing_ends(self) -> bool:
        return self.server.draining or self.closing

    async def _until_sendable(self, request: Request) -> None:
        """Wait until the stream may send again: credit, and a client that reads."""
        self.streams_paused += 1
        try:
            while (request.credit == 0 or self.writing_paused) and not self.closing:
                request.wakeup = self.loop.create_future()
                await request.wakeup
        finally:
            self.streams_paused -= 1

    async def _session_cast(
        self, request: Request, pool: Pool, command: Any, args: Any, session: Any
    ) -> None:
        """Acknowledged once it is sure to run, and (to keep its session's order)
        run as a call: its effect is known when its answer comes."""
        pool.session(session)  # (the id's rule, checked before the acknowledgement)
        self._result(request.id, None)
        del self.inflight[request.id]  # (its id is the client's again)
        self.background.add(request)
        try:
            await pool.call(command, args, session=session)
        except Exception as exc:
            _log.warning("snakepool server: a cast of %r failed: %s", command, exc)

    async def _session(self, request: Request) -> None:
        frame = request.frame
        pool = self._pool(frame)
        result = await session_operation(pool, frame.get("op"), frame.get("s"), frame.get("a"))
        self._result(request.id, result)

    def _pool(self, frame: dict[str, Any]) -> Pool:
        name = frame.get("p")
        if type(name) is not str:
            raise bad_request(
                f"'p' (the pool's name) must be a string, not {shown(name)}", TypeError
            )
        pool = self.server.pools.get(name)
        if pool is None:
            served = ", ".join(sorted(self.server.pools))
            raise Refused(
                KeyError(f"no pool named {shown(name)} (pools: {served})"), "unknown_pool"
            )
        return pool

    def _took_effect(self, request: Request) -> None:
        effect = request.effect
        if effect is not None and not effect.done():
            effect.set_result(None)

    def _finished(self, request: Request) -> None:
        request.state = _DONE
        request.call = None  # (it is the call's waiter: no cycle left for the GC to find)
        inflight = self.inflight
        if inflight.get(request.id) is request:
            del inflight[request.id]
        self.inflight_bytes -= request.size
        if self.background:
            self.background.discard(request)
        key = request.lane
        if key is not None:
            self._took_effect(request)
            lane = self.lanes[key]
            lane.users -= 1
            if not lane.users:
                del self.lanes[key]
        if self.held:
            self._start_held()
        self.server._request_finished()

    def _cancel(self, request_id: int) -> None:
        request = self.inflight.get(request_id)
        if request is not None:
            task = request.task
            if request.call is not None:  # (a plain call: no task)
                self._leave(request)
                self._cancelled(request_id, "cancelled by the client")
            elif task is not None and not request.by_client:
                request.by_client = True
                task.cancel()
                task.add_done_callback(lambda _: self._after_cancel(request))
            return
        held = self.held.pop(request_id, None)
        if held is not None:
            held.state = _DONE
            self.held_bytes -= held.size
            self._cancelled(request_id, "cancelled by the client before it started")
            self._update_reading()
            self.server._request_finished()

    def _started(self, request: Request) -> None:
        if request.unstarted:
            request.unstarted = False
            self._unstarted -= 1

    def _after_cancel(self, request: Request) -> None:
        self._started(request)
        if request.state != _DONE:  # (cancelled before its first step: its code never ran)
            self._cancelled(request.id, "cancelled by the client")
            self._finished(request)

    def _credit(self, request_id: int, more: Any) -> None:
        if type(more) is not int or more < 1:
            raise _Drop(f"'credit' frame with 'n' {shown(more)}: it must be an integer >= 1")
        request = self.inflight.get(request_id)
        if request is None or request.credit is None:
            return  # (a stream that ended meanwhile, or one without a window)
        request.credit += more
        self._wake(request)

    def _wake(self, request: Request) -> None:
        wakeup = request.wakeup
        if wakeup is not None and not wakeup.done():
            wakeup.set_result(None)

    def _wake_streams(self) -> None:
        for request in self.inflight.values():
            if request.wakeup is not None:
                self._wake(request)

    # --- writing ----------------------------------------------------------------------

    def _result(self, request_id: int, value: Any) -> None:
        self._send({"t": "result", "i": request_id, "r": value})

    def _fail(self, request_id: int, exc: BaseException, kind: str | None = None) -> None:
        self._send(error_to_wire(request_id, exc, kind))

    def _cancelled(self, request_id: int, message: str) -> None:
        self._send(
            {"t": "failure", "i": request_id, "y": "Cancelled", "k": "cancelled",
             "g": "application", "e": message}
        )  # fmt: skip

    def _send(self, message: dict[str, Any]) -> None:
        """Queue ``message`` to be written with every other answer of this loop
        iteration (or at once: the only request in flight answers, no other
        answer is coming to share the write with)."""
        if self.closing:
            return
        try:
            frame = self.encoder.encode(message)
        except (TypeError, ProtocolError) as exc:
            failure = TypeError(f"the answer cannot be sent: {exc}")
            frame = self.encoder.encode(
                error_to_wire(message.get("i", 0), failure, "serialization")
            )
        if not self._flush_soon and len(self.inflight) <= 1 and self.transport is not None:
            self.bytes_out += len(frame)
            self.transport.write(frame)
            return
        self._out.append(frame)
        self._out_bytes += len(frame)
        if not self._flush_soon:
            self._flush_soon = True
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        """Hand every answer queued to the socket, in one write."""
        self._flush_soon = False
        out, self._out = self._out, []
        size, self._out_bytes = self._out_bytes, 0
        transport = self.transport
        if not out or transport is None or transport.is_closing():
            return
        self.bytes_out += size
        transport.write(out[0] if len(out) == 1 else b"".join(out))
        if self.held:
            self._start_held()

    def drop(self, message: str, *, counted: bool = True) -> None:
        """Send ``error`` and close the connection (its requests are cancelled)."""
        if self.closing:
            return
        if counted:
            self.server.dropped += 1
            _log.warning("snakepool server: dropping a client: %s", message)
        self.close(self.encoder.encode({"t": "error", "e": message}))

    def close(self, last: bytes = b"") -> None:
        """Close after the answers queued (and ``last``); abort if they cannot leave soon."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        self.closing = True
        self.flush()
        if last:
            transport.write(last)
        transport.close()
        self.loop.call_later(_ERROR_GRACE, transport.abort)

    def statistics(self) -> ConnectionStatistics:
        return ConnectionStatistics(
            id=self.id,
            peer=self.peer,
            calls=self.calls,
            bytes_in=self.bytes_in,
            bytes_out=self.bytes_out,
            in_flight=len(self.inflight) + len(self.background),
            held=len(self.held),
            held_back=self.held_back,
            streams_paused=self.streams_paused,
            reading_paused=self.reading_paused,
            writing_paused=self.writing_paused,
            buffered_bytes=self.held_bytes + self.inflight_bytes + self.unsent_bytes,
        )
