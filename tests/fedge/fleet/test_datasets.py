"""The digits loader and the stratified split."""

from __future__ import annotations

import numpy as np
import pytest

from fedge.fleet.datasets import Dataset, load_digits, stratified_split


def test_digits_split_is_scaled_stratified_and_disjoint() -> None:
    train, test = load_digits(test_fraction=0.25, seed=0)
    assert len(train) + len(test) == 1797
    assert train.x.dtype == np.float32 and train.y.dtype == np.int64
    assert train.num_features == 64 and train.num_classes == 10
    assert train.x.min() >= 0.0 and train.x.max() <= 1.0 and train.x.max() > 0.9
    # Every class keeps its share in the test split (within one example).
    pooled = train.label_counts() + test.label_counts()
    assert np.all(np.abs(test.label_counts() - 0.25 * pooled) <= 1)
    # No example is in both: compare rows.
    rows = {r.tobytes() for r in train.x}
    assert sum(r.tobytes() in rows for r in test.x) < 5  # digits has a few duplicate images


def test_digits_split_depends_on_seed_only() -> None:
    a, _ = load_digits(seed=1)
    b, _ = load_digits(seed=1)
    c, _ = load_digits(seed=2)
    assert np.array_equal(a.x, b.x) and not np.array_equal(a.x, c.x)


def test_dataset_rejects_inconsistent_arrays() -> None:
    with pytest.raises(ValueError):
        Dataset(np.zeros((3, 2), np.float32), np.zeros(4, np.int64), 2)
    with pytest.raises(ValueError):
        Dataset(np.zeros((3, 2), np.float32), np.array([0, 1, 2]), 2)
    with pytest.raises(ValueError):
        stratified_split(Dataset(np.zeros((3, 2), np.float32), np.zeros(3, np.int64), 1), 1.0,
                         np.random.default_rng(0))
