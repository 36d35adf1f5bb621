"""Hardening (issue 14), sans-IO: extension types are refused on every decoder,
and a decoder for a peer trusted with nothing measures a frame before decoding it.

No event loop, no subprocess: bytes in, maps or ``ProtocolError`` out, fed one
byte at a time where that matters.
"""

from __future__ import annotations

import tracemalloc
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from snakepool.errors import ProtocolError
from snakepool.protocol import (
    HEADER_BYTES,
    NEED_DATA,
    PROTOCOL_VERSION,
    Connection,
    FrameDecoder,
    Hello,
    Init,
    Role,
)
from snakepool.protocol._framing import DECODE_FLOOR_BYTES
from snakepool.protocol._measure import MAX_DEPTH, WORST_RATIO, decode_cost, measure

FACTOR = 32
CLIENT_TYPES = ("hello", "call", "cancel", "status", "session")


def frame_of(body: bytes) -> bytes:
    return len(body).to_bytes(HEADER_BYTES, "big") + body


def pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def one_byte_at_a_time(data: bytes) -> Iterator[bytes]:
    for i in range(len(data)):
        yield data[i : i + 1]


def client_decoder(factor: int = FACTOR) -> FrameDecoder:
    return FrameDecoder(2**31, decode_factor=factor, message_types=CLIENT_TYPES)


def next_frame_peak(decoder: FrameDecoder, data: bytes) -> tuple[Any, int]:
    """Feed ``data`` whole and take one frame (or the error) under tracemalloc: (result, peak)."""
    decoder.feed(data)
    tracemalloc.start()
    try:
        try:
            result: Any = decoder.next_frame()
        except ProtocolError as exc:
            result = exc
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def warm_up(data: bytes) -> Any:
    """``data`` decoded once, untraced, for the caller to keep while it measures.

    Decoding str map keys interns them, and the interpreter's table of interned
    strings (every one in the process) may have to grow for that: a one-off
    cost of the whole process, not of this frame, and it makes measurements
    jump. With the keys already interned, the measured decode shares them."""
    return msgpack.unpackb(data[HEADER_BYTES:], raw=False, strict_map_key=False)


# --- extension types ----------------------------------------------------------------------

EXTENSIONS = {
    "fixext1 code 5": (pack(msgpack.ExtType(5, b"x")), "5"),
    "fixext16 code 127": (pack(msgpack.ExtType(127, b"x" * 16)), "127"),
    "ext8 code 0": (pack(msgpack.ExtType(0, b"abc")), "0"),
    "ext16 code 42": (pack(msgpack.ExtType(42, b"x" * 300)), "42"),
    "ext32 code 1": (pack(msgpack.ExtType(1, b"x" * 70_000)), "1"),
    "negative code -128": (b"\xd4\x80\x00", "-128"),
    "timestamp32": (pack(msgpack.Timestamp(1, 0)), r"-1 \(timestamp\)"),
    "timestamp96": (pack(msgpack.Timestamp(2**40, 5)), r"-1 \(timestamp\)"),
}


def with_extension(body: bytes) -> bytes:
    """A result frame whose value is a list holding the extension value ``body``."""
    return frame_of(b"\x83\xa1t\xa6result\xa1i\x01\xa1r\x92\x07" + body)


@pytest.mark.parametrize("ext", EXTENSIONS.values(), ids=list(EXTENSIONS))
@pytest.mark.parametrize("trusted", [True, False], ids=["trusted", "client"])
def test_extension_types_are_refused_naming_their_code(
    ext: tuple[bytes, str], trusted: bool
) -> None:
    body, code = ext
    decoder = FrameDecoder() if trusted else client_decoder()
    frame = with_extension(body).replace(b"result", b"status")  # a client type, same length
    for byte in one_byte_at_a_time(frame):
        decoder.feed(byte)
        if decoder.missing_bytes or decoder.buffered_bytes < len(frame) - HEADER_BYTES:
            assert decoder.next_frame() is NEED_DATA
    with pytest.raises(ProtocolError, match=rf"MessagePack extension type {code} is not supported"):
        decoder.next_frame()
    with pytest.raises(ProtocolError, match="extension type"):  # and it stays broken
        decoder.next_frame()


#: The worker protocol decodes the types it defines (timestamps, 1-4: see
#: protocol/_values.py and tests/test_values.py); every other code is refused.
UNDEFINED = {
    name: ext for name, ext in EXTENSIONS.items() if ext[1] not in ("1",) and "-1" not in ext[1]
}


@pytest.mark.parametrize("ext", UNDEFINED.values(), ids=list(UNDEFINED))
def test_a_worker_frame_with_an_extension_type_is_a_protocol_error(ext: tuple[bytes, str]) -> None:
    body, code = ext
    host = Connection(Role.HOST)
    worker = Connection(Role.WORKER)
    worker.receive_data(
        host.send(Init(version=PROTOCOL_VERSION, worker_id=0, pool="p", adapter="a"))
    )
    (hello,) = host.receive_data(
        worker.send(Hello(version=PROTOCOL_VERSION, pid=1, worker_id=0, adapter="a", commands=[]))
    )
    assert isinstance(hello, Hello)
    # The connection refuses it, naming the type code.
    with pytest.raises(ProtocolError, match=rf"extension type {code} is not supported"):
        host.receive_data(with_extension(body))


def test_frames_without_extensions_still_decode_on_every_path() -> None:
    payload = {"t": "call", "i": 1, "a": [1, -20, 2.5, "é", b"\x00\xc7", {"k": [None, True]}]}
    frame = frame_of(pack(payload))
    assert FrameDecoder().whole_frames(frame * 3) == [payload] * 3
    for decoder in (FrameDecoder(), client_decoder()):
        for byte in one_byte_at_a_time(frame):
            decoder.feed(byte)
        assert decoder.next_frame() == payload


# --- the decode budget --------------------------------------------------------------------


def test_a_list_of_a_million_empty_maps_is_refused_before_it_is_decoded() -> None:
    # The report: 4 MiB of {} took the server to 332 MB. In a map (a valid frame
    # shape) it is measured and refused with nothing decoded.
    frame = frame_of(pack({"t": "call", "i": 1, "a": {"x": [{}] * 1_000_000}}))
    result, peak = next_frame_peak(client_decoder(), frame)
    assert isinstance(result, ProtocolError)
    assert "would decode into more than" in str(result)
    assert "refused before decoding it" in str(result)
    # Measuring copies the body once; decoding it would have taken 73 times its size.
    assert peak < 3 * len(frame), peak


def test_a_top_level_list_is_refused_from_its_first_byte() -> None:
    frame = frame_of(pack([{}] * 1_000_000))
    result, peak = next_frame_peak(client_decoder(), frame)
    assert isinstance(result, ProtocolError)
    assert "frame holds a list, not a map" in str(result)
    assert peak < 3 * len(frame), peak


def test_a_frame_of_an_unknown_type_is_refused_before_it_is_decoded() -> None:
    # Within the budget (a generous factor), but not a client message: not decoded.
    frame = frame_of(pack({"x": [{}] * 100_000, "t": "bogus"}))
    result, peak = next_frame_peak(client_decoder(factor=1000), frame)
    assert isinstance(result, ProtocolError)
    assert "unknown message type 'bogus'" in str(result)
    assert peak < 3 * len(frame), peak
    small = client_decoder()  # a small frame: decoded, then its type checked
    small.feed(frame_of(pack({"t": "bogus"})))
    with pytest.raises(ProtocolError, match="unknown message type 'bogus'"):
        small.next_frame()


HOSTILE = {
    "empty maps": [{}] * 100_000,
    "empty lists": [[]] * 100_000,
    "one-entry maps": [{0: None}] * 50_000,
    "nested singletons": [[[[0]]]] * 30_000,
    "small negative ints": [-20] * 1_000_000,
    "maps of distinct short keys": [{f"{i:04x}": 0} for i in range(65536)],
}
ORDINARY = {
    "records": [{"id": 1000 + i, "v": 2.5, "name": f"n{i}"} for i in range(10_000)],
    "floats": [i / 7 for i in range(40_000)],
    "token ids": list(range(1000, 60_000)),
    "country codes": ["US", "FR", "DE"] * 20_000,
    "text": ["lorem ipsum dolor sit amet " * 40] * 100,
    "bytes": [bytes(range(256)) * 64] * 10,
    "booleans": [True, False] * 40_000,
    "word counts": {f"word{i}": i for i in range(10_000)},
    "emoji text": ["a" * 200 + "😀"] * 400,
}


@pytest.mark.parametrize("value", HOSTILE.values(), ids=list(HOSTILE))
def test_hostile_shapes_are_refused_and_cost_little(value: Any) -> None:
    frame = frame_of(pack({"t": "call", "i": 1, "a": {"x": value}}))
    result, peak = next_frame_peak(client_decoder(), frame)
    assert isinstance(result, ProtocolError), "a hostile shape was decoded"
    assert "would decode into more than" in str(result)
    assert peak < 3 * len(frame) + 2**16, peak


@pytest.mark.parametrize("value", ORDINARY.values(), ids=list(ORDINARY))
def test_ordinary_data_passes_and_stays_within_the_budget(value: Any) -> None:
    payload = {"t": "call", "i": 1, "a": {"x": value}}
    frame = frame_of(pack(payload))
    held = warm_up(frame)
    result, peak = next_frame_peak(client_decoder(), frame)
    del held
    assert result == payload
    assert peak <= FACTOR * len(frame) + DECODE_FLOOR_BYTES


MODEL_CASES = {**HOSTILE, **ORDINARY, "mixed": [1, -1, -6, 300, -300, 2**40, -(2**40), 2**64 - 1]}


#: Cases whose str map keys the measured decode shares with the warm-up's (see
#: ``warm_up``): the model charges them, the measurement cannot see them.
SHARED_KEYS = {"records", "word counts", "maps of distinct short keys"}


@pytest.mark.parametrize(("name", "value"), MODEL_CASES.items(), ids=list(MODEL_CASES))
def test_the_measured_cost_bounds_what_decoding_takes(name: str, value: Any) -> None:
    """The model is an upper bound of the real thing (tracemalloc), and not a loose one."""
    body = pack({"t": "call", "a": value})
    held = warm_up(frame_of(body))
    tracemalloc.start()
    try:
        decoded = msgpack.unpackb(body, raw=False, strict_map_key=False)
        actual = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    del decoded, held
    model = decode_cost(body)
    assert actual <= model, (actual, model)
    if name not in SHARED_KEYS:
        # (tracemalloc counts what was asked for, not the allocator's rounding,
        # and the model counts the body's bytes once: at most twice as much)
        assert model <= 2 * actual + 2**16, (actual, model)
    measure(body, 0, len(body), model)
    with pytest.raises(ProtocolError, match="would decode into more than"):
        measure(body, 0, len(body), model - 1)


def test_small_frames_are_decoded_unmeasured_within_the_floor() -> None:
    # The worst byte for byte (one-entry maps), just under the size that is measured.
    unmeasured = DECODE_FLOOR_BYTES // WORST_RATIO
    n = (unmeasured - 32) // 3
    frame = frame_of(pack({"t": "call", "a": [{0: None}] * n}))
    assert len(frame) - HEADER_BYTES <= unmeasured
    result, peak = next_frame_peak(client_decoder(factor=1), frame)
    assert isinstance(result, dict)
    assert peak <= DECODE_FLOOR_BYTES


def test_the_budget_applies_to_frames_fed_one_byte_at_a_time() -> None:
    decoder = client_decoder()
    good = frame_of(pack({"t": "status", "i": 1, "pad": "x" * 20_000}))
    bad = frame_of(pack({"t": "call", "i": 2, "a": [{}] * 100_000}))
    for byte in one_byte_at_a_time(good + bad):
        decoder.feed(byte)
    assert decoder.next_frame() == {"t": "status", "i": 1, "pad": "x" * 20_000}
    with pytest.raises(ProtocolError, match="would decode into more than"):
        decoder.next_frame()


def test_a_budgeted_decoder_takes_only_small_frames_through_its_shortcut() -> None:
    small = frame_of(pack({"t": "status", "i": 1}))
    big = frame_of(pack({"t": "status", "i": 2, "pad": [0] * 20_000}))
    decoder = client_decoder()
    assert decoder.whole_frames(small * 2) == [{"t": "status", "i": 1}] * 2
    assert decoder.whole_frames(small + big) is None  # measured on the buffered path instead
    assert decoder.whole_frames(frame_of(pack({"t": "bogus"}))) is None
    assert FrameDecoder().whole_frames(small + big) is not None  # (a trusted one takes both)
    with_limit = decoder.with_limit(2**20)
    assert (with_limit.decode_factor, with_limit.message_types) == (FACTOR, CLIENT_TYPES)


def test_measure_refuses_nesting_deeper_than_msgpack_does() -> None:
    def nested(depth: int) -> bytes:
        return b"\x81\xa1a" + b"\x91" * (depth - 1) + b"\xc0"

    assert measure(nested(MAX_DEPTH), 0, len(nested(MAX_DEPTH)), None) is None
    msgpack.unpackb(nested(MAX_DEPTH))
    too_deep = nested(MAX_DEPTH + 1)
    with pytest.raises(ProtocolError, match="deeper than 1024"):
        measure(too_deep, 0, len(too_deep), None)
    with pytest.raises(msgpack.StackError):
        msgpack.unpackb(too_deep)


@pytest.mark.parametrize("factor", [None, 32])
def test_a_frame_nested_too_deep_is_refused_naming_the_nesting(factor: int | None) -> None:
    """Small frames are decoded unmeasured: msgpack's own refusal (a StackError
    with no message) is named like the measured one."""
    too_deep = b"\x81\xa1a" + b"\x91" * MAX_DEPTH + b"\xc0"
    decoder = FrameDecoder(decode_factor=factor)
    for byte in frame_of(too_deep):  # (one byte at a time: the buffered path)
        decoder.feed(bytes([byte]))
    with pytest.raises(ProtocolError, match=r"^frame nests deeper than 1024 levels$"):
        decoder.next_frame()


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"\x82\xa1a\x01", "cannot fit"),
        (b"\x83\xa1a\x01\xa1b\x02", "ends inside a value"),
        (b"\xdf\xff\xff\xff\xff", "cannot fit"),
        (b"\x81\xa1a\xc6\xff\xff\xff\xff", "runs past the end"),
        (b"\x81\xa1a\x01\x81\xa1b\x02", "extra data after the map"),
        (b"\x81\xa1t\xa2\xff\xfe", "not UTF-8"),
        (b"\x81\xa1a\xc1", "0xc1"),
        (b"\x81\xa1a\xcb\x00\x00", "ends inside a value"),
        (b"\x81\xa1a\x9a" + b"\xcb" + b"\x00" * 8 * 2, "ends inside a value"),
    ],
)
def test_measure_refuses_malformed_bodies(body: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        measure(body, 0, len(body), None)


# --- measure agrees with msgpack --------------------------------------------------------------

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
leaves = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=40)
)
values = st.recursive(
    leaves,
    lambda children: (
        st.lists(children, max_size=20)
        | st.dictionaries(st.text(max_size=4) | st.integers(-40, 300), children, max_size=6)
    ),
    max_leaves=60,
)


@FUZZ
@given(payload=st.dictionaries(st.text(max_size=3), values, max_size=5), tag=st.text(max_size=8))
def test_fuzz_measure_passes_every_valid_map_and_reads_its_type(
    payload: dict[str, Any], tag: str
) -> None:
    payload["t"] = tag
    body = pack(payload)
    assert measure(body, 0, len(body), None) == tag
    framed = b"junk" + body + b"more"  # a slice of a larger buffer
    assert measure(framed, 4, 4 + len(body), None) == tag


@FUZZ
@given(body=st.binary(min_size=1, max_size=64))
def test_fuzz_measure_passes_only_what_msgpack_decodes_to_a_map(body: bytes) -> None:
    try:
        measure(body, 0, len(body), None)
    except ProtocolError:
        return
    decoded = msgpack.unpackb(body, raw=False, strict_map_key=False, max_ext_len=0)
    assert isinstance(decoded, dict)


def test_whole_frame_bytes_says_when_a_big_frame_is_in_whole() -> None:
    first = frame_of(pack({"t": "status", "i": 1}))
    big_body = pack({"t": "call", "i": 2, "pad": "x" * 20_000})  # measured: not decoded at feed
    big = frame_of(big_body)
    decoder = client_decoder()
    assert decoder.whole_frame_bytes == 0
    decoder.feed(big[:10])  # the header is in, not the body
    assert decoder.whole_frame_bytes == 0
    decoder.feed(big[10:])
    assert decoder.whole_frame_bytes == len(big_body)
    assert decoder.next_frame()["i"] == 2
    assert decoder.whole_frame_bytes == 0
    decoder.feed(first + big)  # a small frame is ready first: it comes out first
    assert decoder.whole_frame_bytes == 0
    assert decoder.next_frame()["i"] == 1
    assert decoder.whole_frame_bytes == len(big_body)
