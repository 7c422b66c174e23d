"""The one wire codec: message dataclass <-> msgpack frame. Nothing here ever unpickles.

Frame = msgpack array ``[PROTOCOL_VERSION, type_name, body]``; body maps field name -> value.
A numpy array is msgpack ext type ``ARRAY_EXT`` whose payload is (little-endian)::

    u16 data_offset | 3s dtype.str ("<i4") | u8 ndim | ndim x i64 dims | zero pad | raw C-order bytes

``encode`` pads so the raw bytes start 8-byte aligned within the frame, and copies each array once.
``decode`` returns arrays as read-only views of the frame's memory (no copy); the view keeps the frame alive.
Every malformed, hostile or incompatible frame raises ``FrameError`` with a short ``reason``.
"""

from __future__ import annotations

import struct
import types
import typing
from dataclasses import MISSING, fields

import msgpack
import numpy as np

from transport.messages import MESSAGE_TYPES, PROTOCOL_VERSION

ARRAY_EXT = 1
DEFAULT_MAX_FRAME_BYTES = 256 * 1024 * 1024
MAX_NDIM = 32
_ALIGN = 8
_DTYPES = {np.dtype(t).str: np.dtype(t) for t in (
    np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64,
    np.float16, np.float32, np.float64)}  # keys like "<i4", "|b1": little-endian only on the wire
_ARRAY_HEAD = struct.Struct("<H3sB")  # data_offset, dtype.str, ndim
_EXT32 = struct.Struct(">BIb")  # 0xc9, payload length, ext code (msgpack headers are big-endian)
# ext marker byte -> (header length, struct for the length field or fixed payload length)
_EXT_HEADERS = {0xD4: (2, 1), 0xD5: (2, 2), 0xD6: (2, 4), 0xD7: (2, 8), 0xD8: (2, 16),
                0xC7: (3, struct.Struct(">B")), 0xC8: (4, struct.Struct(">H")),
                0xC9: (6, struct.Struct(">I"))}

REASONS = ("too_large", "malformed", "protocol_version", "unknown_type", "bad_fields", "bad_array",
           "too_deep")


class FrameError(ValueError):
    """A frame was rejected. ``reason`` is one of ``REASONS``; the message says what was wrong."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


# ---- registry: type name -> (class, {field: hint}, required field names) -----------------------------


def _registry() -> dict[str, tuple[type, dict[str, object], frozenset[str]]]:
    reg = {}
    for cls in MESSAGE_TYPES:
        hints = typing.get_type_hints(cls)
        declared = {f.name: hints[f.name] for f in fields(cls)}
        for name, hint in declared.items():
            _check_supported(hint, f"{cls.__name__}.{name}")
        required = frozenset(f.name for f in fields(cls)
                             if f.default is MISSING and f.default_factory is MISSING)
        reg[cls.__name__] = (cls, declared, required)
    return reg


def _check_supported(hint, where: str) -> None:
    if hint in (int, float, str, bool, bytes, np.ndarray):
        return
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (list, dict) and args:
        for a in args:
            _check_supported(a, where)
        return
    raise TypeError(f"{where}: annotation {hint!r} is not supported by transport/codec.py; "
                    "add it to _check_value")


_TYPES = _registry()


# ---- encode ------------------------------------------------------------------------------------------


def encode(msg) -> bytes:
    """Message dataclass -> frame bytes. Fields are taken shallowly (no deep copy of arrays)."""
    name = type(msg).__name__
    if _TYPES.get(name, (None,))[0] is not type(msg):
        raise TypeError(f"{type(msg)!r} is not a wire message; add it to MESSAGE_TYPES in "
                        "transport/messages.py")
    fs = fields(msg)
    n = len(fs)
    parts = [b"\x93", msgpack.packb(PROTOCOL_VERSION), msgpack.packb(name),
             bytes([0x80 | n]) if n < 16 else struct.pack(">BH", 0xDE, n)]
    size = sum(map(len, parts))
    for f in fs:
        key = msgpack.packb(f.name)
        parts.append(key)
        size += len(key)
        value = getattr(msg, f.name)
        if isinstance(value, np.ndarray):
            pieces = _array_pieces(value, frame_offset=size)
        else:
            pieces = [msgpack.packb(value, default=_builtin_or_refuse)]
        parts += pieces
        size += sum(len(p) for p in pieces)  # raw is a 1-d uint8 array
    return b"".join(parts)  # the single copy of array data


def _array_pieces(arr: np.ndarray, *, frame_offset: int) -> list:
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    if arr.dtype.str not in _DTYPES:
        raise TypeError(f"cannot send a {arr.dtype} array; the wire carries {sorted(_DTYPES)}")
    if arr.ndim > MAX_NDIM:
        raise TypeError(f"cannot send a {arr.ndim}-d array; at most {MAX_NDIM} dims")
    raw = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
    head = _ARRAY_HEAD.size + 8 * arr.ndim
    pad = -(frame_offset + _EXT32.size + head) % _ALIGN
    data_offset = head + pad
    if data_offset + raw.nbytes >= 2**32:
        raise TypeError(f"cannot send an array of {raw.nbytes} bytes in one frame (limit 4 GiB)")
    header = (_EXT32.pack(0xC9, data_offset + raw.nbytes, ARRAY_EXT)
              + _ARRAY_HEAD.pack(data_offset, arr.dtype.str.encode(), arr.ndim)
              + struct.pack(f"<{arr.ndim}q", *arr.shape) + bytes(pad))
    return [header, raw]


def _builtin_or_refuse(obj):
    if isinstance(obj, np.generic):  # numpy scalar, e.g. a np.float32 reward: send as the Python number
        return obj.item()
    raise TypeError(f"cannot send {type(obj).__name__} {obj!r:.80}; fields hold int, float, str, bool, "
                    "bytes, lists and dicts of those, or a top-level np.ndarray")


# ---- decode ------------------------------------------------------------------------------------------


def decode(frame, *, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES):
    """Frame (bytes, bytearray, memoryview, zmq.Frame) -> message dataclass, or raise ``FrameError``."""
    mv = memoryview(frame)
    if mv.nbytes > max_frame_bytes:  # before parsing anything
        raise FrameError("too_large", f"frame of {mv.nbytes} bytes exceeds max_frame_bytes={max_frame_bytes}")
    if mv.ndim != 1 or mv.itemsize != 1:
        mv = mv.cast("B")
    try:
        return _decode(mv)
    except FrameError:
        raise
    except msgpack.StackError:
        raise FrameError("too_deep", "frame nests containers deeper than msgpack's stack allows") from None
    except (ValueError, TypeError, struct.error, msgpack.OutOfData) as e:  # format, limits, truncation, utf-8
        raise FrameError("malformed", f"not a valid msgpack frame: {type(e).__name__}: {e}") from None


def _decode(mv: memoryview):
    up = msgpack.Unpacker(max_buffer_size=max(mv.nbytes, 1), ext_hook=_refuse_ext)
    up.feed(mv)
    if up.read_array_header() != 3:
        raise FrameError("malformed", "frame must be a 3-element array [version, type, body]")
    version = up.unpack()
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise FrameError("protocol_version", f"peer speaks wire protocol {version!r}, this process speaks "
                         f"{PROTOCOL_VERSION}; both ends must run the same everyprompt version")
    name = up.unpack()
    if type(name) is not str or name not in _TYPES:
        raise FrameError("unknown_type", f"unknown message type {name!r:.80}; both ends must run the same "
                         "transport/messages.py")
    cls, hints, required = _TYPES[name]
    try:
        num_fields = up.read_map_header()
    except ValueError:
        raise FrameError("bad_fields", f"{name} body is not a map") from None
    values = {}
    for _ in range(num_fields):
        key = up.unpack()
        if type(key) is not str or key not in hints or key in values:
            raise FrameError("bad_fields", f"{name}: unknown or repeated field {key!r:.80}")
        values[key] = _read_value(up, mv)
    if up.tell() != mv.nbytes:
        raise FrameError("malformed", f"{mv.nbytes - up.tell()} trailing bytes after the message")
    if missing := required - values.keys():
        raise FrameError("bad_fields", f"{name}: missing fields {sorted(missing)}")
    for key, value in values.items():
        values[key] = _check_value(value, hints[key], f"{name}.{key}")
    return cls(**values)


def _read_value(up: msgpack.Unpacker, mv: memoryview):
    """Next value; an array ext becomes a view of ``mv`` instead of going through the unpacker's copy."""
    pos = up.tell()
    if pos < mv.nbytes and mv[pos] in _EXT_HEADERS and pos + 2 <= mv.nbytes:
        head_len, length = _EXT_HEADERS[mv[pos]]
        if pos + head_len <= mv.nbytes:
            if not isinstance(length, int):
                length = length.unpack_from(mv, pos + 1)[0]
            code = struct.unpack_from("b", mv, pos + head_len - 1)[0]
            if code == ARRAY_EXT:
                up.skip()  # validates the ext's length against the frame; no copy, no hook
                return _array_view(mv, pos + head_len, length)
    return up.unpack()


def _array_view(mv: memoryview, start: int, length: int) -> np.ndarray:
    if length < _ARRAY_HEAD.size:
        raise FrameError("bad_array", f"array payload of {length} bytes is too short")
    data_offset, dtype_str, ndim = _ARRAY_HEAD.unpack_from(mv, start)
    dtype = _DTYPES.get(dtype_str.decode("latin-1"))
    if dtype is None:
        raise FrameError("bad_array", f"array dtype {dtype_str!r} is not one of {sorted(_DTYPES)}")
    if ndim > MAX_NDIM or not _ARRAY_HEAD.size + 8 * ndim <= data_offset <= length:
        raise FrameError("bad_array", f"bad array header: ndim={ndim}, data_offset={data_offset}, "
                         f"payload={length}")
    shape = struct.unpack_from(f"<{ndim}q", mv, start + _ARRAY_HEAD.size)
    if any(d < 0 for d in shape):
        raise FrameError("bad_array", f"array shape {shape} has a negative dim")
    count = 1
    for d in shape:
        count *= d
    if count * dtype.itemsize != length - data_offset:
        raise FrameError("bad_array", f"array {dtype}{list(shape)} needs {count * dtype.itemsize} bytes, "
                         f"payload holds {length - data_offset}")
    try:
        arr = np.frombuffer(mv, dtype=dtype, count=count, offset=start + data_offset).reshape(shape)
    except ValueError as e:  # e.g. dims whose product overflows although one of them is 0
        raise FrameError("bad_array", f"array shape {shape} is not representable: {e}") from None
    arr.flags.writeable = False  # a view of the received frame: never written in place
    return arr


def _refuse_ext(code: int, data: bytes):
    raise FrameError("bad_array", f"ext type {code} is not allowed here; arrays may only be top-level fields")


def _check_value(value, hint, where: str):
    """Check ``value`` against a supported annotation; returns it, int widened to float where declared."""
    if hint is float:
        if type(value) is float:
            return value
        if type(value) is int:
            return float(value)
    elif hint is np.ndarray:
        if isinstance(value, np.ndarray):
            return value
    elif hint in (int, str, bool, bytes):
        if type(value) is hint:  # exact: a bool is not an int here
            return value
    elif typing.get_origin(hint) is list:
        if type(value) is list:
            (item,) = typing.get_args(hint)
            return [_check_value(v, item, f"{where}[]") for v in value]
    elif typing.get_origin(hint) is dict:
        if type(value) is dict:
            k_hint, v_hint = typing.get_args(hint)
            return {_check_value(k, k_hint, f"{where} key"): _check_value(v, v_hint, f"{where}[{k!r:.40}]")
                    for k, v in value.items()}
    raise FrameError("bad_fields", f"{where} should be {_hint_name(hint)}, got {type(value).__name__}")


def _hint_name(hint) -> str:
    return hint.__name__ if isinstance(hint, type) and not isinstance(hint, types.GenericAlias) else str(hint)
