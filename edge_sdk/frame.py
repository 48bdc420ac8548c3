"""The tensor frame: a small self-describing binary container for one tensor on the wire.

Owns the byte layout (documented byte by byte in ``docs/protocol.md``, "Tensor frame"), the
codec and dtype ids, the optional deflate stage, and every structural check a receiver makes
before trusting a frame. What a codec's payload means is :mod:`edge_sdk.codecs`' business.
Imports only the standard library and numpy.

Layout (all integers little-endian)::

    offset  size     field
    0       4        magic b"FEDG"
    4       1        format version (1)
    5       1        codec id        (CODEC_RAW, CODEC_FP16, CODEC_QINT, CODEC_TOPK)
    6       1        dtype id        (of the decoded tensor; DTYPES)
    7       1        flags           (bit 0: FLAG_DEFLATE, the payload is a zlib stream)
    8       1        ndim            (0..MAX_NDIM)
    9       3        reserved, zero
    12      4*ndim   shape, u32 each
    12+4n   4        payload length L (bytes as stored, i.e. after deflate)
    16+4n   L        payload
    16+4n+L 4        CRC-32 (zlib / java.util.zip.CRC32) of every byte before it

Usage::

    >>> data = encode_tensor(np.arange(3, dtype=np.float32))
    >>> decode_tensor(data)
    array([0., 1., 2.], dtype=float32)
"""

from __future__ import annotations

import math
import struct
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import numpy as np

__all__ = [
    "CODEC_FP16",
    "CODEC_NAMES",
    "CODEC_QINT",
    "CODEC_RAW",
    "CODEC_TOPK",
    "DTYPES",
    "FLAG_DEFLATE",
    "FORMAT_VERSION",
    "MAGIC",
    "MAX_NDIM",
    "Frame",
    "FrameError",
    "decode_frame",
    "decode_tensor",
    "encode_frame",
    "encode_tensor",
    "max_payload_size",
]

MAGIC: Final = b"FEDG"
FORMAT_VERSION: Final = 1
MAX_NDIM: Final = 8

CODEC_RAW: Final = 1  # elements of the frame's dtype, as they are
CODEC_FP16: Final = 2  # float32 tensor carried as IEEE binary16
CODEC_QINT: Final = 3  # float32 tensor quantized to 8/4/2-bit integers with per-block scales
CODEC_TOPK: Final = 4  # float32 tensor reduced to its k largest magnitudes
CODEC_NAMES: Final = {CODEC_RAW: "raw", CODEC_FP16: "fp16", CODEC_QINT: "qint", CODEC_TOPK: "topk"}

FLAG_DEFLATE: Final = 0x01
_KNOWN_FLAGS: Final = FLAG_DEFLATE

# id -> numpy dtype (always little-endian on the wire)
DTYPES: Final[dict[int, np.dtype]] = {
    1: np.dtype("<f4"),
    2: np.dtype("<f2"),
    3: np.dtype("<f8"),
    4: np.dtype("i1"),
    5: np.dtype("u1"),
    6: np.dtype("<i4"),
    7: np.dtype("<i8"),
}
_DTYPE_IDS: Final = {dt.newbyteorder("<") if dt.itemsize > 1 else dt: i for i, dt in DTYPES.items()}
_FLOAT32_ID: Final = 1

_FIXED = struct.Struct("<4sBBBBB3s")  # magic, version, codec, dtype, flags, ndim, reserved
_U32 = struct.Struct("<I")
_MAX_U32: Final = 0xFFFFFFFF


class FrameError(ValueError):
    """A frame that is truncated, corrupt, oversized or not understood by this version.

    Receivers map it to the ``malformed_frame`` error code.
    """


@dataclass(frozen=True)
class Frame:
    """A decoded frame: the header fields and the codec payload (already inflated)."""

    codec: int
    dtype: np.dtype
    shape: tuple[int, ...]
    flags: int
    payload: bytes

    @property
    def num_elements(self) -> int:
        return math.prod(self.shape)

    @property
    def codec_name(self) -> str:
        return CODEC_NAMES[self.codec]


def max_payload_size(codec: int, dtype: np.dtype, num_elements: int) -> int:
    """The largest codec payload any valid frame of this kind can carry.

    Bounds what an inflated (deflate) payload may grow to, so that a small hostile frame cannot
    make the receiver allocate gigabytes. No codec needs more than 8 bytes an element plus a
    small fixed header (top-k with float32 values: 4-byte index + 4-byte value).
    """
    if codec == CODEC_RAW:
        return num_elements * dtype.itemsize
    return 8 * num_elements + 64


def _dtype_id(dtype: np.dtype) -> int:
    key = dtype.newbyteorder("<") if dtype.itemsize > 1 else dtype
    try:
        return _DTYPE_IDS[key]
    except KeyError:
        raise ValueError(f"dtype {dtype} cannot travel in a frame") from None


def encode_frame(
    codec: int,
    dtype: np.dtype | str | type,
    shape: tuple[int, ...] | list[int],
    payload: bytes,
    flags: int = 0,
) -> bytes:
    """Build a frame. With ``FLAG_DEFLATE`` the payload is deflated here (zlib format)."""
    if codec not in CODEC_NAMES:
        raise ValueError(f"unknown codec id {codec}")
    dt = np.dtype(dtype)
    dtype_id = _dtype_id(dt)
    if codec != CODEC_RAW and dtype_id != _FLOAT32_ID:
        raise ValueError(f"codec {CODEC_NAMES[codec]} carries float32 tensors only, not {dt}")
    if flags & ~_KNOWN_FLAGS:
        raise ValueError(f"unknown flag bits 0x{flags & ~_KNOWN_FLAGS:02x}")
    shape = tuple(int(d) for d in shape)
    if len(shape) > MAX_NDIM:
        raise ValueError(f"ndim {len(shape)} exceeds {MAX_NDIM}")
    if any(d < 0 or d > _MAX_U32 for d in shape):
        raise ValueError(f"shape {shape} has a dimension outside 0..2^32-1")
    if codec == CODEC_RAW and len(payload) != math.prod(shape) * dt.itemsize:
        raise ValueError("raw payload length does not match shape and dtype")
    stored = zlib.compress(payload, 6) if flags & FLAG_DEFLATE else bytes(payload)
    if len(stored) > _MAX_U32:
        raise ValueError("payload exceeds 4 GiB")
    parts = [
        _FIXED.pack(MAGIC, FORMAT_VERSION, codec, dtype_id, flags, len(shape), b"\0\0\0"),
        struct.pack(f"<{len(shape)}I", *shape),
        _U32.pack(len(stored)),
        stored,
    ]
    body = b"".join(parts)
    return body + _U32.pack(zlib.crc32(body))


def decode_frame(
    data: bytes | bytearray | memoryview,
    *,
    max_elements: int | None = None,
    check_header: Callable[[np.dtype, tuple[int, ...]], None] | None = None,
) -> Frame:
    """Parse and check a frame; raise :class:`FrameError` saying what is wrong.

    ``max_elements`` bounds the tensor's element count and ``check_header(dtype, shape)`` may
    raise to refuse the tensor a sound header describes; both run before the payload is
    inflated or anything is allocated.
    """
    buf = memoryview(data).cast("B")
    size = len(buf)
    if size < _FIXED.size:
        if bytes(buf[: min(size, 4)]) != MAGIC[: min(size, 4)]:
            raise FrameError("bad magic: not a fedge frame")
        raise FrameError(f"truncated frame: {size} bytes, the fixed header alone is {_FIXED.size}")
    magic, version, codec, dtype_id, flags, ndim, reserved = _FIXED.unpack_from(buf, 0)
    if magic != MAGIC:
        raise FrameError(f"bad magic {magic!r}: not a fedge frame")
    if version != FORMAT_VERSION:
        raise FrameError(f"unsupported frame format version {version} (this reader knows 1)")
    if ndim > MAX_NDIM:
        raise FrameError(f"ndim {ndim} exceeds {MAX_NDIM}")
    header_end = _FIXED.size + 4 * ndim + 4
    if size < header_end + 4:
        raise FrameError(
            f"truncated frame: {size} bytes, header and checksum need {header_end + 4}"
        )
    shape: tuple[int, ...] = struct.unpack_from(f"<{ndim}I", buf, _FIXED.size)
    (stored_len,) = _U32.unpack_from(buf, header_end - 4)
    expected_size = header_end + stored_len + 4
    if size < expected_size:
        raise FrameError(f"truncated frame: {size} bytes, header says {expected_size}")
    if size > expected_size:
        raise FrameError(f"{size - expected_size} trailing bytes after the frame")
    (crc,) = _U32.unpack_from(buf, size - 4)
    if zlib.crc32(buf[: size - 4]) != crc:
        raise FrameError("checksum mismatch: the frame is corrupt")
    if codec not in CODEC_NAMES:
        raise FrameError(f"unknown codec id {codec}")
    if dtype_id not in DTYPES:
        raise FrameError(f"unknown dtype id {dtype_id}")
    if codec != CODEC_RAW and dtype_id != _FLOAT32_ID:
        raise FrameError(f"codec {CODEC_NAMES[codec]} carries float32 tensors only")
    if flags & ~_KNOWN_FLAGS:
        raise FrameError(f"unknown flag bits 0x{flags & ~_KNOWN_FLAGS:02x}")
    if reserved != b"\0\0\0":
        raise FrameError("reserved header bytes are not zero")
    num_elements = math.prod(shape)
    if max_elements is not None and num_elements > max_elements:
        raise FrameError(
            f"frame holds {num_elements} elements, more than the {max_elements} allowed"
        )
    dtype = DTYPES[dtype_id]
    if check_header is not None:
        check_header(dtype, shape)
    limit = max_payload_size(codec, dtype, num_elements)
    stored = buf[header_end : header_end + stored_len]
    payload = _inflate(stored, limit) if flags & FLAG_DEFLATE else bytes(stored)
    if len(payload) > limit:
        raise FrameError(f"payload of {len(payload)} bytes exceeds the {limit} this shape allows")
    if codec == CODEC_RAW and len(payload) != limit:
        raise FrameError(
            f"payload length mismatch: {len(payload)} bytes for {num_elements} x {dtype}"
        )
    return Frame(codec=codec, dtype=dtype, shape=shape, flags=flags, payload=payload)


def _inflate(stored: memoryview, limit: int) -> bytes:
    inflater = zlib.decompressobj()
    try:
        # A header's shape can claim more than a C size; no stream gets that far anyway.
        out = inflater.decompress(stored, min(limit + 1, sys.maxsize))
    except zlib.error as e:
        raise FrameError(f"deflate stage: corrupt zlib stream ({e})") from None
    if len(out) > limit:
        raise FrameError(f"deflate stage: inflates beyond the {limit} bytes this shape allows")
    if not inflater.eof:
        raise FrameError("deflate stage: truncated zlib stream")
    if inflater.unused_data:
        raise FrameError("deflate stage: bytes after the end of the zlib stream")
    return out


def encode_tensor(array: np.ndarray, *, flags: int = 0) -> bytes:
    """A raw-codec frame holding ``array`` as it is (any dtype in :data:`DTYPES`)."""
    arr = np.asarray(array)
    dt = arr.dtype.newbyteorder("<") if arr.dtype.itemsize > 1 else arr.dtype
    payload = np.ascontiguousarray(arr, dtype=dt).tobytes()
    return encode_frame(CODEC_RAW, dt, arr.shape, payload, flags)


def decode_tensor(
    data: bytes | bytearray | memoryview, *, max_elements: int | None = None
) -> np.ndarray:
    """The array in a raw-codec frame (a writable copy, native byte order)."""
    frame = decode_frame(data, max_elements=max_elements)
    if frame.codec != CODEC_RAW:
        raise FrameError(f"expected a raw tensor frame, got codec {frame.codec_name}")
    arr = np.frombuffer(frame.payload, dtype=frame.dtype).reshape(frame.shape)
    return arr.astype(frame.dtype.newbyteorder("="), copy=True)
