"""Shamir secret sharing of 32-byte secrets over GF(p), p = 2**521 - 1 (a Mersenne prime).

A 256-bit secret is one field element, so one polynomial of degree ``threshold - 1`` shares
it. Share ``i`` is the polynomial's value at ``x = i`` (``i >= 1``); any ``threshold`` shares
give the secret back by Lagrange interpolation at 0, fewer reveal nothing about it. Shares
travel as 66 big-endian bytes::

    shares = split(secret, threshold=3, xs=[1, 2, 3, 4, 5])
    assert combine({x: shares[x] for x in (2, 4, 5)}) == secret
"""

from __future__ import annotations

import functools
import secrets
from collections.abc import Iterable, Mapping

__all__ = ["PRIME", "SHARE_BYTES", "ShamirError", "combine", "split"]

PRIME = 2**521 - 1
SHARE_BYTES = 66
SECRET_BYTES = 32


class ShamirError(ValueError):
    """Bad sharing parameters or shares that cannot reconstruct a secret."""


def _eval(coefficients: list[int], x: int) -> int:
    acc = 0
    for c in reversed(coefficients):
        acc = (acc * x + c) % PRIME
    return acc


def split(secret: bytes, threshold: int, xs: Iterable[int]) -> dict[int, bytes]:
    """Shares of ``secret`` at the points ``xs`` (distinct, 1 <= x < p)."""
    points = list(xs)
    if len(secret) != SECRET_BYTES:
        raise ShamirError(f"a secret is {SECRET_BYTES} bytes, got {len(secret)}")
    if len(set(points)) != len(points) or any(not 0 < x < PRIME for x in points):
        raise ShamirError("share points must be distinct and in [1, p)")
    if not 1 <= threshold <= len(points):
        raise ShamirError(f"threshold {threshold} must be in [1, {len(points)}]")
    coefficients = [int.from_bytes(secret, "big")]
    coefficients += [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    return {x: _eval(coefficients, x).to_bytes(SHARE_BYTES, "big") for x in points}


@functools.lru_cache(maxsize=256)
def _lagrange_at_zero(xs: tuple[int, ...]) -> tuple[int, ...]:
    """The Lagrange basis at 0 for the points ``xs``: a server rebuilds most secrets of a round
    from the same set of holders, so each set's O(len(xs)**2) work is done once."""
    out = []
    for j in xs:
        num, den = 1, 1
        for m in xs:
            if m != j:
                num = num * (-m) % PRIME
                den = den * (j - m) % PRIME
        out.append(num * pow(den, -1, PRIME) % PRIME)
    return tuple(out)


def combine(shares: Mapping[int, bytes]) -> bytes:
    """The secret from ``threshold`` or more shares (more are fine; all must be consistent)."""
    if not shares:
        raise ShamirError("no shares")
    values: dict[int, int] = {}
    for x, share in shares.items():
        if len(share) != SHARE_BYTES or not 0 < x < PRIME:
            raise ShamirError(f"malformed share at x={x}")
        values[x] = int.from_bytes(share, "big")
        if values[x] >= PRIME:
            raise ShamirError(f"share at x={x} is not a field element")
    xs = tuple(sorted(values))
    secret = sum(values[x] * c for x, c in zip(xs, _lagrange_at_zero(xs), strict=True)) % PRIME
    if secret >= 2 ** (8 * SECRET_BYTES):
        # Too few (or inconsistent) shares interpolate to a random field element.
        raise ShamirError("shares do not reconstruct a 32-byte secret")
    return secret.to_bytes(SECRET_BYTES, "big")
