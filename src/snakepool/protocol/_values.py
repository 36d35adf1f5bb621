"""Values beyond plain MessagePack on the worker protocol: MessagePack extension types.

Pure functions, no I/O. :func:`default` is the packer's ``default=`` hook
(called only for values MessagePack cannot pack itself) and :func:`ext_hook`
the unpacker's ``ext_hook=`` (called only for extension values), so frames
without such values cost nothing more. Only the host<->worker
:class:`._connection.Connection` uses them; every other decoder (the socket
server's among them) still refuses every extension type.

=========  ===============================================  ===========================
code       Python value                                     payload
=========  ===============================================  ===========================
-1         ``datetime`` with a UTC offset of 0              MessagePack Timestamp
1          any other ``datetime`` (naive or fixed offset)   20 bytes, see ``_DATETIME``
2          ``date``                                         4 bytes: year, month, day
3          ``timedelta``                                    12 bytes: days, s, us
4          ``numpy.ndarray`` and numpy scalars              header + raw array bytes
0, 5-31    reserved for snakepool
32-127     yours: :func:`register_value_type`
=========  ===============================================  ===========================

An aware datetime arrives with a fixed-offset ``timezone`` (``timezone.utc``
for offset 0): its UTC offset and instant are kept, a zone's name and rules
(``zoneinfo``) are not. A numpy array arrives with its dtype, shape and
memory order, as a read-only view of the received bytes (no copy); call
``.copy()`` for a writable one. A numpy scalar (``np.int64(3)``) arrives as
a numpy scalar of its dtype; ``np.float64`` is a ``float`` and travels as one.
Arrays of Python objects (``dtype=object``) are refused: MessagePack them
yourself (``arr.tolist()``).
"""

from __future__ import annotations

import datetime as _dt
import importlib
import struct
import sys
import threading
from collections.abc import Callable
from typing import Any, Final, TypeVar

import msgpack

from ..errors import ProtocolError

__all__ = [
    "ARRAY_CODE",
    "DATETIME_CODE",
    "DATE_CODE",
    "TIMEDELTA_CODE",
    "USER_CODES",
    "default",
    "ext_hook",
    "register_value_type",
]

DATETIME_CODE: Final = 1
DATE_CODE: Final = 2
TIMEDELTA_CODE: Final = 3
ARRAY_CODE: Final = 4
#: The extension type codes users may register.
USER_CODES: Final = range(32, 128)

_UTC: Final = _dt.UTC
_EPOCH: Final = _dt.datetime(1970, 1, 1, tzinfo=_UTC)
_ZERO: Final = _dt.timedelta(0)
#: year, month, day, hour, minute, second, microsecond, flags, UTC offset (us).
_DATETIME: Final = struct.Struct(">HBBBBBIBq")
_FOLD: Final = 1
_AWARE: Final = 2
_DATE: Final = struct.Struct(">HBB")
_TIMEDELTA: Final = struct.Struct(">iII")
#: An array payload: flags, header length, then the header (MessagePack
#: ``[dtype, shape]``), zero padding, and the raw bytes from an offset that is
#: a multiple of ``_ALIGN`` (so the view the receiver makes is aligned).
_ARRAY_PREFIX: Final = struct.Struct(">BH")
_SCALAR: Final = 1
_FORTRAN: Final = 2
_ALIGN: Final = 16

T = TypeVar("T")


def _encode_datetime(value: _dt.datetime) -> msgpack.ExtType | msgpack.Timestamp:
    offset = value.utcoffset()
    if offset == _ZERO:  # (where it fits: MessagePack's own type, which other peers know)
        delta = value - _EPOCH
        return msgpack.Timestamp(delta.days * 86_400 + delta.seconds, delta.microseconds * 1000)
    flags = (_FOLD if value.fold else 0) | (_AWARE if offset is not None else 0)
    micros = 0 if offset is None else offset // _dt.timedelta(microseconds=1)
    packed = _DATETIME.pack(
        value.year,
        value.month,
        value.day,
        value.hour,
        value.minute,
        value.second,
        value.microsecond,
        flags,
        micros,
    )
    return msgpack.ExtType(DATETIME_CODE, packed)


def _decode_datetime(data: bytes) -> _dt.datetime:
    year, month, day, hour, minute, second, micro, flags, offset = _DATETIME.unpack(data)
    if flags & ~(_FOLD | _AWARE):
        raise ValueError(f"unknown flags {flags:#x}")
    tz = _dt.timezone(_dt.timedelta(microseconds=offset)) if flags & _AWARE else None
    fold = flags & _FOLD
    return _dt.datetime(year, month, day, hour, minute, second, micro, tz, fold=fold)


def _encode_date(value: _dt.date) -> msgpack.ExtType:
    return msgpack.ExtType(DATE_CODE, _DATE.pack(value.year, value.month, value.day))


def _decode_date(data: bytes) -> _dt.date:
    return _dt.date(*_DATE.unpack(data))


def _encode_timedelta(value: _dt.timedelta) -> msgpack.ExtType:
    packed = _TIMEDELTA.pack(value.days, value.seconds, value.microseconds)
    return msgpack.ExtType(TIMEDELTA_CODE, packed)


def _decode_timedelta(data: bytes) -> _dt.timedelta:
    days, seconds, micros = _TIMEDELTA.unpack(data)
    return _dt.timedelta(days=days, seconds=seconds, microseconds=micros)


# --- numpy (imported only by the side that has an array to send or receive) ---------------


def _encode_array(value: Any, np: Any) -> msgpack.ExtType:
    scalar = isinstance(value, np.generic)
    array = np.asarray(value)
    if array.dtype.hasobject:
        raise TypeError(
            f"a numpy array of dtype {array.dtype} holds Python objects, which cannot "
            "travel as an array; convert it (arr.tolist()) or use a numeric dtype"
        )
    fortran = array.ndim > 1 and array.flags.f_contiguous and not array.flags.c_contiguous
    if not (fortran or array.flags.c_contiguous):
        array = np.ascontiguousarray(array)
    descr = np.lib.format.dtype_to_descr(array.dtype)
    header = msgpack.packb([descr, list(array.shape)], use_bin_type=True)
    flags = (_SCALAR if scalar else 0) | (_FORTRAN if fortran else 0)
    start = _ARRAY_PREFIX.size + len(header)
    padding = b"\0" * (-start % _ALIGN)
    # Its bytes in memory order, as a view (no copy; dtypes a buffer cannot show included).
    data = array.ravel(order="A").view(np.uint8) if array.size and array.itemsize else b""
    return msgpack.ExtType(
        ARRAY_CODE, b"".join((_ARRAY_PREFIX.pack(flags, len(header)), header, padding, data))
    )


def _decode_array(data: bytes) -> Any:
    np = _numpy()
    flags, length = _ARRAY_PREFIX.unpack_from(data)
    if flags & ~(_SCALAR | _FORTRAN):
        raise ValueError(f"unknown flags {flags:#x}")
    start = _ARRAY_PREFIX.size + length
    if start > len(data):
        raise ValueError(f"its header of {length} bytes is longer than the value")
    descr, shape = msgpack.unpackb(data[_ARRAY_PREFIX.size : start], raw=False)
    if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape):
        raise ValueError(f"bad shape {shape!r}")
    dtype = np.lib.format.descr_to_dtype(_descr(descr))
    if dtype.hasobject:
        raise ValueError(f"dtype {dtype} holds Python objects")
    offset = start + (-start % _ALIGN)
    count = 1
    for n in shape:
        count *= n
    if len(data) - offset != count * dtype.itemsize:
        raise ValueError(
            f"{len(data) - offset} bytes of data for shape {tuple(shape)} of {dtype} "
            f"({count * dtype.itemsize} expected)"
        )
    order = "F" if flags & _FORTRAN else "C"
    if count == 0 or dtype.itemsize == 0:
        array = np.empty(shape, dtype, order=order)
        array.flags.writeable = False
    else:  # a read-only view of the received bytes
        flat = np.frombuffer(data, dtype, count, offset)
        array = flat.reshape(shape[::-1]).T if order == "F" else flat.reshape(shape)
    return array[()] if flags & _SCALAR else array


def _descr(descr: Any) -> Any:
    """A dtype description as numpy writes it (tuples), from MessagePack (lists):
    ``"<f4"``, or fields ``[name, format]`` / ``[name, format, shape]``."""
    if isinstance(descr, str):
        return descr
    fields = []
    for name, form, *shape in descr:
        name = tuple(name) if isinstance(name, list) else name
        fields.append((name, _descr(form), *(tuple(s) for s in shape)))
    return fields


def _numpy() -> Any:
    numpy = sys.modules.get("numpy")
    if numpy is None:
        try:
            numpy = importlib.import_module("numpy")  # (an optional dependency)
        except ImportError:
            raise ValueError(
                "it is a numpy array, and numpy is not installed in this process"
            ) from None
    return numpy


# --- the registry ------------------------------------------------------------------------

_NAMES: dict[int, str] = {
    -1: "timestamp",
    DATETIME_CODE: "datetime",
    DATE_CODE: "date",
    TIMEDELTA_CODE: "timedelta",
    ARRAY_CODE: "numpy array",
}
#: exact type -> its encoder (a subclass is looked up by isinstance, in _ORDER)
_ENCODERS: dict[type, Callable[[Any], Any]] = {
    _dt.datetime: _encode_datetime,
    _dt.date: _encode_date,
    _dt.timedelta: _encode_timedelta,
}
_DECODERS: dict[int, Callable[[bytes], Any]] = {
    DATETIME_CODE: _decode_datetime,
    DATE_CODE: _decode_date,
    TIMEDELTA_CODE: _decode_timedelta,
    ARRAY_CODE: _decode_array,
}
#: (class, encoder) for subclasses, most derived first (datetime before date).
_ORDER: list[tuple[type, Callable[[Any], Any]]] = list(_ENCODERS.items())
_USER: dict[int, type] = {}
_lock = threading.Lock()


def register_value_type(
    cls: type[T], code: int, encode: Callable[[T], bytes], decode: Callable[[bytes], T]
) -> None:
    """Let instances of ``cls`` (and its subclasses) travel in calls' arguments and results.

    ``encode(value)`` returns bytes, sent as MessagePack extension type
    ``code`` (32 to 127); ``decode(data)`` rebuilds the value from them.
    Both the host and the workers must register it: call this when a module
    that both import is imported (the adapter's module is the usual place,
    or a module in the pool's ``preload``). A worker that receives a code it
    does not know refuses the frame (a protocol error naming the code), as
    does the socket server, which carries no extension types. Registering
    the same class again replaces its functions; another class for a code
    in use is a ``ValueError``.
    """
    if not isinstance(cls, type):
        raise TypeError(f"cls must be a class, not {type(cls).__name__}")
    if type(code) is not int or code not in USER_CODES:
        raise ValueError(
            f"code must be an int from {USER_CODES.start} to {USER_CODES.stop - 1} "
            f"(the others are snakepool's), got {code!r}"
        )
    if not callable(encode) or not callable(decode):
        raise TypeError("encode and decode must be callables")
    name = f"{cls.__module__}.{cls.__qualname__}"
    with _lock:
        taken = _USER.get(code)
        if taken is not None and f"{taken.__module__}.{taken.__qualname__}" != name:
            raise ValueError(f"extension type {code} is already registered for {taken!r}")
        if cls in _ENCODERS and cls not in _USER.values():
            raise ValueError(f"{cls!r} travels as snakepool's own type; it cannot be registered")
        for old_code, old in list(_USER.items()):  # (a class re-registered under a new code)
            if f"{old.__module__}.{old.__qualname__}" == name:
                del _USER[old_code], _DECODERS[old_code], _NAMES[old_code]
                _ENCODERS.pop(old, None)
                _ORDER[:] = [(k, f) for k, f in _ORDER if k is not old]

        def encoder(value: T) -> msgpack.ExtType:
            data = encode(value)
            if not isinstance(data, bytes | bytearray | memoryview):
                raise TypeError(
                    f"the encoder registered for {name} returned {type(data).__name__}, not bytes"
                )
            return msgpack.ExtType(code, bytes(data))

        _USER[code] = cls
        _NAMES[code] = name
        _ENCODERS[cls] = encoder
        _DECODERS[code] = decode
        _ORDER.insert(0, (cls, encoder))  # (user classes first: they may subclass ours)


def default(value: Any) -> Any:
    """The packer's ``default=``: an extension value for ``value``, or ``TypeError``."""
    encoder = _ENCODERS.get(type(value))
    if encoder is not None:
        return encoder(value)
    for cls, encoder in _ORDER:  # (subclasses: of a user's class first, then of ours)
        if isinstance(value, cls):
            return encoder(value)
    numpy = sys.modules.get("numpy")  # (an array means numpy is imported here)
    if numpy is not None and isinstance(value, numpy.ndarray | numpy.generic):
        return _encode_array(value, numpy)
    raise TypeError(f"can not serialize {type(value).__name__!r} object")


def ext_hook(code: int, data: bytes) -> Any:
    """The unpacker's ``ext_hook=``: the value of extension type ``code``.

    Raises :class:`ProtocolError` for a code that is not registered here
    (naming it) and for a payload its decoder cannot read.
    """
    decoder = _DECODERS.get(code)
    if decoder is None:
        raise ProtocolError(
            f"MessagePack extension type {code} is not supported here: the worker protocol "
            f"knows -1 (timestamp), 1-4 (datetime, date, timedelta, numpy array) and the codes "
            "registered with snakepool.register_value_type in both processes"
        )
    try:
        return decoder(data)
    except ProtocolError:
        raise
    except Exception as exc:
        name = _NAMES.get(code, str(code))
        raise ProtocolError(
            f"bad {name} value (MessagePack extension type {code}): {type(exc).__name__}: {exc}"
        ) from exc
