"""The tensor frame: layout against a hand-assembled reference, and every way to break it."""

from __future__ import annotations

import struct
import tracemalloc
import zlib

import numpy as np
import pytest

from edge_sdk.frame import (
    CODEC_FP16,
    CODEC_QINT,
    CODEC_RAW,
    CODEC_TOPK,
    DTYPES,
    FLAG_DEFLATE,
    FrameError,
    decode_frame,
    decode_tensor,
    encode_frame,
    encode_tensor,
)


def by_hand(
    codec: int, dtype: int, shape: tuple[int, ...], stored: bytes, flags: int = 0, **over: bytes
) -> bytes:
    """The layout of docs/protocol.md, assembled field by field."""
    body = (
        over.get("magic", b"FEDG")
        + bytes([over.get("version", b"\x01")[0], codec, dtype, flags, len(shape)])
        + over.get("reserved", b"\0\0\0")
        + b"".join(d.to_bytes(4, "little") for d in shape)
        + len(stored).to_bytes(4, "little")
        + stored
    )
    return body + zlib.crc32(body).to_bytes(4, "little")


def test_raw_frame_matches_documented_example() -> None:
    data = encode_tensor(np.arange(6, dtype=np.float32).reshape(2, 3))
    assert data.hex() == (
        "46454447" "01" "01" "01" "00" "02" "000000" "02000000" "03000000" "18000000"
        "00000000" "0000803f" "00000040" "00004040" "00008040" "0000a040" "d348f7e2"
    )  # fmt: skip


@pytest.mark.parametrize("dtype_id", sorted(DTYPES))
@pytest.mark.parametrize("shape", [(), (0,), (5,), (2, 3), (1,) * 8])
@pytest.mark.parametrize("flags", [0, FLAG_DEFLATE])
def test_raw_round_trip_every_dtype_and_shape(
    dtype_id: int, shape: tuple[int, ...], flags: int
) -> None:
    dtype = DTYPES[dtype_id]
    arr = (np.arange(int(np.prod(shape))) * 3 - 4).astype(dtype).reshape(shape)
    data = encode_tensor(arr, flags=flags)
    payload = arr.astype(dtype).tobytes()
    stored = zlib.compress(payload, 6) if flags else payload
    assert data == by_hand(CODEC_RAW, dtype_id, shape, stored, flags)
    out = decode_tensor(data)
    assert out.dtype == dtype and out.shape == shape
    np.testing.assert_array_equal(out, arr)
    out[...] = 0  # a writable copy, not a view of the caller's bytes


def test_big_endian_input_travels_little_endian() -> None:
    arr = np.array([1, -2, 300], dtype=">i4")
    assert encode_tensor(arr) == encode_tensor(arr.astype("<i4"))
    np.testing.assert_array_equal(decode_tensor(encode_tensor(arr)), [1, -2, 300])


def test_codec_frames_keep_payload_and_flags() -> None:
    payload = bytes(range(40))
    for codec in (CODEC_FP16, CODEC_QINT, CODEC_TOPK):
        for flags in (0, FLAG_DEFLATE):
            frame = decode_frame(encode_frame(codec, np.float32, (10,), payload, flags))
            assert (frame.codec, frame.flags, frame.shape, frame.payload) == (
                codec, flags, (10,), payload,
            )  # fmt: skip
            assert frame.dtype == np.float32 and frame.num_elements == 10


@pytest.mark.parametrize("flags", [0, FLAG_DEFLATE])
def test_every_truncation_is_rejected(flags: int) -> None:
    data = encode_tensor(np.linspace(-1, 1, 9, dtype=np.float32).reshape(3, 3), flags=flags)
    for cut in range(len(data)):
        with pytest.raises(FrameError):
            decode_frame(data[:cut])


@pytest.mark.parametrize("flags", [0, FLAG_DEFLATE])
def test_every_single_bit_flip_is_rejected(flags: int) -> None:
    # CRC-32 detects every error burst up to 32 bits, so no flip may slip through.
    data = encode_tensor(np.linspace(-1, 1, 9, dtype=np.float32).reshape(3, 3), flags=flags)
    for i in range(len(data)):
        for bit in range(8):
            bad = bytearray(data)
            bad[i] ^= 1 << bit
            with pytest.raises(FrameError):
                decode_frame(bytes(bad))


def raw2(**over: bytes) -> bytes:
    return by_hand(CODEC_RAW, 1, (2,), struct.pack("<2f", 1, 2), **over)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "truncated"),
        (b"NOPE" + raw2()[4:], "bad magic"),
        (b"GIF8", "bad magic"),
        (raw2(version=b"\x02"), "version 2"),
        (raw2() + b"\0", "1 trailing bytes"),
        (raw2()[:-1], "truncated"),
        (raw2()[:-4] + b"\0\0\0\0", "checksum mismatch"),
        (by_hand(7, 1, (2,), bytes(8)), "unknown codec id 7"),
        (by_hand(CODEC_RAW, 9, (2,), bytes(8)), "unknown dtype id 9"),
        (by_hand(CODEC_QINT, 6, (2,), bytes(8)), "float32 tensors only"),
        (by_hand(CODEC_RAW, 1, (2,), bytes(8), flags=0x80), "unknown flag bits 0x80"),
        (raw2(reserved=b"\0\0\1"), "reserved"),
        (by_hand(CODEC_RAW, 1, (1,) * 9, bytes(4)), "ndim 9"),
        (by_hand(CODEC_RAW, 1, (3,), bytes(8)), "length mismatch"),
        (by_hand(CODEC_RAW, 1, (2,), b"not zlib", flags=FLAG_DEFLATE), "corrupt zlib"),
        (by_hand(CODEC_RAW, 1, (2,), zlib.compress(bytes(8))[:-3], flags=1), "truncated zlib"),
        (by_hand(CODEC_RAW, 1, (2,), zlib.compress(bytes(8)) + b"x", flags=1), "after the end"),
    ],
)
def test_malformed_frames_say_what_is_wrong(data: bytes, message: str) -> None:
    with pytest.raises(FrameError, match=message):
        decode_frame(data)


def test_frame_error_is_a_value_error() -> None:
    assert issubclass(FrameError, ValueError)


def test_max_elements_is_enforced_from_the_header() -> None:
    data = encode_tensor(np.zeros((4, 5), np.float32))
    assert decode_frame(data, max_elements=20).num_elements == 20
    with pytest.raises(FrameError, match="20 elements, more than the 19 allowed"):
        decode_frame(data, max_elements=19)


def test_lying_shape_allocates_nothing() -> None:
    # Claims 2^64 elements but carries 8 bytes: rejected by arithmetic, not by allocating.
    huge = by_hand(CODEC_TOPK, 1, (0xFFFFFFFF, 0xFFFFFFFF), bytes(8))
    bomb = by_hand(CODEC_FP16, 1, (1 << 30,), zlib.compress(bytes(64 << 20), 9), FLAG_DEFLATE)
    tracemalloc.start()
    try:
        with pytest.raises(FrameError, match="more than the 1000 allowed"):
            decode_frame(huge, max_elements=1000)
        with pytest.raises(FrameError, match="more than the 1000 allowed"):
            decode_frame(bomb, max_elements=1000)
        with pytest.raises(FrameError, match="length mismatch"):
            decode_frame(by_hand(CODEC_RAW, 1, (0xFFFFFFFF, 0xFFFFFFFF), bytes(8)))
        # No max_elements: a bound beyond a C size must not crash the inflater.
        deflated = by_hand(CODEC_TOPK, 1, (0xFFFFFFFF,) * 8, zlib.compress(bytes(8)), FLAG_DEFLATE)
        assert decode_frame(deflated).payload == bytes(8)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_deflate_bomb_is_capped_by_the_shape() -> None:
    # 2 fp16 elements can never need more than 8 * 2 + 64 bytes of codec payload.
    bomb = by_hand(CODEC_FP16, 1, (2,), zlib.compress(bytes(1 << 20), 9), FLAG_DEFLATE)
    with pytest.raises(FrameError, match="inflates beyond the 80 bytes"):
        decode_frame(bomb)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((9, np.float32, (1,), bytes(4)), "unknown codec"),
        ((CODEC_RAW, np.complex64, (1,), bytes(8)), "cannot travel"),
        ((CODEC_FP16, np.float64, (1,), bytes(2)), "float32 tensors only"),
        ((CODEC_RAW, np.float32, (1,) * 9, bytes(4)), "ndim 9"),
        ((CODEC_RAW, np.float32, (-1,), b""), "dimension outside"),
        ((CODEC_RAW, np.float32, (2,), bytes(4)), "does not match"),
    ],
)
def test_encode_frame_refuses_what_it_cannot_write(args: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        encode_frame(*args)
    with pytest.raises(ValueError, match="unknown flag"):
        encode_frame(CODEC_RAW, np.float32, (1,), bytes(4), flags=4)


def test_decode_tensor_wants_a_raw_frame() -> None:
    with pytest.raises(FrameError, match="expected a raw tensor frame"):
        decode_tensor(encode_frame(CODEC_FP16, np.float32, (1,), bytes(2)))
