"""Values beyond MessagePack's own on the worker protocol (issue 25): datetimes,
numpy arrays and registered user types, both ways; the socket server refuses them."""

from __future__ import annotations

import datetime as dt
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import msgpack
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import snakepool
from snakepool import ProtocolError, WorkerCrashed
from snakepool.protocol import (
    PROTOCOL_VERSION,
    Call,
    Connection,
    FrameDecoder,
    FrameEncoder,
    Hello,
    Init,
    Result,
    Role,
    _values,
)
from snakepool.server import SocketServer
from sp_values import POINT_CODE, Point

ADAPTER = "sp_values:Values"

pytestmark = pytest.mark.anyio


def connected() -> tuple[Connection, Connection]:
    """A host and a worker connection past the handshake."""
    host, worker = Connection(Role.HOST), Connection(Role.WORKER)
    worker.receive_data(
        host.send(Init(version=PROTOCOL_VERSION, worker_id=0, pool="p", adapter="a"))
    )
    host.receive_data(
        worker.send(Hello(version=PROTOCOL_VERSION, pid=1, worker_id=0, adapter="a", commands=[]))
    )
    return host, worker


def round_trip(value: Any) -> tuple[Any, Any]:
    """``value`` as a worker receives it in a call's arguments, and as the host
    receives it in a result."""
    host, worker = connected()
    (call,) = worker.receive_data(host.send(Call(id=1, command="c", args={"v": value})))
    (result,) = host.receive_data(worker.send(Result(id=1, value=value)))
    assert isinstance(call, Call) and isinstance(result, Result)
    return call.args["v"], result.value


# --- datetimes ------------------------------------------------------------------------------

offsets = st.timedeltas(
    min_value=dt.timedelta(hours=-23, minutes=-59), max_value=dt.timedelta(hours=23, minutes=59)
)
zones = st.one_of(st.none(), st.just(dt.UTC), offsets.map(dt.timezone))


@given(st.datetimes(timezones=zones, allow_imaginary=False), st.booleans())
def test_datetimes_keep_their_instant_offset_and_fields(value: dt.datetime, fold: bool) -> None:
    value = value.replace(fold=int(fold))
    for received in round_trip(value):
        assert type(received) is dt.datetime
        assert received == value
        assert received.replace(tzinfo=None) == value.replace(tzinfo=None)  # same wall clock
        assert received.utcoffset() == value.utcoffset()
        assert received.fold == (value.fold if value.utcoffset() != dt.timedelta(0) else 0)


@given(st.dates(), st.timedeltas())
def test_dates_and_timedeltas_round_trip(date: dt.date, delta: dt.timedelta) -> None:
    for received in round_trip({"d": date, "t": [delta]}):
        assert received == {"d": date, "t": [delta]}
        assert type(received["d"]) is dt.date and type(received["t"][0]) is dt.timedelta


def test_a_utc_datetime_travels_as_a_messagepack_timestamp() -> None:
    """Where it fits (offset 0), MessagePack's own Timestamp (type -1) that
    any MessagePack peer reads; other datetimes use snakepool's type 1."""
    when = dt.datetime(1969, 12, 31, 23, 59, 59, 500_001, tzinfo=dt.UTC)
    frame = FrameEncoder(default=_values.default).encode({"v": when})
    assert msgpack.unpackb(frame[4:], timestamp=3) == {"v": when}
    naive = FrameEncoder(default=_values.default).encode({"v": when.replace(tzinfo=None)})
    ext = msgpack.unpackb(naive[4:])["v"]
    assert isinstance(ext, msgpack.ExtType) and ext.code == _values.DATETIME_CODE


def test_a_zone_arrives_as_its_fixed_offset() -> None:
    zoneinfo = pytest.importorskip("zoneinfo")
    try:
        paris = zoneinfo.ZoneInfo("Europe/Paris")
    except zoneinfo.ZoneInfoNotFoundError:
        pytest.skip("no time zone database")
    when = dt.datetime(2024, 7, 1, 12, 0, tzinfo=paris)
    _, received = round_trip(when)
    assert received == when and received.tzinfo == dt.timezone(dt.timedelta(hours=2))


# --- numpy -----------------------------------------------------------------------------------

ARRAYS = {
    "float32 2-D": np.arange(12, dtype=np.float32).reshape(3, 4),
    "int64 1-D": np.arange(-5, 5),
    "big-endian int32": np.arange(6, dtype=">i4"),
    "fortran order": np.asfortranarray(np.arange(24, dtype=np.float64).reshape(2, 3, 4)),
    "strided view": np.arange(20)[::3],
    "0-d": np.array(2.5),
    "empty": np.zeros((0, 3), dtype=np.int16),
    "bool": np.array([True, False, True]),
    "complex": np.array([1 + 2j, -3j], dtype=np.complex64),
    "float16": np.array([0.5, -1.0], dtype=np.float16),
    "unicode": np.array(["a", "bcd"]),
    "bytes": np.array([b"x", b"yz"]),
    "datetime64": np.array(["2024-01-01", "1969-07-20"], dtype="datetime64[D]"),
    "timedelta64": np.array([1, -2], dtype="timedelta64[ms]"),
    "structured": np.array(
        [(1, (2.0, 3.0)), (4, (5.0, 6.0))], dtype=[("a", "<i4"), ("b", "<f8", (2,))]
    ),
}


@pytest.mark.parametrize("array", ARRAYS.values(), ids=list(ARRAYS))
def test_arrays_keep_dtype_shape_and_values(array: np.ndarray) -> None:
    for received in round_trip(array):
        assert type(received) is np.ndarray
        assert received.dtype == array.dtype and received.shape == array.shape
        assert np.array_equal(received, array)
        assert not received.flags.writeable  # a view of the received bytes...
        assert received.flags.c_contiguous or received.flags.f_contiguous
    if array.ndim > 1 and array.flags.f_contiguous and not array.flags.c_contiguous:
        assert received.flags.f_contiguous  # (its memory order kept: no transpose copy)


def test_a_received_array_is_a_view_of_the_frame_bytes_not_a_copy() -> None:
    array = np.arange(1 << 16, dtype=np.float32)
    _, received = round_trip(array)
    owner = received
    while isinstance(owner, np.ndarray):  # (views of views: reshape, transpose)
        assert not owner.flags.owndata
        owner = owner.base
    assert isinstance(owner, bytes)  # the extension value's bytes, as msgpack made them
    assert received.ctypes.data % 16 == 0  # aligned: numpy's fast paths apply
    writable = received.copy()
    writable += 1
    assert writable[1] == 2.0


@pytest.mark.parametrize(
    "scalar", [np.int64(-3), np.float32(1.5), np.bool_(True), np.complex128(1j), np.uint8(255)]
)
def test_numpy_scalars_arrive_as_numpy_scalars(scalar: np.generic) -> None:
    for received in round_trip(scalar):
        assert type(received) is type(scalar) and received == scalar


def test_object_arrays_are_refused_with_the_fix() -> None:
    host, _ = connected()
    with pytest.raises(TypeError, match=r"dtype object .*arr\.tolist\(\)"):
        host.send(Call(id=1, command="c", args={"v": np.array([object()])}))


# --- registered types ------------------------------------------------------------------------


def test_a_registered_type_round_trips_subclasses_included() -> None:
    class Sub(Point):
        pass

    assert round_trip([Point(1, 2), Sub(3, 4)]) == ([Point(1, 2), Point(3, 4)],) * 2


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        ((Point, 4), ValueError, "from 32 to 127"),
        ((Point, 128), ValueError, "from 32 to 127"),
        ((Point, "40"), ValueError, "from 32 to 127"),
        ((dict, POINT_CODE), ValueError, "already registered for <class 'sp_values.Point'>"),
        ((dt.date, 50), ValueError, "snakepool's own type"),
        ((Point(1, 2), 50), TypeError, "must be a class"),
    ],
)
def test_bad_registrations_say_what_is_wrong(
    args: tuple[Any, int], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        snakepool.register_value_type(*args, encode=bytes, decode=bytes)


def test_an_encoder_that_returns_no_bytes_is_refused_before_sending() -> None:
    class Odd:
        pass

    snakepool.register_value_type(Odd, 99, lambda odd: "text", lambda data: Odd())
    host, _ = connected()
    with pytest.raises(TypeError, match="returned str, not bytes"):
        host.send(Call(id=1, command="c", args={"v": Odd()}))


# --- refused: unknown codes, bad payloads, every other decoder --------------------------------


def result_with(code: int, data: bytes) -> bytes:
    """A result frame holding one extension value (ext 8: any code, negative ones included)."""
    ext = b"\xc7" + bytes([len(data), code & 0xFF]) + data
    body = b"\x83\xa1t\xa6result\xa1i\x01\xa1r\x91" + ext
    return len(body).to_bytes(4, "big") + body


@pytest.mark.parametrize("code", [0, 5, 31, 77, -5, -128])
def test_unknown_codes_are_refused_naming_them(code: int) -> None:
    host, _ = connected()
    with pytest.raises(ProtocolError, match=rf"extension type {code} is not supported here"):
        host.receive_data(result_with(code, b"x"))


@pytest.mark.parametrize(
    ("code", "data", "name"),
    [
        (_values.DATETIME_CODE, b"\x00" * 20, "datetime"),  # month 0
        (_values.DATETIME_CODE, b"\x07", "datetime"),
        (_values.DATE_CODE, b"\x07\xe8\x0d\x01", "date"),  # month 13
        (_values.TIMEDELTA_CODE, b"\x00" * 11, "timedelta"),
        (_values.ARRAY_CODE, b"\x00\x00\x02\x92\xa3<f4\x91\x05", "numpy array"),  # no data
        (_values.ARRAY_CODE, b"\x00\xff\xff", "numpy array"),
        (_values.ARRAY_CODE, b"\x00\x00\x03\x92\xa3|O8\x90", "numpy array"),  # objects
        (_values.ARRAY_CODE, b"\x80\x00\x00", "numpy array"),  # unknown flags
        (POINT_CODE, b"\x01", "sp_values.Point"),
    ],
)
def test_bad_payloads_are_protocol_errors_naming_the_type(
    code: int, data: bytes, name: str
) -> None:
    host, _ = connected()
    with pytest.raises(
        ProtocolError, match=rf"bad {name} value \(MessagePack extension type {code}\)"
    ):
        host.receive_data(result_with(code, data))


def test_other_decoders_and_encoders_still_refuse_extension_types() -> None:
    """The socket server's codec (and the fork server's) has no hooks."""
    with pytest.raises(TypeError, match=r"can not serialize 'datetime\.datetime'"):
        FrameEncoder().encode({"v": dt.datetime(2024, 1, 1)})
    decoder = FrameDecoder()
    decoder.feed(result_with(_values.DATE_CODE, b"\x07\xe8\x01\x01"))
    with pytest.raises(ProtocolError, match="extension type 2 is not supported"):
        decoder.next_frame()


# --- through real workers --------------------------------------------------------------------


async def test_workers_receive_and_return_typed_values() -> None:
    when = dt.datetime(2024, 5, 17, 9, 30, tzinfo=dt.timezone(dt.timedelta(hours=-4)))
    matrix = np.arange(6, dtype=np.float32).reshape(2, 3)
    async with snakepool.Pool(ADAPTER, size=1) as pool:
        seen = await pool.call(
            "describe_value",
            {"value": [when, dt.date(2024, 5, 17), dt.timedelta(hours=1), matrix, Point(1, 2)]},
        )
        assert seen == [
            {"type": "datetime.datetime", "utcoffset": dt.timedelta(hours=-4)},
            {"type": "datetime.date"},
            {"type": "datetime.timedelta"},
            {
                "type": "numpy.ndarray",
                "dtype": "float32",
                "shape": [2, 3],
                "writeable": False,
                "fortran": False,
            },
            {"type": "sp_values.Point"},
        ]
        later = await pool.call("later", {"when": when, "by": dt.timedelta(days=1)})
        assert later == when + dt.timedelta(days=1) and later.utcoffset() == when.utcoffset()
        scaled = await pool.call("scaled", {"array": matrix, "factor": 2.0})
        assert scaled.dtype == np.float32 and np.array_equal(scaled, matrix * 2)
        assert await pool.call("moved", {"point": Point(1, 2), "dx": 1.5}) == Point(2.5, 2)


class HostOnly:
    """Registered in this process only: no worker can decode it."""


async def test_a_type_the_worker_does_not_know_fails_that_call_clearly() -> None:
    snakepool.register_value_type(HostOnly, 100, lambda value: b"", lambda data: HostOnly())
    async with snakepool.Pool(ADAPTER, size=1) as pool:
        with pytest.raises(WorkerCrashed, match="extension type 100 is not supported here"):
            await pool.call("echo", {"value": HostOnly()})
        assert await pool.call("echo", {"value": dt.date(2024, 1, 1)}) == dt.date(2024, 1, 1)


@pytest.fixture
def socket_path() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="sp-"))  # (a short path: Unix sockets need one)
    yield directory / "s.sock"
    shutil.rmtree(directory, ignore_errors=True)


async def test_the_socket_server_refuses_them_clearly(socket_path: Path) -> None:
    """Socket clients may be written in any language: only plain MessagePack."""
    async with snakepool.Pool(ADAPTER, size=1, name="general") as pool:
        server = SocketServer({"general": pool}, socket_path=socket_path)
        async with anyio.create_task_group() as tg:
            await tg.start(server.serve)
            async with snakepool.connect(socket_path) as client:
                general = client["general"]
                with pytest.raises(TypeError, match=r"can not serialize 'datetime\.date'"):
                    await general.call("echo", {"value": dt.date(2024, 1, 1)})
                with pytest.raises(
                    TypeError, match=r"cannot be sent.*can not serialize 'datetime\.datetime'"
                ):
                    await general.call("epoch")
                assert await general.call("echo", {"value": [1, "two"]}) == [1, "two"]
            tg.cancel_scope.cancel()
