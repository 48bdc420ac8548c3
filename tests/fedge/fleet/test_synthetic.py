"""FedProx Synthetic(alpha, beta): shapes, the paper's statistics, linear labels, determinism."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from fedge.fleet.partition import label_skew
from fedge.fleet.synthetic import NUM_CLASSES, NUM_FEATURES, fedprox_synthetic


def test_shapes_dtypes_and_sample_counts() -> None:
    devices = fedprox_synthetic(0.5, 0.5, 30, seed=0)
    assert len(devices) == 30
    for d in devices:
        assert d.x.shape == (len(d), NUM_FEATURES) and d.x.dtype == np.float32
        assert d.y.dtype == np.int64 and d.num_classes == NUM_CLASSES
        assert len(d) >= 50
    counts = np.array([len(d) for d in devices])
    # LogNormal(4, 2) + 50 is heavy-tailed: the mean is far above the median.
    assert counts.mean() > 1.5 * np.median(counts)
    capped = fedprox_synthetic(0.5, 0.5, 30, seed=0, max_samples=200)
    assert max(len(d) for d in capped) <= 200


def test_feature_covariance_is_diag_j_pow_minus_1_2() -> None:
    (device,) = fedprox_synthetic(1.0, 1.0, 1, seed=4, min_samples=40_000, lognormal_sigma=0.0)
    var = device.x.astype(np.float64).var(axis=0)
    expected = np.arange(1, NUM_FEATURES + 1) ** -1.2
    np.testing.assert_allclose(var, expected, rtol=0.05)
    cov = np.cov(device.x.T.astype(np.float64))
    off = cov - np.diag(np.diag(cov))
    assert np.abs(off).max() < 0.02


def test_beta_spreads_the_feature_means_across_devices() -> None:
    def spread(beta: float) -> float:
        devices = fedprox_synthetic(0.0, beta, 200, seed=1, max_samples=100)
        # mean over features of v_k is B_k + N(0, 1/60): its variance is beta^2 + 1/60.
        return float(np.var([d.x.mean() for d in devices]))

    assert spread(0.0) < 0.05
    assert spread(1.0) == pytest.approx(1.0 + 1 / 60, rel=0.3)


def test_labels_are_a_linear_function_of_features_per_device() -> None:
    devices = fedprox_synthetic(1.0, 1.0, 5, seed=2, min_samples=3_000, max_samples=3_000)
    for d in devices:
        if len(np.unique(d.y)) < 2:
            continue
        clf = LogisticRegression(C=1e4, max_iter=5_000).fit(d.x, d.y)
        assert clf.score(d.x, d.y) > 0.97


def test_non_iid_is_more_label_skewed_than_iid() -> None:
    def skew(**kw: object) -> float:
        devices = fedprox_synthetic(1.0, 1.0, 40, seed=5, max_samples=400, **kw)  # type: ignore[arg-type]
        y = np.concatenate([d.y for d in devices])
        offsets = np.cumsum([0] + [len(d) for d in devices])
        parts = [np.arange(offsets[i], offsets[i + 1]) for i in range(len(devices))]
        return label_skew(y, parts, NUM_CLASSES)

    assert skew(iid=True) < 0.3
    assert skew() > skew(iid=True) + 0.2


def test_deterministic_per_seed_and_rejects_bad_arguments() -> None:
    a = fedprox_synthetic(0.5, 0.5, 10, seed=7)
    b = fedprox_synthetic(0.5, 0.5, 10, seed=7)
    c = fedprox_synthetic(0.5, 0.5, 10, seed=8)
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x.x, y.x) and np.array_equal(x.y, y.y)
    assert not np.array_equal(a[0].x[:50], c[0].x[:50])
    with pytest.raises(ValueError):
        fedprox_synthetic(-1.0, 0.5, 10, seed=0)
    with pytest.raises(ValueError):
        fedprox_synthetic(0.5, 0.5, 0, seed=0)
