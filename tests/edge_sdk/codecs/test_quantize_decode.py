"""The int8 codec's vectorised decode against a scalar one written from docs/protocol.md:
equal bit for bit on random payloads of every width, block layout and kind of scale (zero,
negative zero, subnormal, largest finite, infinite, NaN), and the same refusals."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from edge_sdk.codecs.quantize import QuantizedCodec
from edge_sdk.frame import FrameError

F32_EDGES = np.array(
    [0.0, -0.0, 1e-45, 1.1754942e-38, 3.4028235e38, np.inf, np.nan, 1.0, 0.5, 3e-3],
    dtype=np.float32,
)


def _payload(bits: int, block: int, scales: np.ndarray, codes: list[int]) -> bytes:
    """Header, float32 scales, then code ``i`` at bit ``i * bits`` (least significant first)."""
    packed = bytearray(-(-len(codes) * bits // 8))
    for i, code in enumerate(codes):
        packed[i * bits // 8] |= code << (i * bits % 8)
    return struct.pack("<B3sI", bits, b"\0\0\0", block) + scales.astype("<f4").tobytes() + packed


def _reference(bits: int, block: int, scales: np.ndarray, codes: list[int]) -> np.ndarray:
    """One element at a time: a small integer times a float32 is exact in a double, so
    rounding that double to float32 is the one IEEE rounding of a float32 product."""
    levels = (1 << (bits - 1)) - 1
    out = np.empty(len(codes), dtype=np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        for i, code in enumerate(codes):
            out[i] = np.float32((code - levels) * float(scales[i // block]))
    return out


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    # NaN payloads may differ between two correct computations; every other value may not.
    nan = np.isnan(a)
    return bool(
        (nan == np.isnan(b)).all() and (a.view(np.uint32)[~nan] == b.view(np.uint32)[~nan]).all()
    )


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_decode_equals_the_scalar_reference_bit_for_bit(bits: int) -> None:
    rng = np.random.default_rng(bits)
    levels = (1 << (bits - 1)) - 1
    codec = QuantizedCodec()
    for n in [0, 1, 2, 3, 7, 8, 255, 256, 257, 1000]:
        for block in sorted({1, 3, 4, 256, max(n, 1), n + 5, 2**32 - 1}):
            nb = -(-n // block)
            scales = np.abs(rng.standard_normal(nb)).astype(np.float32) * np.float32(1e-2)
            edges = rng.integers(0, len(F32_EDGES), nb)
            use_edge = rng.random(nb) < 0.5
            scales[use_edge] = F32_EDGES[edges[use_edge]]
            codes = rng.integers(0, 2 * levels + 1, n).tolist()
            if n:
                codes[0], codes[-1] = 0, 2 * levels  # the extreme codes
            got = codec.decode(_payload(bits, block, scales, codes), n)
            want = _reference(bits, block, scales, codes)
            assert got.dtype == np.float32 and got.shape == (n,)
            assert _same_bits(got, want), (bits, n, block)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_decode_refuses_a_code_above_the_range(bits: int) -> None:
    levels = (1 << (bits - 1)) - 1
    scales = np.ones(1, dtype=np.float32)
    with pytest.raises(FrameError, match="above"):
        QuantizedCodec().decode(_payload(bits, 16, scales, [0, 2 * levels + 1, 0]), 3)


@pytest.mark.parametrize("bits", [4, 2])
def test_decode_refuses_nonzero_padding(bits: int) -> None:
    payload = bytearray(_payload(bits, 16, np.ones(1, dtype=np.float32), [1]))
    payload[-1] |= 1 << bits  # the code slot after the last one
    with pytest.raises(FrameError, match="padding"):
        QuantizedCodec().decode(bytes(payload), 1)
