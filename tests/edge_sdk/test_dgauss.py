"""The exact discrete Gaussian sampler against its pmf, and noise added in the ring."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from scipy import stats

from edge_sdk.secagg import ring
from edge_sdk.secagg.dgauss import CryptoIntegers, add_noise, bernoulli_exp, sample


def pmf(sigma2: float, support: np.ndarray) -> np.ndarray:
    """N_Z(0, sigma2) on ``support`` (normalised over a range far beyond the tails)."""
    wide = np.arange(-int(40 * math.sqrt(sigma2)) - 40, int(40 * math.sqrt(sigma2)) + 41)
    z = np.exp(-(wide.astype(np.float64) ** 2) / (2 * sigma2)).sum()
    return np.exp(-(support.astype(np.float64) ** 2) / (2 * sigma2)) / z


@pytest.mark.parametrize("sigma2", [Fraction(1, 2), Fraction(3), Fraction(50)])
def test_draws_follow_the_exact_pmf(sigma2: Fraction) -> None:
    n = 12_000
    x = sample(sigma2, n, CryptoIntegers(bytes(31) + bytes([int(sigma2)])))
    s = float(sigma2)
    cut = max(1, int(2.5 * math.sqrt(s)))  # bins: ..., -cut-1 or less | each value | cut+1 ...
    values = np.arange(-cut, cut + 1)
    p = pmf(s, values)
    tail = (1.0 - p.sum()) / 2
    observed = [int(np.sum(x < -cut))] + [int(np.sum(x == v)) for v in values] + [
        int(np.sum(x > cut))
    ]
    expected = n * np.array([tail, *p, tail])
    keep = expected > 5  # chi-square wants enough expected counts per bin
    chi2 = stats.chisquare(np.array(observed)[keep], expected[keep] * (n / expected[keep].sum()))
    assert chi2.pvalue > 1e-4
    # symmetry and the variance of N_Z (a little below sigma2 for small sigma2)
    wide = np.arange(-int(40 * math.sqrt(s)) - 40, int(40 * math.sqrt(s)) + 41)
    variance = float(np.sum(wide.astype(np.float64) ** 2 * pmf(s, wide)))
    assert abs(x.mean()) < 5 * math.sqrt(variance / n)
    assert x.var() == pytest.approx(variance, rel=5 * math.sqrt(2 / n))


def test_large_sigma_has_the_continuous_variance() -> None:
    x = sample(10**8, 4000, CryptoIntegers(bytes(range(32))))
    assert x.dtype == np.int64
    assert x.var() == pytest.approx(1e8, rel=0.1)
    assert stats.kstest(x / 1e4, "norm").pvalue > 1e-4


def test_bernoulli_exp_is_exact_in_frequency() -> None:
    rng = CryptoIntegers(bytes(32))
    for gamma in (Fraction(0), Fraction(1, 3), Fraction(1), Fraction(5, 2)):
        n = 20_000
        hits = sum(bernoulli_exp(gamma, rng) for _ in range(n))
        p = math.exp(-float(gamma))
        assert abs(hits / n - p) < 5 * math.sqrt(p * (1 - p) / n) + 1e-9


def test_uniform_integers_are_uniform_and_fresh_keys_differ() -> None:
    rng = CryptoIntegers(bytes(32))
    x = np.array([rng.below(7) for _ in range(14_000)])
    assert stats.chisquare(np.bincount(x, minlength=7)).pvalue > 1e-4
    big = [rng.below(3 * 2**70) for _ in range(2000)]  # several words per draw
    assert max(big) < 3 * 2**70 and max(big) > 2**70
    assert [CryptoIntegers().below(2**60) for _ in range(2)] != [0, 0]
    a, b = sample(100, 50), sample(100, 50)  # os.urandom keys: never the same noise
    assert not np.array_equal(a, b)
    for bad in (0, -3):
        with pytest.raises(ValueError):
            rng.below(bad)
    with pytest.raises(ValueError):
        CryptoIntegers(bytes(16))
    with pytest.raises(ValueError):
        sample(0, 3)


def test_noise_goes_into_the_ring_and_leaves_the_weight_alone() -> None:
    spec = ring.RingSpec.for_cohort(cohort=10, clip=1.0, levels=2**10, max_weight=5)
    rng = np.random.default_rng(0)
    delta = rng.normal(0, 0.1, 300)
    v = ring.encode(delta, 5, spec, rng)
    noisy = add_noise(v, 400, spec.bits, CryptoIntegers(bytes(32)))
    again = sample(400, len(v) - 1, CryptoIntegers(bytes(32)))  # the same draws
    modulus = 1 << spec.bits
    centred = (noisy.astype(object) - v.astype(object)) % modulus
    centred = np.array([int(c) - modulus if c >= modulus // 2 else int(c) for c in centred])
    assert np.array_equal(centred[:-1], again) and centred[-1] == 0
    assert noisy.max() < modulus
    # the sum of noisy vectors decodes to the sum plus the summed noise
    total = (v.astype(object) + noisy.astype(object)) % modulus
    plain = (2 * v.astype(object)) % modulus
    diff = [(int(a) - int(b)) % modulus for a, b in zip(total, plain, strict=True)]
    diff = [d - modulus if d >= modulus // 2 else d for d in diff]
    assert diff[:-1] == again.tolist()
