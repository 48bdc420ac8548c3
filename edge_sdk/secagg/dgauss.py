"""Discrete Gaussian noise in the integer ring: the device's half of distributed DP.

Distributed DP with secure aggregation (Kairouz, Liu, Steinke, ICML 2021, "The distributed
discrete Gaussian mechanism for federated learning with secure aggregation"): every device
adds noise from the discrete Gaussian ``N_Z(0, sigma2)`` to each coordinate of its quantised
update, in the ring, before masking; the server unmasks only the sum, whose noise is the sum of
the survivors' (``coordinator/privacy_distributed.py`` accounts for it). Nobody, the server
included, ever sees a sum without noise.

The sampler is exact (Canonne, Kamath, Steinke, NeurIPS 2020, "The discrete Gaussian for
differential privacy", algorithms 1-3): ``sigma2`` is a rational number and every decision is
a comparison of uniform integers with integers, so no floating-point rounding biases the
distribution (a float sampler's tails are where a privacy guarantee breaks). Uniform integers
come from AES-256-CTR keyed by 32 bytes of ``os.urandom`` (:func:`edge_sdk.secagg.crypto.
mask_stream`): a cryptographic stream, not numpy's generators. ::

    noise = sample(Fraction(400), 1000)                  # 1,000 draws of N_Z(0, 400), int64
    noisy = add_noise(ring_vector, Fraction(400), spec.bits)   # all but the last (weight)

Pure Python on integers: about 8 microseconds of CPU a draw on these (loaded, shared)
machines, so noise for a 100,000-parameter update costs about 0.8 s of device CPU; it does
not depend on the update and can be drawn ahead, while the device waits for the round's next
stage.
"""

from __future__ import annotations

import math
import os
from fractions import Fraction

import numpy as np

from edge_sdk.secagg.crypto import mask_stream

__all__ = ["CryptoIntegers", "add_noise", "bernoulli_exp", "sample", "sample_one"]

_WORDS = 4096  # 64-bit words drawn from the stream at a time


class CryptoIntegers:
    """Exactly uniform integers from AES-256-CTR keyed by ``key`` (default: 32 fresh bytes of
    ``os.urandom``; a fixed key only for tests, the noise must never be reproducible)."""

    def __init__(self, key: bytes | None = None) -> None:
        self._key = key if key is not None else os.urandom(32)
        if len(self._key) != 32:
            raise ValueError("the stream key is 32 bytes")
        self._block = 0
        self._words: list[int] = []

    def _word(self) -> int:
        if not self._words:
            # Each mask_stream call starts its counter at 0: every block gets its own seed,
            # 24 secret bytes (192 bits) and the block's number.
            block_key = self._key[:24] + self._block.to_bytes(8, "big")
            self._block += 1
            self._words = mask_stream(block_key, _WORDS, 64).tolist()[::-1]
        return self._words.pop()

    def below(self, n: int) -> int:
        """Uniform on ``0 .. n-1``: rejection sampling on ``n.bit_length()`` random bits."""
        if n < 1:
            raise ValueError("need n >= 1")
        bits = (n - 1).bit_length()
        while True:
            x, have = 0, 0
            while have < bits:
                x = (x << 64) | self._word()
                have += 64
            x >>= have - bits
            if x < n:
                return x

    def bernoulli(self, p: Fraction) -> bool:
        """True with probability ``p`` (in [0, 1]), exactly."""
        return self.below(p.denominator) < p.numerator


def bernoulli_exp(gamma: Fraction, rng: CryptoIntegers) -> bool:
    """True with probability ``exp(-gamma)`` for rational ``gamma >= 0`` (CKS algorithm 1)."""
    if gamma < 0:
        raise ValueError("gamma must be >= 0")
    return _bernoulli_exp(gamma.numerator, gamma.denominator, rng)


def _bernoulli_exp(num: int, den: int, rng: CryptoIntegers) -> bool:
    """``exp(-num / den)``: integers only (a Fraction per step costs a gcd)."""
    # exp(-gamma) = exp(-1)^w * exp(-rest), rest in [0, 1]: algorithm 1 needs gamma <= 1
    whole = max(0, (num - 1) // den)
    for _ in range(whole):
        if not _bernoulli_exp_unit(1, 1, rng):
            return False
    return _bernoulli_exp_unit(num - whole * den, den, rng)


def _bernoulli_exp_unit(num: int, den: int, rng: CryptoIntegers) -> bool:
    k = 1
    while rng.below(den * k) < num:  # Bernoulli(gamma / k)
        k += 1
    return k % 2 == 1


def _discrete_laplace(t: int, rng: CryptoIntegers) -> int:
    """``P(x) ∝ exp(-|x| / t)`` on the integers, for an integer scale ``t >= 1`` (CKS alg. 2)."""
    while True:
        u = rng.below(t)
        if not _bernoulli_exp(u, t, rng):
            continue
        v = 0
        while _bernoulli_exp_unit(1, 1, rng):
            v += 1
        x = u + t * v
        negative = rng.below(2) == 1
        if negative and x == 0:
            continue
        return -x if negative else x


def sample_one(sigma2: Fraction, rng: CryptoIntegers) -> int:
    """One draw of ``N_Z(0, sigma2)``: ``P(x) ∝ exp(-x^2 / (2 sigma2))`` (CKS algorithm 3)."""
    if sigma2 <= 0:
        raise ValueError("sigma2 must be positive")
    n, d = sigma2.numerator, sigma2.denominator
    t = math.isqrt(n // d) + 1  # floor(sigma) + 1
    # accept y with probability exp(-(|y| - sigma2 / t)^2 / (2 sigma2))
    #   = exp(-(|y| t d - n)^2 / (2 n t^2 d))
    den = 2 * n * t * t * d
    while True:
        y = _discrete_laplace(t, rng)
        if _bernoulli_exp((abs(y) * t * d - n) ** 2, den, rng):
            return y


def sample(sigma2: Fraction | int, size: int, rng: CryptoIntegers | None = None) -> np.ndarray:
    """``size`` independent draws of ``N_Z(0, sigma2)`` (int64); ``sigma2`` exact: a float
    converts to its exact binary value, so round it up, not down, before passing it in."""
    s2 = Fraction(sigma2)
    if s2 > 2**100:
        raise ValueError("sigma2 too large for int64 draws")
    r = rng or CryptoIntegers()
    return np.array([sample_one(s2, r) for _ in range(size)], dtype=np.int64)


def add_noise(
    vector: np.ndarray, sigma2: Fraction | int, bits: int, rng: CryptoIntegers | None = None
) -> np.ndarray:
    """A ring vector (uint64 elements of Z/2**bits, the weight last, as
    :func:`edge_sdk.secagg.ring.encode` lays it out) with ``N_Z(0, sigma2)`` added to every
    coordinate but the weight, modulo ``2**bits``. The ring must leave room for the summed
    noise (see ``coordinator/privacy_distributed.py``), or the sum wraps."""
    v = np.asarray(vector, dtype=np.uint64)
    if v.ndim != 1 or len(v) < 1 or not 1 <= bits <= 64:
        raise ValueError("a 1-d ring vector and 1..64 bits")
    noise = sample(sigma2, len(v) - 1, rng)
    out = v.copy()
    # int64 -> uint64 is two's complement: adding it is subtracting |noise| modulo 2**64,
    # and 2**bits divides 2**64, so masking afterwards gives the sum modulo 2**bits.
    out[:-1] += noise.view(np.uint64)
    mask = np.uint64(2**64 - 1) if bits == 64 else np.uint64((1 << bits) - 1)
    return out & mask
