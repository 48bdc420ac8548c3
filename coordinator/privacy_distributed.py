"""Accounting for distributed DP: the discrete Gaussian noise the survivors of a SecAgg round
added in the ring (``edge_sdk/secagg/dgauss.py``), summed.

Kairouz, Liu, Steinke (ICML 2021), Proposition 14: if each of ``n`` devices adds independent
``N_Z(0, sigma2)`` noise to every one of ``d`` integer coordinates (``sigma >= 1/2``), the sum
of the devices' vectors released with that noise satisfies Renyi DP at every order ``a > 1``
with ``eps(a)`` the smallest of::

    a * D2^2 / (2 n sigma2) + tau * d
    a / 2 * (D2^2 / (n sigma2) + 2 * D1 * tau / sqrt(n sigma2) + tau^2 * d)
    a / 2 * (D2 / sqrt(n sigma2) + tau * sqrt(d))^2
    tau = 10 * sum_{k=1}^{n-1} exp(-2 pi^2 sigma2 * k / (k + 1))

where ``D2`` and ``D1`` bound the L2 and L1 distance between the sums of neighbouring cohorts
(here: one device replaced, so twice one device's bound, as the central ledger's ``z / 2``).
``tau`` measures how far a sum of discrete Gaussians is from a discrete Gaussian; once
``sigma2`` is a few units it is negligible and the third bound is the Gaussian mechanism's RDP
with noise multiplier ``sqrt(n sigma2) / D2`` (checked against dp-accounting in the tests).

**Dropouts.** Only the survivors' noise is in the sum, and the server learns who survived
after the devices chose their noise: a round is accounted with ``n`` = the fewest survivors
it can commit with (the SecAgg session's ``min_survivors``; below it the round is abandoned
and nothing is released), never with the cohort. More survivors only add noise.

**Sampling.** The RDP above is of one release; no amplification by sampling is applied (the
subsampled-Gaussian bounds of dp-accounting hold for the continuous Gaussian, not for this
mechanism): the figure is conservative for a cohort drawn from a larger population. Rounds
compose by adding RDP, order by order, at dp-accounting's orders; epsilon at ``delta`` comes
from ``dp_accounting``'s own conversion, as in :mod:`coordinator.privacy`::

    rnd = DistributedRound(dim=610, l2=per_device_bound, survivors=80, sigma2=sigma2)
    distributed_epsilon([(rnd, 50)], delta=1e-5)

Must not import: ``coordinator.service``, aiohttp, torch. Needs the ``privacy`` extra.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from dp_accounting.rdp import RdpAccountant
from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon

__all__ = ["DistributedRound", "distributed_epsilon", "noise_headroom", "rounded_norm_bound"]


@dataclass(frozen=True)
class DistributedRound:
    """One SecAgg round with distributed discrete Gaussian noise.

    ``dim``: noised coordinates; ``l2``: the L2 norm bound of one device's quantised vector in
    ring units (:func:`rounded_norm_bound`); ``survivors``: the fewest devices whose noise can
    be in a committed sum; ``sigma2``: each device's noise variance in ring units.
    """

    dim: int
    l2: float
    survivors: int
    sigma2: float

    def __post_init__(self) -> None:
        if self.dim < 1 or self.survivors < 1:
            raise ValueError("dim and survivors must be at least 1")
        if not (math.isfinite(self.l2) and self.l2 > 0):
            raise ValueError("l2 must be a positive finite number")
        if not (math.isfinite(self.sigma2) and self.sigma2 >= 0.25):
            raise ValueError("the bound needs sigma >= 1/2 (sigma2 >= 0.25)")

    @property
    def tau(self) -> float:
        s = sum(
            math.exp(-2 * math.pi**2 * self.sigma2 * k / (k + 1))
            for k in range(1, self.survivors)
        )
        return 10.0 * s

    def rdp(self, orders: Iterable[float]) -> np.ndarray:
        """Renyi DP of the round at each order (Proposition 14; replace-one neighbours)."""
        a = np.asarray(list(orders), dtype=np.float64)
        d2 = 2.0 * self.l2  # one device replaced
        d1 = d2 * math.sqrt(self.dim)  # an integer vector's L1 norm <= sqrt(d) x its L2
        ns = self.survivors * self.sigma2
        tau, d = self.tau, self.dim
        first = a * d2**2 / (2 * ns) + tau * d
        second = a / 2 * (d2**2 / ns + 2 * d1 * tau / math.sqrt(ns) + tau**2 * d)
        third = a / 2 * (d2 / math.sqrt(ns) + tau * math.sqrt(d)) ** 2
        out: np.ndarray = np.minimum(np.minimum(first, second), third)
        return out


def distributed_epsilon(rounds: Iterable[tuple[DistributedRound, int]], delta: float) -> float:
    """Epsilon at ``delta`` of ``(round, times)`` blocks composed (RDP adds, order by order)."""
    if not 0.0 < delta < 1.0:
        raise ValueError("delta must be in (0, 1)")
    orders = RdpAccountant().orders
    total = np.zeros(len(orders))
    for rnd, times in rounds:
        total += times * rnd.rdp(orders)
    if not total.any():
        return 0.0
    eps, _ = compute_epsilon(orders, total, delta)
    return float(eps)


def rounded_norm_bound(norm: float, dim: int, beta: float) -> float:
    """The L2 norm, in ring units, that a vector of norm ``norm`` keeps after unbiased
    stochastic rounding of its ``dim`` coordinates, except with probability ``beta``
    (Kairouz et al. 2021, conditional randomized rounding: a device rounds again until its
    vector is within it, which makes it a bound and not a likelihood)."""
    if not 0.0 < beta < 1.0:
        raise ValueError("beta must be in (0, 1)")
    spread = math.sqrt(2.0 * math.log(1.0 / beta))
    return math.sqrt(norm**2 + dim / 4 + spread * (norm + math.sqrt(dim) / 2))


def noise_headroom(devices: int, sigma2: float, dim: int, failure: float = 1e-12) -> int:
    """How far, in ring units, the summed noise of ``devices`` devices may move any of ``dim``
    coordinates, except with probability ``failure``: the discrete Gaussian is sub-Gaussian
    with variance at most ``sigma2`` (Canonne, Kamath, Steinke 2020), so a sum of ``devices``
    exceeds ``t`` in one coordinate with probability at most ``2 exp(-t^2 / (2 devices
    sigma2))``. The ring must hold the clipped sum plus this, or the noisy sum wraps."""
    if devices < 1 or dim < 1 or not 0.0 < failure < 1.0:
        raise ValueError("devices and dim must be positive, failure in (0, 1)")
    return math.ceil(math.sqrt(2.0 * devices * sigma2 * math.log(2.0 * dim / failure)))
