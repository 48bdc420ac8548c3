"""The sparse neighbour graph of SecAgg+: each device shares secrets with about log n others.

Devices ``0 .. n-1`` are placed on a circle in an order drawn from a public 32-byte seed (so
the server cannot choose who neighbours whom after seeing the keys) and each is joined to the
``degree // 2`` nearest on either side: a Harary graph, ``degree``-regular and connected. A
device's mask seeds are Shamir-shared among its neighbours with ``threshold`` of them needed
to reconstruct; :func:`parameters` gives the defaults.
"""

from __future__ import annotations

import math

import numpy as np

from edge_sdk.secagg.crypto import mask_stream

__all__ = ["neighbours", "parameters"]


def parameters(n: int, dropout: float = 0.1, failure: float = 1e-6) -> tuple[int, int]:
    """``(degree, threshold)`` for ``n`` devices of which a fraction ``dropout`` may vanish.

    The threshold is an honest majority of a device's neighbours (``degree // 2 + 1``), and the
    degree is the smallest even one for which fewer than ``threshold`` neighbours survive with
    probability below ``failure`` (binomial tail), so that every survivor's self mask and every
    dropout's mask key can be rebuilt; it grows like log n with the tolerated failure rate,
    and is the complete graph when that is smaller.
    """
    if n < 2:
        raise ValueError("secure aggregation needs at least two devices")
    if not 0.0 <= dropout < 1.0:
        raise ValueError("dropout must be in [0, 1)")
    if dropout >= 0.5:  # no sparse graph keeps a majority of neighbours: the complete one
        return n - 1, (n - 1) // 2 + 1
    for degree in range(2, n - 1, 2):
        threshold = degree // 2 + 1
        short = sum(_binomial(degree, k, 1.0 - dropout) for k in range(threshold))
        if short < failure / n:
            return degree, threshold
    return n - 1, (n - 1) // 2 + 1


def _binomial(n: int, k: int, p: float) -> float:
    """P(Binomial(n, p) = k), in logs: the coefficients of large degrees overflow a float."""
    if p in (0.0, 1.0):
        return float(k == (n if p == 1.0 else 0))
    log = math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
    return math.exp(log + k * math.log(p) + (n - k) * math.log1p(-p))


def neighbours(n: int, degree: int, seed: bytes) -> list[frozenset[int]]:
    """Each device's neighbours (symmetric, no self loops; an odd ``degree`` with an odd ``n``
    gives ``degree - 1``)."""
    if not 1 <= degree <= n - 1:
        raise ValueError(f"degree must be in [1, {n - 1}]")
    if degree >= n - 1:
        return [frozenset(set(range(n)) - {u}) for u in range(n)]
    order = np.argsort(mask_stream(seed, n, 64), kind="stable")
    position = np.empty(n, dtype=np.int64)
    position[order] = np.arange(n)
    half = degree // 2
    links: list[set[int]] = [set() for _ in range(n)]
    for u in range(n):
        for step in range(1, half + 1):
            v = int(order[(position[u] + step) % n])
            links[u].add(v)
            links[v].add(u)
        if degree % 2 and n % 2 == 0:
            # Odd degree: also the device diametrically opposite (exists when n is even).
            v = int(order[(position[u] + n // 2) % n])
            links[u].add(v)
            links[v].add(u)
    return [frozenset(s) for s in links]
