"""Weighted updates as vectors of the integer ring Z/2**bits, and their sum decoded back.

A device clips its update to L2 norm ``clip`` (so every coordinate lies in [-clip, clip]),
scales it by its weight's share of ``max_weight`` and by ``levels / clip``, and rounds each
coordinate stochastically (``floor(v + u)``, ``u ~ U[0, 1)``: unbiased). Its clipped weight
rides along as one more, exact, coordinate. Coordinates are signed integers of magnitude at
most ``max(levels, max_weight)``; the server's sum of ``cohort`` such vectors therefore lies
in ``[-cohort * m, cohort * m]``, and :meth:`RingSpec.for_cohort` picks the smallest ring that
holds that interval, so the masked sum cannot wrap::

    spec = RingSpec.for_cohort(cohort=100, clip=1.0, levels=2**16, max_weight=1000)
    v = encode(delta, weight=32, spec=spec, rng=np.random.default_rng())
    weighted_sum, total_weight = decode_sum(sum_of_vectors, spec)   # ~ sum w * delta, sum w
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from edge_sdk.dp import clip_to_norm

__all__ = ["RingError", "RingSpec", "decode_sum", "encode", "pack", "unpack"]


class RingError(ValueError):
    """Ring parameters that cannot hold the sum, or a vector that does not fit them."""


@dataclass(frozen=True)
class RingSpec:
    bits: int
    clip: float
    levels: int
    max_weight: int

    @classmethod
    def for_cohort(
        cls, cohort: int, clip: float, levels: int, max_weight: int, headroom: int = 0
    ) -> RingSpec:
        """``headroom``: ring units that noise added to the sum may move a coordinate by
        (distributed DP), on top of the updates' own range."""
        if cohort < 1 or levels < 1 or max_weight < 1 or headroom < 0:
            raise RingError("cohort, levels and max_weight must be positive")
        if not (math.isfinite(clip) and clip > 0):
            raise RingError("clip must be a positive finite number")
        bound = cohort * max(levels, max_weight) + headroom
        bits = (2 * bound).bit_length() + 1  # 2 * bound + 1 values, with room to spare
        if bits > 64:
            raise RingError(f"a sum of {cohort} vectors needs {bits} bits, more than 64")
        return cls(bits=bits, clip=float(clip), levels=int(levels), max_weight=int(max_weight))

    @property
    def modulus_mask(self) -> np.uint64:
        return np.uint64((1 << self.bits) - 1) if self.bits < 64 else np.uint64(2**64 - 1)


def encode(delta: np.ndarray, weight: int, spec: RingSpec, rng: np.random.Generator) -> np.ndarray:
    """``len(delta) + 1`` ring elements (uint64): the scaled, rounded update, then the weight."""
    x = np.asarray(delta, dtype=np.float64).ravel()
    if not np.all(np.isfinite(x)):
        raise RingError("the update is not finite")
    w = min(max(int(weight), 0), spec.max_weight)
    x = clip_to_norm(x, spec.clip)
    scaled = x * (w / spec.max_weight) * (spec.levels / spec.clip)
    q = np.floor(scaled + rng.random(x.size)).astype(np.int64)
    np.clip(q, -spec.levels, spec.levels, out=q)  # float rounding at exactly +-levels
    signed = np.append(q, np.int64(w))
    return signed.astype(np.uint64) & spec.modulus_mask  # two's complement, reduced


def decode_sum(total: np.ndarray, spec: RingSpec) -> tuple[np.ndarray, int]:
    """The float64 weighted sum ``sum w * clip(delta)`` and the integer ``sum w``.

    ``RingError`` if a coordinate lies beyond what the vectors (and the noise) the ring was
    sized for can add up to: :meth:`RingSpec.for_cohort` makes that bound less than a quarter
    of the ring, so a sum unmasked with a wrong seed (a crafted Shamir share), which is
    uniform over the ring, is caught with probability 1 - 2**-(len(total))."""
    t = np.asarray(total, dtype=np.uint64) & spec.modulus_mask
    signed = t.view(np.int64).copy() if spec.bits == 64 else t.astype(np.int64)
    if spec.bits < 64:
        signed[signed >= (1 << (spec.bits - 1))] -= 1 << spec.bits
    reach = 1 << (spec.bits - 2)
    if bool(((signed >= reach) | (signed < -reach)).any()):
        raise RingError("the sum has a coordinate no vectors of this ring add up to")
    weighted = signed[:-1].astype(np.float64) * (spec.max_weight * spec.clip / spec.levels)
    return weighted, int(signed[-1])


def pack(vector: np.ndarray, bits: int) -> bytes:
    """Ring elements on the wire: ``ceil(bits / 8)`` little-endian bytes each (a 20-bit ring
    takes 3 bytes an element, less than a float32)."""
    width = (bits + 7) // 8
    raw = np.ascontiguousarray(vector, dtype="<u8").view(np.uint8).reshape(-1, 8)
    return raw[:, :width].tobytes()


def unpack(data: bytes, bits: int, length: int) -> np.ndarray:
    """The inverse of :func:`pack`; ``RingError`` if ``data`` is not ``length`` elements of
    the ring."""
    width = (bits + 7) // 8
    if len(data) != width * length:
        raise RingError(f"expected {length} elements of {width} bytes, got {len(data)} bytes")
    raw = np.zeros((length, 8), dtype=np.uint8)
    raw[:, :width] = np.frombuffer(data, dtype=np.uint8).reshape(length, width)
    out = raw.view("<u8").reshape(length).astype(np.uint64)
    if bits < 64 and bool((out >> np.uint64(bits)).any()):
        raise RingError(f"an element is not below 2**{bits}")
    return out
