"""Device-side clipping (``edge_sdk.dp.clip_to_norm``) against exact rational arithmetic, on
the vector the Kotlin client's DpTest pins too (the same bits in both SDKs)."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

from edge_sdk.dp import clip_to_norm


def pinned_vector(n: int = 459) -> np.ndarray:
    """Full-mantissa float32 values over 13 binades from an integer hash; every operation is
    exact, so DpTest.kt builds the same floats (``x_i`` below)."""
    i = np.arange(n, dtype=np.int64)
    h = (i * 2654435761) % 2**32
    mantissa = (h & 0xFFFFFF).astype(np.float64) - 2**23
    return (mantissa * 2.0**-24 * 2.0 ** ((i % 13) - 6)).astype(np.float32)


def exact_clip(x: np.ndarray, bound: float) -> np.ndarray:
    # The norm from the exact rational sum of squares, rounded once (float(Fraction) rounds
    # correctly), then sqrt (IEEE: correctly rounded); the scale in float32, as the SDK's.
    norm = math.sqrt(float(sum(Fraction(float(v)) ** 2 for v in x)))
    return x if norm <= bound else x * np.float32(bound / norm)


def test_the_norm_is_the_correctly_rounded_one_whatever_the_summation_order() -> None:
    x = pinned_vector()
    # This vector's numpy pairwise sum of squares is off by an ulp, and at this bound the
    # float32 scale then rounds the other way: only an exactly rounded sum gets these bits.
    bound = 36.9702137768603
    pairwise = math.sqrt(float(np.square(x, dtype=np.float64).sum()))
    assert np.float32(bound / pairwise) != np.float32(bound / math.sqrt(math.fsum(
        np.square(x, dtype=np.float64).tolist())))  # fmt: skip
    out = clip_to_norm(x, bound)
    assert out.dtype == np.float32
    assert np.array_equal(out.view(np.uint32), exact_clip(x, bound).view(np.uint32))
    # the bits DpTest.kt expects for its bound 36.97016603233627 (a sequential sum misses)
    kotlin = clip_to_norm(x, 36.97016603233627)
    assert np.array_equal(kotlin.view(np.uint32), exact_clip(x, 36.97016603233627).view(np.uint32))
    assert int(kotlin.view(np.uint32).astype(np.int64).sum()) == KOTLIN_CHECKSUM


def test_a_short_vector_is_returned_as_is_and_matrices_clip_as_one_vector() -> None:
    x = pinned_vector()
    norm = math.sqrt(float(sum(Fraction(float(v)) ** 2 for v in x)))
    assert clip_to_norm(x, norm) is x
    m = x[:458].reshape(2, 229)
    assert np.array_equal(clip_to_norm(m, 1.0).ravel(), clip_to_norm(x[:458], 1.0))


# sum of the uint32 bits of the clipped vector at DpTest.kt's bound, as DpTest.kt pins it
KOTLIN_CHECKSUM = 966508802657
