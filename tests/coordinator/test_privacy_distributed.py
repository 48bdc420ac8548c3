"""The distributed discrete Gaussian ledger against dp-accounting computed independently."""

from __future__ import annotations

import math

import numpy as np
import pytest
from dp_accounting import dp_event
from dp_accounting.rdp import RdpAccountant
from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon

from coordinator.privacy_distributed import (
    DistributedRound,
    distributed_epsilon,
    noise_headroom,
    rounded_norm_bound,
)
from edge_sdk.secagg.dgauss import CryptoIntegers, sample


def test_with_enough_noise_it_is_the_gaussian_mechanism_of_the_survivors_noise() -> None:
    # sigma2 = 100 ring units: tau ~ 10 exp(-pi^2 100) underflows to 0, and the sum's noise
    # sqrt(n sigma2) against a replace-one sensitivity 2 L is a Gaussian with that multiplier.
    l2, n, sigma2, rounds = 40.0, 80, 100.0, 30
    rnd = DistributedRound(dim=1000, l2=l2, survivors=n, sigma2=sigma2)
    assert rnd.tau == 0.0
    acc = RdpAccountant()
    acc.compose(dp_event.GaussianDpEvent(math.sqrt(n * sigma2) / (2 * l2)), rounds)
    assert distributed_epsilon([(rnd, rounds)], 1e-5) == pytest.approx(
        acc.get_epsilon(1e-5), rel=1e-9
    )


def test_fewer_survivors_spend_more_and_composition_adds() -> None:
    base = DistributedRound(dim=500, l2=30.0, survivors=100, sigma2=64.0)
    fewer = DistributedRound(dim=500, l2=30.0, survivors=70, sigma2=64.0)
    assert distributed_epsilon([(fewer, 10)], 1e-5) > distributed_epsilon([(base, 10)], 1e-5)
    mixed = distributed_epsilon([(base, 5), (fewer, 5)], 1e-5)
    acc = RdpAccountant()
    for n in (100,) * 5 + (70,) * 5:
        acc.compose(dp_event.GaussianDpEvent(math.sqrt(n * 64.0) / 60.0))
    assert mixed == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)
    assert distributed_epsilon([], 1e-5) == 0.0


def test_small_sigma_pays_for_the_distance_from_a_discrete_gaussian() -> None:
    # sigma2 = 0.3: tau is not negligible; the bound is Proposition 14's, above the Gaussian's.
    rnd = DistributedRound(dim=20, l2=1.0, survivors=5, sigma2=0.3)
    tau = 10 * sum(math.exp(-2 * math.pi**2 * 0.3 * k / (k + 1)) for k in range(1, 5))
    assert rnd.tau == pytest.approx(tau, rel=1e-12)
    orders = RdpAccountant().orders
    d2, d1, ns = 2.0, 2.0 * math.sqrt(20), 5 * 0.3
    expected = np.minimum.reduce([
        orders * d2**2 / (2 * ns) + tau * 20,
        orders / 2 * (d2**2 / ns + 2 * d1 * tau / math.sqrt(ns) + tau**2 * 20),
        orders / 2 * (d2 / math.sqrt(ns) + tau * math.sqrt(20)) ** 2,
    ])  # fmt: skip
    assert np.allclose(rnd.rdp(orders), expected, rtol=1e-12)
    eps, _ = compute_epsilon(orders, 3 * expected, 1e-5)
    assert distributed_epsilon([(rnd, 3)], 1e-5) == pytest.approx(eps, rel=1e-12)
    acc = RdpAccountant()
    acc.compose(dp_event.GaussianDpEvent(math.sqrt(ns) / d2), 3)
    assert distributed_epsilon([(rnd, 3)], 1e-5) > acc.get_epsilon(1e-5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"dim": 0}, "dim"), ({"survivors": 0}, "survivors"), ({"l2": 0.0}, "l2"),
     ({"sigma2": 0.2}, "sigma")],
)
def test_bad_rounds_are_refused(kwargs: dict, message: str) -> None:
    args = {"dim": 10, "l2": 1.0, "survivors": 3, "sigma2": 1.0, **kwargs}
    with pytest.raises(ValueError, match=message):
        DistributedRound(**args)


def test_rounding_bound_holds_for_stochastic_rounding() -> None:
    rng = np.random.default_rng(1)
    dim, norm = 2000, 50.0
    x = rng.normal(size=dim)
    x *= norm / np.linalg.norm(x)
    bound = rounded_norm_bound(norm, dim, beta=1e-3)
    norms = [np.linalg.norm(np.floor(x + rng.random(dim))) for _ in range(300)]
    assert max(norms) <= bound and bound < norm + 30


def test_headroom_covers_the_summed_noise() -> None:
    n, sigma2, dim = 20, 400, 2000
    room = noise_headroom(n, sigma2, dim, failure=1e-6)
    total = sum(sample(sigma2, dim, CryptoIntegers(bytes([i]) * 32)) for i in range(n))
    assert np.abs(total).max() <= room
    assert room < 8 * math.sqrt(n * sigma2)
