"""Unit tests of the sans-IO wire protocol (framing, messages, connection).

No subprocesses and no event loop: bytes go from one ``Connection`` straight
into another, fed one byte at a time, in random chunks, or all at once.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
from collections.abc import Callable, Iterator
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from snakepool.errors import ProtocolError
from snakepool.protocol import (
    CLOSED,
    DEFAULT_MAX_FRAME_BYTES,
    HEADER_BYTES,
    MAX_NESTING,
    NEED_DATA,
    PROTOCOL_VERSION,
    RESERVED_TOOL_PREFIX,
    SAVE_STATE_TOOL,
    Call,
    CallMode,
    Cancel,
    Connection,
    Credit,
    End,
    Exited,
    Failure,
    FailureKind,
    FrameDecoder,
    FrameEncoder,
    Goodbye,
    Hello,
    HostCall,
    HostFailure,
    HostReply,
    ImportFailed,
    Importing,
    Init,
    Item,
    Log,
    Message,
    Ping,
    Pong,
    Ready,
    ReceiveError,
    Result,
    Role,
    SessionDrop,
    SessionSync,
    Spawn,
    Spawned,
    SpawnFailed,
    StartupFailed,
    TemplateConnection,
    TemplateInit,
    Unsafe,
    Withdraw,
    from_wire,
    to_wire,
)

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1


# --- helpers -----------------------------------------------------------------


def frame_of(body: bytes) -> bytes:
    """A frame around raw MessagePack ``body`` (no validation at all)."""
    return len(body).to_bytes(HEADER_BYTES, "big") + body


def frame_map(payload: Any) -> bytes:
    return frame_of(msgpack.packb(payload, use_bin_type=True))


def one_byte_at_a_time(data: bytes) -> Iterator[bytes]:
    for i in range(len(data)):
        yield data[i : i + 1]


def random_chunks(data: bytes, seed: int, max_chunk: int = 17) -> Iterator[bytes]:
    rng = random.Random(seed)
    i = 0
    while i < len(data):
        n = rng.randint(1, max_chunk)
        yield data[i : i + n]
        i += n


def all_at_once(data: bytes) -> Iterator[bytes]:
    yield data


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` cut at the given offsets (any order, duplicates allowed)."""
    points = sorted({c for c in cuts if 0 < c < len(data)})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


Chunker = Callable[[bytes], Iterator[bytes]]

CHUNKERS: dict[str, Chunker] = {
    "one-byte": one_byte_at_a_time,
    "random-seed-1": lambda d: random_chunks(d, 1),
    "random-seed-2": lambda d: random_chunks(d, 2, max_chunk=3),
    "random-seed-3": lambda d: random_chunks(d, 3, max_chunk=200),
    "all-at-once": all_at_once,
}


def transfer(data: bytes, receiver: Connection, chunker: Chunker) -> list[Message]:
    """Feed ``data`` to ``receiver`` chunk by chunk; every message it completed."""
    got: list[Message] = []
    for chunk in chunker(data):
        got.extend(receiver.receive_data(chunk))
    return got


def decode_all(decoder: FrameDecoder, chunks: list[bytes]) -> list[Any]:
    frames: list[Any] = []
    for chunk in chunks:
        decoder.feed(chunk)
        while isinstance(frame := decoder.next_frame(), dict):
            frames.append(frame)
        assert frame is NEED_DATA or (frame is CLOSED and chunk == b"")
    return frames


def host_and_worker(**kwargs: Any) -> tuple[Connection, Connection]:
    """A host and a worker connection that have completed the handshake."""
    host = Connection(Role.HOST, **kwargs)
    worker = Connection(Role.WORKER, **kwargs)
    assert worker.receive_data(host.send(INIT)) == [INIT]
    assert host.receive_data(worker.send(HELLO)) == [HELLO]
    return host, worker


# --- sample messages ---------------------------------------------------------

INIT = Init(
    version=PROTOCOL_VERSION,
    worker_id=3,
    pool="default",
    adapter="generic:my.module",
    config={"model": "x", "threads": 4, "weights": b"\x00\x01", "nested": {"a": [1, 2]}},
    concurrency=8,
    max_frame_bytes=1 << 20,
    sys_path=["/opt/app", "/srv/lib"],
)
HELLO = Hello(
    version=PROTOCOL_VERSION,
    pid=4242,
    worker_id=3,
    adapter="generic",
    commands=["echo", "add", "stream_numbers"],
)

HOST_MESSAGES: list[Message] = [
    INIT,
    Call(id=1, command="echo", args={"x": b"\x00\xff" * 10, "s": "h\u00e9llo \u2603"}),
    Call(id=2, command="stream_numbers", args={"n": 3}, mode=CallMode.STREAM),
    Call(
        id=3,
        command="add",
        args={"a": 1, "b": -2.5},
        mode=CallMode.CAST,
        timeout=1.5,
        session_id="sess-1",
    ),
    Call(id=4, command="add", args={}, timeout=2),
    Call(
        id=5,
        command="add",
        args={},
        trace="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    ),
    Call(id=INT64_MAX, command="x", args={"big": 2**64 - 1, "small": INT64_MIN}),
    Cancel(id=2),
    Withdraw(id=4),
    Ping(id=7),
    Credit(id=2, n=32),
    SessionSync(session_id="s1", version=3, variables={"t": 0.5}, restore={"k": b"v"}),
    SessionSync(session_id="s2", version=0, variables={}),
    SessionDrop(session_id="s1"),
    HostReply(id=5, value={"ok": [1, 2]}),
    HostFailure(id=6, type="LookupError", message="no host tool named 'x'"),
]

WORKER_MESSAGES: list[Message] = [
    HELLO,
    Result(id=1, value={"x": b"\x00\xff" * 10, "list": [1, "two", 3.0, None, True]}),
    Result(id=4, value=None),
    Item(id=2, value=0),
    Item(id=2, value=b"chunk"),
    End(id=2),
    Failure(
        id=3,
        kind=FailureKind.APPLICATION,
        type="ValueError",
        message="bad value",
        traceback="Traceback (most recent call last):\n  ...\nValueError: bad value\n",
    ),
    Failure(id=2, kind=FailureKind.CANCELLED, type="CancelledError", message=""),
    Log(level=30, logger="my.module", message="careful \u26a0"),
    Pong(id=7),
    HostCall(id=5, call_id=1, tool="lookup", args={"q": "x"}),
    Goodbye(reason="max_calls reached"),
]


# --- round trips through a Connection ----------------------------------------


@pytest.mark.parametrize("chunker", CHUNKERS.values(), ids=CHUNKERS.keys())
def test_host_to_worker_round_trip(chunker: Chunker) -> None:
    host = Connection(Role.HOST)
    worker = Connection(Role.WORKER)
    for message in HOST_MESSAGES:
        assert transfer(host.send(message), worker, chunker) == [message]
    assert worker.missing_bytes == 0


@pytest.mark.parametrize("chunker", CHUNKERS.values(), ids=CHUNKERS.keys())
def test_worker_to_host_round_trip(chunker: Chunker) -> None:
    host = Connection(Role.HOST)
    worker = Connection(Role.WORKER)
    for message in WORKER_MESSAGES:
        assert transfer(worker.send(message), host, chunker) == [message]
    assert host.missing_bytes == 0


@pytest.mark.parametrize("chunker", CHUNKERS.values(), ids=CHUNKERS.keys())
def test_startup_failed_round_trip(chunker: Chunker) -> None:
    host = Connection(Role.HOST)
    worker = Connection(Role.WORKER)
    for message in [
        StartupFailed(type="ImportError", message="no module named 'x'", traceback="tb"),
        StartupFailed(type="RuntimeError", message="setup failed"),
    ]:
        # Each on a fresh host, since it is a first message.
        host = Connection(Role.HOST)
        assert transfer(worker.send(message), host, chunker) == [message]


@pytest.mark.parametrize("chunker", CHUNKERS.values(), ids=CHUNKERS.keys())
def test_whole_conversation_concatenated(chunker: Chunker) -> None:
    """All frames of each direction concatenated in one byte string."""
    host = Connection(Role.HOST)
    worker = Connection(Role.WORKER)
    to_worker = b"".join(host.send(m) for m in HOST_MESSAGES)
    to_host = b"".join(worker.send(m) for m in WORKER_MESSAGES)
    assert transfer(to_worker, worker, chunker) == HOST_MESSAGES
    assert transfer(to_host, host, chunker) == WORKER_MESSAGES


def test_several_frames_in_one_chunk_then_clean_eof() -> None:
    host = Connection(Role.HOST)
    worker = Connection(Role.WORKER)
    assert worker.receive_data(b"".join(host.send(m) for m in HOST_MESSAGES)) == HOST_MESSAGES
    assert worker.receive_data(b"") == []  # closed between frames: nothing more, no error
    assert worker.receive_data(b"") == []  # stays closed


def test_a_read_of_whole_frames_and_part_of_the_next_keeps_the_part() -> None:
    host, worker = host_and_worker()
    frame = host.send(Ping(id=1))
    assert worker.receive_data(frame + frame[:3]) == [Ping(id=1)]
    assert worker.receive_data(frame[3:-1]) == []
    assert worker.missing_bytes == 1
    assert worker.receive_data(frame[-1:] + frame) == [Ping(id=1), Ping(id=1)]
    assert worker.missing_bytes == 0


def test_receive_data_applies_the_direction_rules_to_whole_reads() -> None:
    host, _ = host_and_worker()
    assert host.receive_data(frame_map(to_wire(Result(id=3, value=1)))) == [Result(id=3, value=1)]
    with pytest.raises(ProtocolError, match="only a host may send"):
        host.receive_data(frame_map(to_wire(Call(id=1, command="echo", args={}))))
    host, _ = host_and_worker()
    with pytest.raises(ProtocolError, match="unknown message type"):
        host.receive_data(frame_map({"t": "nonsense"}))
    host, _ = host_and_worker()
    with pytest.raises(ProtocolError, match="unknown message type"):
        host.receive_data(frame_map({"t": ["result"]}))


def test_messages_before_a_bad_frame_come_with_the_error_and_the_connection_stays_broken() -> None:
    host, worker = host_and_worker()
    good = worker.send(Result(id=1, value="a")) + worker.send(Pong(id=2))
    bad = frame_map({"t": "result", "i": "3", "r": None})
    with pytest.raises(ReceiveError, match="field 'id'") as info:
        host.receive_data(good + bad + worker.send(Pong(id=4)))
    assert info.value.received == [Result(id=1, value="a"), Pong(id=2)]
    with pytest.raises(ProtocolError, match="field 'id'"):  # broken for good
        host.receive_data(worker.send(Pong(id=5)))
    # A framing error after good frames, read one byte at a time: the same.
    host, worker = host_and_worker(max_frame_bytes=500)
    data = worker.send(Pong(id=1)) + (1000).to_bytes(4, "big")
    got: list[Message] = []
    with pytest.raises(ReceiveError, match="over max_frame_bytes") as info:
        for chunk in one_byte_at_a_time(data):
            got.extend(host.receive_data(chunk))
    assert got + info.value.received == [Pong(id=1)]


def test_send_parts_is_send_in_two_pieces() -> None:
    worker = Connection(Role.WORKER)
    for value in (1, b"x" * 10_000):
        header, body = worker.send_parts(Result(id=1, value=value))
        assert header + bytes(body) == worker.send(Result(id=1, value=value))
        assert int.from_bytes(header, "big") == len(body)


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_receive_data_accepts_any_bytes_like(kind: type) -> None:
    host = Connection(Role.HOST)
    worker = Connection(Role.WORKER)
    assert worker.receive_data(kind(host.send(INIT))) == [INIT]


@pytest.mark.parametrize("message", HOST_MESSAGES + WORKER_MESSAGES, ids=lambda m: m.TAG)
def test_to_wire_from_wire_round_trip(message: Message) -> None:
    wire = to_wire(message)
    assert wire["t"] == message.TAG
    # (a field declared omit_none is left out while it is None: Call's trace)
    absent = {
        f.metadata["wire"]
        for f in dataclasses.fields(message)  # type: ignore[arg-type]
        if f.metadata.get("omit_none") and getattr(message, f.name) is None
    }
    assert set(wire) == {"t"} | {key for _, key, _ in message.WIRE} - absent
    assert from_wire(wire) == message


def test_every_message_type_is_covered() -> None:
    covered = {type(m) for m in HOST_MESSAGES + WORKER_MESSAGES} | {StartupFailed}
    assert covered == {Init, Call, Cancel, Withdraw, Hello, StartupFailed, Result}.union(
        {Failure, Item, End, Log, Goodbye, Ping, Pong, Credit}
        | {SessionSync, SessionDrop, HostCall, HostReply, HostFailure}
    )


def test_tags_and_wire_keys_are_unique() -> None:
    classes = [
        *(Init, Call, Cancel, Withdraw, Credit, Ping, Hello, StartupFailed, HostCall, HostReply),
        *(HostFailure, SessionSync, SessionDrop),
        *(Result, Failure, Item, End, Log, Pong, Goodbye),
    ]
    assert len({c.TAG for c in classes}) == len(classes)
    for cls in classes:
        keys = [key for _, key, _ in cls.WIRE]
        assert "t" not in keys
        assert len(set(keys)) == len(keys), cls


def test_defaults_apply_when_optional_keys_are_absent() -> None:
    assert from_wire({"t": "call", "i": 1, "c": "f", "a": {}}) == Call(id=1, command="f", args={})
    call = from_wire({"t": "call", "i": 1, "c": "f", "a": {}})
    assert isinstance(call, Call)
    assert (call.mode, call.timeout, call.session_id) == (CallMode.CALL, None, None)
    init = from_wire({"t": "init", "v": 1, "w": 0, "p": "p", "a": "generic"})
    assert init == Init(version=1, worker_id=0, pool="p", adapter="generic")
    assert isinstance(init, Init)
    assert init.config == {}
    assert init.sys_path == []
    assert init.max_frame_bytes == DEFAULT_MAX_FRAME_BYTES
    assert from_wire({"t": "startup_failed", "y": "E", "e": "m"}) == StartupFailed("E", "m")
    assert from_wire({"t": "failure", "i": 1, "k": "application", "y": "E", "e": "m"}) == (
        Failure(id=1, kind="application", type="E", message="m")
    )


def test_unknown_keys_are_ignored() -> None:
    assert from_wire({"t": "cancel", "i": 5, "zz": [1, 2], "future": None}) == Cancel(id=5)


def test_tuples_arrive_as_lists() -> None:
    host, worker = host_and_worker()
    sent = Result(id=1, value=(1, (2, 3), {"k": (4,)}))
    (got,) = transfer(worker.send(sent), host, all_at_once)
    assert got == Result(id=1, value=[1, [2, 3], {"k": [4]}])


def test_non_string_map_keys_survive() -> None:
    host, worker = host_and_worker()
    sent = Result(id=1, value={1: "one", -2: "minus two", b"k": "bytes key", 1.5: None})
    assert transfer(worker.send(sent), host, all_at_once) == [sent]


def test_floats_and_extreme_ints_round_trip_exactly() -> None:
    host, worker = host_and_worker()
    values = [0.1, -0.0, 1e308, 5e-324, float("inf"), float("-inf"), 2**64 - 1, INT64_MIN]
    sent = Result(id=1, value=values)
    (got,) = transfer(worker.send(sent), host, all_at_once)
    assert isinstance(got, Result)
    assert got.value == values
    assert [type(v) for v in got.value] == [type(v) for v in values]


def test_golden_call_frame_bytes() -> None:
    """The exact bytes of the worked example in docs/protocol.md."""
    frame = Connection(Role.HOST).send(Call(id=1, command="echo", args={"x": b"hi"}))
    assert frame.hex() == (
        "00000028"  # body length 40
        "87"  # map of 7
        "a174a463616c6c"  # "t": "call"
        "a16901"  # "i": 1
        "a163a46563686f"  # "c": "echo"
        "a16181a178c4026869"  # "a": {"x": bin8 b"hi"}
        "a16da463616c6c"  # "m": "call"
        "a16fc0"  # "o": nil
        "a173c0"  # "s": nil
    )


# --- binary values -----------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "marker"),
    [(0, 0xC4), (1, 0xC4), (255, 0xC4), (256, 0xC5), (65535, 0xC5), (65536, 0xC6)],
)
def test_binary_travels_as_msgpack_bin(size: int, marker: int) -> None:
    payload = random.Random(size).randbytes(size)
    host, worker = host_and_worker()
    frame = worker.send(Result(id=9, value=payload))
    length = size.to_bytes({0xC4: 1, 0xC5: 2, 0xC6: 4}[marker], "big")
    # The bin marker and its length, then the raw bytes: no base64, no str.
    assert bytes([marker]) + length + payload in frame
    assert frame.endswith(bytes([marker]) + length + payload)
    (got,) = transfer(frame, host, lambda d: random_chunks(d, size, max_chunk=4096))
    assert got == Result(id=9, value=payload)
    assert isinstance(got, Result)
    assert type(got.value) is bytes


def test_bytearray_and_memoryview_values_are_sent_as_bin() -> None:
    host, worker = host_and_worker()
    frame = worker.send(Result(id=1, value=[bytearray(b"ab"), memoryview(b"cd")]))
    assert b"\xc4\x02ab" in frame
    assert b"\xc4\x02cd" in frame
    assert transfer(frame, host, all_at_once) == [Result(id=1, value=[b"ab", b"cd"])]


def test_text_is_str_not_bin() -> None:
    frame = Connection(Role.WORKER).send(Result(id=1, value="hi"))
    assert frame.endswith(b"\xa2hi")


def test_several_mib_of_bytes_round_trip() -> None:
    payload = random.Random(7).randbytes(5 * 2**20 + 123)
    host, worker = host_and_worker()
    frame = worker.send(Result(id=1, value=payload))
    assert len(frame) < len(payload) + 64  # no base64 inflation
    assert b"\xc6" + len(payload).to_bytes(4, "big") + payload in frame
    chunker: Chunker = lambda d: random_chunks(d, 11, max_chunk=256 * 1024)  # noqa: E731
    assert transfer(frame, host, chunker) == [Result(id=1, value=payload)]
    # and host -> worker too
    sent = Call(id=2, command="upload", args={"blob": payload})
    assert transfer(host.send(sent), worker, chunker) == [sent]


# --- FrameDecoder ------------------------------------------------------------


def test_decoder_need_data_on_partial_input() -> None:
    frame = frame_map({"t": "x", "v": 1})
    decoder = FrameDecoder()
    assert decoder.next_frame() is NEED_DATA  # nothing yet
    for i in range(len(frame) - 1):
        decoder.feed(frame[i : i + 1])
        assert decoder.next_frame() is NEED_DATA
    decoder.feed(frame[-1:])
    assert decoder.next_frame() == {"t": "x", "v": 1}
    assert decoder.next_frame() is NEED_DATA
    assert decoder.buffered_bytes == 0


def test_decoder_closed_on_clean_eof() -> None:
    decoder = FrameDecoder()
    decoder.feed(b"")
    assert decoder.next_frame() is CLOSED
    assert decoder.next_frame() is CLOSED


def test_decoder_closed_after_frames_then_eof() -> None:
    decoder = FrameDecoder()
    decoder.feed(frame_map({"a": 1}) + frame_map({"b": 2}))
    decoder.feed(b"")
    assert decoder.next_frame() == {"a": 1}
    assert decoder.next_frame() == {"b": 2}
    assert decoder.next_frame() is CLOSED


@pytest.mark.parametrize("cut", [1, 2, 3])
def test_decoder_eof_mid_header(cut: int) -> None:
    decoder = FrameDecoder()
    decoder.feed(frame_map({"a": 1})[:cut])
    assert decoder.next_frame() is NEED_DATA
    decoder.feed(b"")
    with pytest.raises(ProtocolError, match="header"):
        decoder.next_frame()


@pytest.mark.parametrize("cut", [4, 5, 7])
def test_decoder_eof_mid_body(cut: int) -> None:
    frame = frame_map({"a": 1})
    assert len(frame) == 8
    decoder = FrameDecoder()
    decoder.feed(frame[:cut])
    assert decoder.next_frame() is NEED_DATA
    decoder.feed(b"")
    with pytest.raises(ProtocolError, match="body"):
        decoder.next_frame()


def test_decoder_eof_mid_second_frame() -> None:
    decoder = FrameDecoder()
    decoder.feed(frame_map({"a": 1}) + frame_map({"b": 2})[:6])
    decoder.feed(b"")
    assert decoder.next_frame() == {"a": 1}
    with pytest.raises(ProtocolError, match="mid-frame"):
        decoder.next_frame()


def test_decoder_rejects_data_after_eof() -> None:
    decoder = FrameDecoder()
    decoder.feed(b"")
    decoder.feed(frame_map({"a": 1}))
    with pytest.raises(ProtocolError, match="after end of stream"):
        decoder.next_frame()


def test_decoder_rejects_zero_length_frame() -> None:
    decoder = FrameDecoder()
    decoder.feed(b"\x00\x00\x00\x00")
    with pytest.raises(ProtocolError, match="empty frame"):
        decoder.next_frame()


def test_decoder_rejects_zero_length_frame_after_a_good_one() -> None:
    decoder = FrameDecoder()
    decoder.feed(frame_map({"a": 1}) + b"\x00\x00\x00\x00")
    assert decoder.next_frame() == {"a": 1}
    with pytest.raises(ProtocolError, match="empty frame"):
        decoder.next_frame()


def test_decoder_accepts_frame_of_exactly_max_frame_bytes() -> None:
    body = msgpack.packb({"b": b"x" * 100}, use_bin_type=True)
    decoder = FrameDecoder(max_frame_bytes=len(body))
    decoder.feed(frame_of(body))
    assert decoder.next_frame() == {"b": b"x" * 100}
    too_small = FrameDecoder(max_frame_bytes=len(body) - 1)
    too_small.feed(frame_of(body))
    with pytest.raises(ProtocolError, match="max_frame_bytes"):
        too_small.next_frame()


def test_decoder_refuses_oversized_frame_from_header_alone() -> None:
    decoder = FrameDecoder(max_frame_bytes=1024)
    announced = 10 * 2**20
    decoder.feed(announced.to_bytes(4, "big"))
    # Refused as soon as the header is complete, before any body byte arrived.
    with pytest.raises(ProtocolError, match="max_frame_bytes"):
        decoder.next_frame()
    # The body that follows is dropped, never buffered.
    for _ in range(20):
        decoder.feed(b"\x00" * 65536)
        assert decoder.buffered_bytes == 0
        with pytest.raises(ProtocolError):
            decoder.next_frame()


def test_decoder_does_not_buffer_oversized_body_fed_with_header() -> None:
    decoder = FrameDecoder(max_frame_bytes=1024)
    decoder.feed((2 * 2**20).to_bytes(4, "big") + b"\x01" * 4096)
    assert decoder.buffered_bytes == 0
    decoder.feed(b"\x01" * 2**20)
    assert decoder.buffered_bytes == 0
    with pytest.raises(ProtocolError, match="refused before reading"):
        decoder.next_frame()


def test_decoder_refuses_4gib_length_prefix() -> None:
    decoder = FrameDecoder()  # default 64 MiB limit
    decoder.feed(b"\xff\xff\xff\xff" + b"\x81" * 100)
    assert decoder.buffered_bytes == 0
    with pytest.raises(ProtocolError, match="max_frame_bytes"):
        decoder.next_frame()


def test_decoder_refuses_oversized_second_frame_after_good_one() -> None:
    decoder = FrameDecoder(max_frame_bytes=64)
    decoder.feed(frame_map({"ok": True}) + (1000).to_bytes(4, "big") + b"\x00" * 10)
    assert decoder.next_frame() == {"ok": True}
    with pytest.raises(ProtocolError, match="max_frame_bytes"):
        decoder.next_frame()
    assert decoder.buffered_bytes == 0


@pytest.mark.parametrize(
    "payload",
    [[1, 2, 3], 7, "str", b"bin", None, True, 1.5],
    ids=["list", "int", "str", "bin", "nil", "bool", "float"],
)
def test_decoder_rejects_non_map_payloads(payload: Any) -> None:
    decoder = FrameDecoder()
    decoder.feed(frame_map(payload))
    with pytest.raises(ProtocolError, match="not a map"):
        decoder.next_frame()


@pytest.mark.parametrize(
    "body",
    [
        b"\xc1",  # the one never-used MessagePack byte
        b"\x82\xa1a\x01",  # map of 2 with only one entry
        b"\xdf\xff\xff\xff\xff",  # map32 announcing 4 billion entries
        b"\xc6\xff\xff\xff\xff",  # bin32 longer than the frame
        b"\x81\xa1a\x01\x81\xa1b\x02",  # two maps in one frame (extra data)
        b"\x81\xa2\xff\xfe\x01",  # str key with invalid UTF-8
        b"\xff" * 32,
    ],
    ids=["c1", "short-map", "map32", "bin32", "extra", "bad-utf8", "ff"],
)
def test_decoder_rejects_garbage(body: bytes) -> None:
    decoder = FrameDecoder()
    decoder.feed(frame_of(body))
    with pytest.raises(ProtocolError, match="undecodable"):
        decoder.next_frame()


def test_decoder_stays_broken() -> None:
    decoder = FrameDecoder()
    decoder.feed(frame_of(b"\xc1"))
    with pytest.raises(ProtocolError) as first:
        decoder.next_frame()
    decoder.feed(frame_map({"a": 1}))  # a perfectly good frame, dropped
    assert decoder.buffered_bytes == 0
    for _ in range(3):
        with pytest.raises(ProtocolError) as again:
            decoder.next_frame()
        assert again.value is first.value
    decoder.feed(b"")
    with pytest.raises(ProtocolError):
        decoder.next_frame()


@pytest.mark.parametrize("bad", [0, -1, 2**32])
def test_bad_max_frame_bytes(bad: int) -> None:
    with pytest.raises(ValueError, match="max_frame_bytes"):
        FrameDecoder(max_frame_bytes=bad)
    with pytest.raises(ValueError, match="max_frame_bytes"):
        FrameEncoder(max_frame_bytes=bad)
    with pytest.raises(ValueError, match="max_frame_bytes"):
        Connection(Role.HOST, max_frame_bytes=bad)


def test_default_max_frame_bytes_is_64_mib() -> None:
    assert DEFAULT_MAX_FRAME_BYTES == 64 * 2**20
    assert FrameDecoder().max_frame_bytes == DEFAULT_MAX_FRAME_BYTES
    assert FrameEncoder().max_frame_bytes == DEFAULT_MAX_FRAME_BYTES
    assert Connection(Role.WORKER).max_frame_bytes == DEFAULT_MAX_FRAME_BYTES
    assert Connection(Role.WORKER, max_frame_bytes=100).max_frame_bytes == 100
    assert HEADER_BYTES == 4


# --- FrameEncoder ------------------------------------------------------------


def test_encoder_frames_are_big_endian_length_prefixed() -> None:
    frame = FrameEncoder().encode({"a": 1})
    assert frame == b"\x00\x00\x00\x04\x81\xa1a\x01"


@pytest.mark.parametrize(
    ("value", "type_name"),
    [({1, 2}, "set"), (object(), "object"), (frozenset(), "frozenset"), (1j, "complex")],
)
def test_encoder_type_error_names_the_type(value: Any, type_name: str) -> None:
    encoder = FrameEncoder()
    with pytest.raises(TypeError, match=rf"\b{type_name}\b"):
        encoder.encode({"v": value})
    # The encoder is still usable afterwards (its packer was reset).
    assert encoder.encode({"a": 1}) == b"\x00\x00\x00\x04\x81\xa1a\x01"


def test_encoder_type_error_on_int_out_of_range() -> None:
    encoder = FrameEncoder()
    with pytest.raises(TypeError, match="serializable"):
        encoder.encode({"v": 2**64})
    with pytest.raises(TypeError, match="serializable"):
        encoder.encode({"v": INT64_MIN - 1})
    assert encoder.encode({"v": 2**64 - 1})


def test_connection_send_type_error_sends_nothing_and_recovers() -> None:
    host, worker = host_and_worker()
    with pytest.raises(TypeError, match="set"):
        worker.send(Result(id=1, value={1, 2, 3}))
    frame = worker.send(Result(id=1, value=[1, 2, 3]))
    assert transfer(frame, host, all_at_once) == [Result(id=1, value=[1, 2, 3])]


def test_encoder_refuses_frame_over_max_frame_bytes() -> None:
    body_len = len(msgpack.packb({"b": b"x" * 100}, use_bin_type=True))
    assert FrameEncoder(max_frame_bytes=body_len).encode({"b": b"x" * 100})
    with pytest.raises(ProtocolError, match="max_frame_bytes"):
        FrameEncoder(max_frame_bytes=body_len - 1).encode({"b": b"x" * 100})


def test_a_size_just_over_the_limit_is_told_in_bytes() -> None:
    limit = 64 * 2**20  # ("64.0 MiB, over 64.0 MiB" would say nothing)
    decoder = FrameDecoder(limit)
    decoder.feed((limit + 1).to_bytes(4, "big"))
    with pytest.raises(ProtocolError) as announced:
        decoder.next_frame()
    assert str(announced.value) == (
        "frame of 67,108,865 bytes announced, over max_frame_bytes=67,108,864 bytes; "
        "refused before reading it"
    )
    with pytest.raises(
        ProtocolError, match=r"^frame of 2\.0 KiB exceeds max_frame_bytes=1\.0 KiB$"
    ):
        FrameEncoder(max_frame_bytes=1024).encode({"b": b"x" * 2040})


def test_connection_send_refuses_oversized_frame() -> None:
    host, worker = host_and_worker(max_frame_bytes=1024)
    with pytest.raises(ProtocolError, match="exceeds max_frame_bytes"):
        worker.send(Result(id=1, value=b"x" * 2048))
    with pytest.raises(ProtocolError, match="exceeds max_frame_bytes"):
        host.send(Call(id=1, command="f", args={"blob": b"x" * 2048}))
    # Still usable: a small result goes through.
    assert transfer(worker.send(Result(id=1, value=b"ok")), host, all_at_once) == [
        Result(id=1, value=b"ok")
    ]


def test_connection_receive_refuses_oversized_frame() -> None:
    big_host = Connection(Role.HOST)
    small_worker = Connection(Role.WORKER, max_frame_bytes=1024)
    assert small_worker.receive_data(big_host.send(INIT)) == [INIT]
    frame = big_host.send(Call(id=1, command="f", args={"blob": b"x" * 4096}))
    with pytest.raises(ProtocolError, match="max_frame_bytes"):
        small_worker.receive_data(frame[:100])


# --- from_wire validation ----------------------------------------------------


@pytest.mark.parametrize(
    "wire",
    [{"t": "nope"}, {"t": "CALL"}, {}, {"t": 1}, {"t": None}, {"t": b"call"}, {"t": ["call"]}],
    ids=["unknown", "case", "missing", "int", "nil", "bin", "list"],
)
def test_from_wire_unknown_type(wire: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError, match="unknown message type"):
        from_wire(wire)


@pytest.mark.parametrize(
    ("wire", "field"),
    [
        ({"t": "call", "c": "f", "a": {}}, "id"),
        ({"t": "call", "i": 1, "a": {}}, "command"),
        ({"t": "call", "i": 1, "c": "f"}, "args"),
        ({"t": "cancel"}, "id"),
        ({"t": "init", "w": 0, "p": "p", "a": "a"}, "version"),
        ({"t": "init", "v": 1, "p": "p", "a": "a"}, "worker_id"),
        ({"t": "hello", "v": 1, "p": 1, "w": 0, "a": "a"}, "commands"),
        ({"t": "hello", "v": 1, "w": 0, "a": "a", "c": []}, "pid"),
        ({"t": "result", "i": 1}, "value"),
        ({"t": "item", "r": 1}, "id"),
        ({"t": "end"}, "id"),
        ({"t": "failure", "i": 1, "y": "E", "e": "m"}, "kind"),
        ({"t": "startup_failed", "e": "m"}, "type"),
        ({"t": "log", "l": 20, "n": "x"}, "message"),
        ({"t": "bye"}, "reason"),
    ],
)
def test_from_wire_missing_field(wire: dict[str, Any], field: str) -> None:
    with pytest.raises(ProtocolError, match=rf"lacks field '{field}'"):
        from_wire(wire)


def test_from_wire_none_is_a_valid_result_value() -> None:
    assert from_wire({"t": "result", "i": 1, "r": None}) == Result(id=1, value=None)


GOOD_CALL = {"t": "call", "i": 1, "c": "f", "a": {}}
GOOD_HELLO = {"t": "hello", "v": 1, "p": 10, "w": 0, "a": "generic", "c": []}


@pytest.mark.parametrize(
    ("wire", "field"),
    [
        ({**GOOD_CALL, "i": "1"}, "id"),
        ({**GOOD_CALL, "i": True}, "id"),
        ({**GOOD_CALL, "i": False}, "id"),
        ({**GOOD_CALL, "i": 1.0}, "id"),
        ({**GOOD_CALL, "i": None}, "id"),
        ({**GOOD_CALL, "c": b"f"}, "command"),
        ({**GOOD_CALL, "c": None}, "command"),
        ({**GOOD_CALL, "a": [1, 2]}, "args"),
        ({**GOOD_CALL, "a": None}, "args"),
        ({**GOOD_CALL, "m": 1}, "mode"),
        ({**GOOD_CALL, "o": "1.5"}, "timeout"),
        ({**GOOD_CALL, "o": True}, "timeout"),
        ({**GOOD_CALL, "s": 5}, "session_id"),
        ({**GOOD_HELLO, "v": "1"}, "version"),
        ({**GOOD_HELLO, "v": True}, "version"),
        ({**GOOD_HELLO, "p": 1.5}, "pid"),
        ({**GOOD_HELLO, "c": {"a": 1}}, "commands"),
        ({**GOOD_HELLO, "c": "echo"}, "commands"),
        ({"t": "init", "v": 1, "w": 0, "p": "p", "a": "a", "c": []}, "config"),
        ({"t": "init", "v": 1, "w": 0, "p": "p", "a": "a", "n": True}, "concurrency"),
        ({"t": "init", "v": 1, "w": 0, "p": "p", "a": "a", "m": 1.0}, "max_frame_bytes"),
        ({"t": "init", "v": 1, "w": 0, "p": "p", "a": "a", "s": "/opt"}, "sys_path"),
        ({"t": "cancel", "i": "2"}, "id"),
        ({"t": "end", "i": [1]}, "id"),
        ({"t": "failure", "i": 1, "k": 3, "y": "E", "e": "m"}, "kind"),
        ({"t": "failure", "i": 1, "k": "x", "y": "E", "e": "m", "b": None}, "traceback"),
        ({"t": "log", "l": "INFO", "n": "x", "e": "m"}, "level"),
        ({"t": "log", "l": 20, "n": None, "e": "m"}, "logger"),
        ({"t": "bye", "e": 0}, "reason"),
        ({"t": "startup_failed", "y": "E", "e": b"m"}, "message"),
    ],
)
def test_from_wire_wrong_field_type(wire: dict[str, Any], field: str) -> None:
    with pytest.raises(ProtocolError, match=rf"field '{field}' is "):
        from_wire(wire)


def test_from_wire_error_names_actual_and_expected_types() -> None:
    with pytest.raises(ProtocolError) as info:
        from_wire({**GOOD_CALL, "i": "7"})
    text = str(info.value)
    assert "'call'" in text
    assert "'id'" in text
    assert "str" in text
    assert "int" in text


def test_from_wire_accepts_int_timeout() -> None:
    call = from_wire({**GOOD_CALL, "o": 3})
    assert isinstance(call, Call)
    assert call.timeout == 3


@pytest.mark.parametrize("chunker", CHUNKERS.values(), ids=CHUNKERS.keys())
def test_protocol_error_names_the_field_of_a_malformed_message(chunker: Chunker) -> None:
    _, worker = host_and_worker()
    with pytest.raises(ProtocolError, match="'id'"):
        transfer(frame_map({**GOOD_CALL, "i": "1"}), worker, chunker)


# --- Connection: direction and handshake -------------------------------------


@pytest.mark.parametrize("message", WORKER_MESSAGES[1:], ids=lambda m: m.TAG)
def test_worker_refuses_worker_only_messages(message: Message) -> None:
    host = Connection(Role.HOST)
    worker = Connection(Role.WORKER)
    assert worker.receive_data(host.send(INIT)) == [INIT]
    with pytest.raises(ProtocolError, match="only a worker may send"):
        worker.receive_data(frame_map(to_wire(message)))


@pytest.mark.parametrize(
    "message",
    [HELLO, StartupFailed(type="E", message="m")],
    ids=["hello", "startup_failed"],
)
def test_worker_refuses_handshake_replies_even_first(message: Message) -> None:
    worker = Connection(Role.WORKER)
    with pytest.raises(ProtocolError, match="only a worker may send"):
        worker.receive_data(frame_map(to_wire(message)))


@pytest.mark.parametrize("message", HOST_MESSAGES, ids=lambda m: m.TAG)
def test_host_refuses_host_only_messages(message: Message) -> None:
    host, _ = host_and_worker()
    with pytest.raises(ProtocolError, match="only a host may send"):
        host.receive_data(frame_map(to_wire(message)))


@pytest.mark.parametrize(
    "message", [m for m in WORKER_MESSAGES[1:] if not isinstance(m, Log)], ids=lambda m: m.TAG
)
def test_host_first_message_must_be_hello_or_startup_failed(message: Message) -> None:
    host = Connection(Role.HOST)
    host.send(INIT)
    with pytest.raises(ProtocolError, match="first message must be 'hello' or 'startup_failed'"):
        host.receive_data(Connection(Role.WORKER).send(message))


@pytest.mark.parametrize("message", HOST_MESSAGES[1:], ids=lambda m: m.TAG)
def test_worker_first_message_must_be_init(message: Message) -> None:
    worker = Connection(Role.WORKER)
    with pytest.raises(ProtocolError, match="first message must be 'init'"):
        worker.receive_data(Connection(Role.HOST).send(message))


def test_host_accepts_log_before_hello() -> None:
    # setup() may log before the handshake; that must not break it.
    host = Connection(Role.HOST)
    worker = Connection(Role.WORKER)
    host.send(INIT)
    data = worker.send(Log(level=20, logger="setup", message="loading")) + worker.send(HELLO)
    assert host.receive_data(data) == [Log(level=20, logger="setup", message="loading"), HELLO]


def test_host_accepts_startup_failed_first() -> None:
    host = Connection(Role.HOST)
    host.send(INIT)
    failed = StartupFailed(type="ImportError", message="boom", traceback="tb")
    assert host.receive_data(Connection(Role.WORKER).send(failed)) == [failed]
    assert host.receive_data(b"") == []  # and then the worker exits


def test_messages_flow_after_handshake() -> None:
    host, worker = host_and_worker()
    call = Call(id=1, command="echo", args={"x": 1})
    assert transfer(host.send(call), worker, one_byte_at_a_time) == [call]
    reply = Result(id=1, value={"x": 1})
    assert transfer(worker.send(reply), host, one_byte_at_a_time) == [reply]


@pytest.mark.parametrize("message", WORKER_MESSAGES, ids=lambda m: m.TAG)
def test_host_may_not_send_worker_messages(message: Message) -> None:
    with pytest.raises(ProtocolError, match="a host may not send"):
        Connection(Role.HOST).send(message)


@pytest.mark.parametrize("message", HOST_MESSAGES, ids=lambda m: m.TAG)
def test_worker_may_not_send_host_messages(message: Message) -> None:
    with pytest.raises(ProtocolError, match="a worker may not send"):
        Connection(Role.WORKER).send(message)


def test_role_peer() -> None:
    assert Connection(Role.HOST).peer is Role.WORKER
    assert Connection(Role.WORKER).peer is Role.HOST


def test_framing_error_surfaces_through_connection_and_sticks() -> None:
    worker = Connection(Role.WORKER, max_frame_bytes=100)
    with pytest.raises(ProtocolError, match="max_frame_bytes"):
        worker.receive_data(b"\x00\x00\x10\x00")  # announces 4096 bytes
    with pytest.raises(ProtocolError):
        worker.receive_data(Connection(Role.HOST).send(INIT))


def test_constants() -> None:
    assert PROTOCOL_VERSION == 2
    assert {"call", "stream", "cast"} == CallMode.ALL
    kinds = {
        FailureKind.APPLICATION,
        FailureKind.UNKNOWN_COMMAND,
        FailureKind.BAD_ARGUMENTS,
        FailureKind.SERIALIZATION,
        FailureKind.CANCELLED,
        FailureKind.WITHDRAWN,
        FailureKind.WRONG_MODE,
    }
    assert kinds == {
        "application",
        "unknown_command",
        "bad_arguments",
        "serialization",
        "cancelled",
        "withdrawn",
        "wrong_mode",
    }


# --- nesting -------------------------------------------------------------------


def nested(levels: int) -> Any:
    """``levels`` lists, one inside the other."""
    value: Any = []
    for _ in range(levels - 1):
        value = [value]
    return value


def test_encoder_refuses_exactly_the_nesting_the_decoder_refuses() -> None:
    # The frame's map is one level: MAX_NESTING - 1 levels fit under it.
    deepest = {"r": nested(MAX_NESTING - 1)}
    decoder = FrameDecoder()
    decoder.feed(FrameEncoder().encode(deepest))
    frame = decoder.next_frame()
    assert isinstance(frame, dict)
    value, levels = frame["r"], 1
    while value:
        (value,) = value
        levels += 1
    assert levels == MAX_NESTING - 1
    with pytest.raises(TypeError, match=f"nests deeper than {MAX_NESTING} levels"):
        FrameEncoder().encode({"r": nested(MAX_NESTING)})
    with pytest.raises(TypeError, match="nests deeper"):
        Connection(Role.WORKER).send(Result(id=1, value=nested(MAX_NESTING)))
    assert Connection(Role.WORKER).send(Result(id=1, value=nested(MAX_NESTING - 1)))
    # Large frames of many shallow containers, or of a few big values, are fine.
    for value in ([{"a": [1]}] * 5000, {"blob": b"x" * 100_000, "rows": [[1, 2]] * 50}):
        decoder = FrameDecoder()
        decoder.feed(FrameEncoder().encode({"r": value}))
        assert decoder.next_frame() == {"r": value}
    # ...and the peer's decoder does refuse one level more (msgpack alone packs it).
    frame = frame_of(msgpack.packb({"r": nested(MAX_NESTING)}))
    decoder = FrameDecoder()
    decoder.feed(frame)
    with pytest.raises(ProtocolError, match=f"^frame nests deeper than {MAX_NESTING} levels$"):
        decoder.next_frame()


# --- hypothesis ---------------------------------------------------------------

FUZZ = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
SMALL_MAX = 64

leaves = (
    st.none()
    | st.booleans()
    | st.integers(min_value=INT64_MIN, max_value=INT64_MAX)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=40)
)
msgpack_values = st.recursive(
    leaves,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5)
    ),
    max_leaves=15,
)
msgpack_maps = st.dictionaries(st.text(max_size=8), msgpack_values, max_size=6)

small_frames = st.dictionaries(
    st.text(max_size=3), st.integers(-5, 5) | st.binary(max_size=8), max_size=4
).map(lambda m: frame_of(msgpack.packb(m, use_bin_type=True)))
fuzz_pieces = st.lists(
    st.one_of(
        st.binary(max_size=24),
        small_frames,
        st.integers(0, 2**32 - 1).map(lambda n: n.to_bytes(4, "big")),  # bare headers
    ),
    max_size=8,
).map(b"".join)


@FUZZ
@given(data=fuzz_pieces, cuts=st.lists(st.integers(0, 400), max_size=12), eof=st.booleans())
def test_fuzz_decoder_only_frames_sentinels_or_protocol_error(
    data: bytes, cuts: list[int], eof: bool
) -> None:
    decoder = FrameDecoder(max_frame_bytes=SMALL_MAX)
    chunks = split_at(data, cuts)
    if eof:
        chunks.append(b"")
    bound = len(data) + 5  # each frame consumes at least 5 bytes
    try:
        for chunk in chunks:
            decoder.feed(chunk)
            limit = SMALL_MAX + HEADER_BYTES + len(chunk)
            assert decoder.buffered_bytes <= limit
            for _ in range(bound):
                frame = decoder.next_frame()
                assert decoder.buffered_bytes <= limit
                if frame is NEED_DATA or frame is CLOSED:
                    break
                assert isinstance(frame, dict)
            else:
                raise AssertionError("next_frame() did not settle")
            if chunk == b"":
                assert frame is CLOSED
    except ProtocolError:
        # Broken for good: later calls raise too and nothing is buffered.
        decoder.feed(b"more")
        assert decoder.buffered_bytes == 0
        with pytest.raises(ProtocolError):
            decoder.next_frame()


@FUZZ
@given(payload=msgpack_maps, cuts=st.lists(st.integers(0, 2000), max_size=10))
def test_fuzz_encode_decode_round_trip(payload: dict[str, Any], cuts: list[int]) -> None:
    frame = FrameEncoder().encode(payload)
    assert int.from_bytes(frame[:4], "big") == len(frame) - 4
    decoder = FrameDecoder()
    assert decode_all(decoder, [*split_at(frame, cuts), b""]) == [payload]
    assert decoder.next_frame() is CLOSED


@FUZZ
@given(
    values=st.lists(msgpack_values, min_size=1, max_size=4),
    cuts=st.lists(st.integers(0, 4000), max_size=10),
)
def test_fuzz_results_round_trip_through_connection(values: list[Any], cuts: list[int]) -> None:
    host, worker = host_and_worker()
    sent = [Result(id=i, value=v) for i, v in enumerate(values)]
    sent.append(Item(id=99, value=values[0]))
    wire = b"".join(worker.send(m) for m in sent)
    got: list[Message] = []
    for chunk in split_at(wire, cuts):
        got.extend(host.receive_data(chunk))
    assert got == sent


@FUZZ
@given(payload=msgpack_maps, prefix=st.booleans(), data=st.data())
def test_fuzz_truncated_frame_then_eof_is_protocol_error(
    payload: dict[str, Any], prefix: bool, data: st.DataObject
) -> None:
    frame = FrameEncoder().encode(payload)
    cut = data.draw(st.integers(1, len(frame) - 1), label="cut")
    head = frame[:cut]
    if prefix:
        head = FrameEncoder().encode({"first": 1}) + head
    cuts = data.draw(st.lists(st.integers(0, len(head)), max_size=6), label="cuts")
    decoder = FrameDecoder()
    frames = decode_all(decoder, split_at(head, cuts))
    assert frames == ([{"first": 1}] if prefix else [])
    decoder.feed(b"")
    with pytest.raises(ProtocolError, match="mid-frame"):
        decoder.next_frame()


@pytest.mark.parametrize(
    "wire",
    [
        {"t": "result", "i": True, "r": 1},
        {"t": "result", "i": 1},
        {"t": "call", "i": 1, "c": "x", "a": []},
        {"t": "call", "i": 1, "c": "x", "a": {}, "o": True},
        {"t": "call", "i": 1, "c": 3, "a": {}},
    ],
)
def test_generated_decoders_validate(wire: dict[str, object]) -> None:
    with pytest.raises(ProtocolError):
        from_wire(wire)


def test_decoder_reads_a_body_that_arrives_after_its_header_alone() -> None:
    """Header in one read, body (and the next frame) in the next: no misparse.

    (The decoder splits whole frames straight out of a read when nothing is
    buffered; a read right after a lone header is the rest of that frame.)
    """
    encoder = FrameEncoder()
    first = encoder.encode({"t": "ping", "i": 1})
    second = encoder.encode({"t": "ping", "i": 2})
    decoder = FrameDecoder()
    decoder.feed(first[:4])
    decoder.feed(first[4:] + second)
    assert decoder.next_frame() == {"t": "ping", "i": 1}
    assert decoder.next_frame() == {"t": "ping", "i": 2}
    assert decoder.next_frame() is NEED_DATA


def test_decoder_hands_out_good_frames_before_the_bad_one_in_the_same_read() -> None:
    encoder = FrameEncoder()
    good = encoder.encode({"t": "ping", "i": 1})
    decoder = FrameDecoder(max_frame_bytes=64)
    decoder.feed(good + good + (1000).to_bytes(4, "big") + b"x" * 10)
    assert decoder.next_frame() == {"t": "ping", "i": 1}
    assert decoder.next_frame() == {"t": "ping", "i": 1}
    with pytest.raises(ProtocolError, match="over max_frame_bytes"):
        decoder.next_frame()
    with pytest.raises(ProtocolError):  # broken stays broken
        decoder.next_frame()


# --- the fork server's control protocol ------------------------------------------

TEMPLATE_HOST_SAMPLES: list[Message] = [
    TemplateInit(preload=["numpy"], sys_path=["/opt/app"], cwd="/srv"),
    TemplateInit(preload=[], sys_path=[]),
    Spawn(id=1, env={"A": "b"}),
    Spawn(id=2, env={}, argv=["python", "-m", "snakepool.workers"], cwd=None),
]
TEMPLATE_SAMPLES: list[Message] = [
    Importing(module="numpy"),
    Ready(pid=10, modules=["numpy"], import_seconds=0.25),
    Unsafe(reason="threads"),
    ImportFailed(module="x", type="ImportError", message="no x", traceback="tb"),
    Spawned(id=1, pid=11),
    SpawnFailed(id=2, message="fork failed"),
    Exited(pid=11, code=-9),
]


@pytest.mark.parametrize("chunker", CHUNKERS.values(), ids=CHUNKERS.keys())
def test_template_messages_round_trip(chunker: Chunker) -> None:
    host, template = TemplateConnection(Role.HOST), TemplateConnection(Role.WORKER)
    to_template = b"".join(host.send(m) for m in TEMPLATE_HOST_SAMPLES)
    to_host = b"".join(template.send(m) for m in TEMPLATE_SAMPLES)
    got = [m for chunk in chunker(to_template) for m in template.receive_data(chunk)]
    assert got == TEMPLATE_HOST_SAMPLES
    got = [m for chunk in chunker(to_host) for m in host.receive_data(chunk)]
    assert got == TEMPLATE_SAMPLES
    assert host.receive_data(b"") == []


def test_template_messages_name_themselves_in_op() -> None:
    frame = TemplateConnection(Role.HOST).send(Spawn(id=3, env={"K": "v"}))
    assert msgpack.unpackb(frame[HEADER_BYTES:]) == {
        "op": "spawn",
        "id": 3,
        "env": {"K": "v"},
        "argv": None,
        "cwd": None,
    }


def test_template_connection_checks_direction_and_fields() -> None:
    with pytest.raises(ProtocolError, match="may not send"):
        TemplateConnection(Role.HOST).send(Ready(pid=1, modules=[], import_seconds=0.0))
    host = TemplateConnection(Role.HOST)
    good = TemplateConnection(Role.WORKER).send(Importing(module="m"))
    with pytest.raises(ReceiveError, match="unexpected message 'spawn'") as info:
        host.receive_data(good + frame_map({"op": "spawn", "id": 1, "env": {}}))
    assert info.value.received == [Importing(module="m")]
    with pytest.raises(ProtocolError):  # broken for good
        host.receive_data(good)
    with pytest.raises(ProtocolError, match="field 'pid' is str"):
        TemplateConnection(Role.HOST).receive_data(
            frame_map({"op": "exited", "pid": "1", "code": 0})
        )


def test_the_save_state_tool_name_is_reserved() -> None:
    assert SAVE_STATE_TOOL.startswith(RESERVED_TOOL_PREFIX)
