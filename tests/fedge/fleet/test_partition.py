"""Partitioners: exact cover, determinism, and measured skew against the pooled label mix."""

from __future__ import annotations

import numpy as np
import pytest

from fedge.fleet.datasets import load_digits
from fedge.fleet.partition import (
    PartitionError,
    label_skew,
    partition,
)

SPECS = ["iid", "dirichlet:0.1", "dirichlet:1", "dirichlet:100", "shards:2", "shards:3",
         "quantity:1.5"]


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    train, _ = load_digits(seed=0)
    return train.y


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("clients", [1, 7, 50])
def test_every_example_exactly_once(labels: np.ndarray, spec: str, clients: int) -> None:
    parts = partition(labels, clients, spec, np.random.default_rng(3))
    assert len(parts) == clients
    joined = np.concatenate(parts)
    assert joined.dtype == np.int64
    assert np.array_equal(np.sort(joined), np.arange(len(labels)))
    assert all(len(p) >= 1 for p in parts)


@pytest.mark.parametrize("spec", SPECS)
def test_deterministic_per_seed(labels: np.ndarray, spec: str) -> None:
    a = partition(labels, 20, spec, np.random.default_rng(11))
    b = partition(labels, 20, spec, np.random.default_rng(11))
    c = partition(labels, 20, spec, np.random.default_rng(12))
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_label_skew_metric_on_hand_built_partitions() -> None:
    labels = np.array([0, 0, 1, 1])
    # Each client holds one class of a balanced two-class pool: TV = |1 - .5| = .5.
    assert label_skew(labels, [np.array([0, 1]), np.array([2, 3])], 2) == pytest.approx(0.5)
    assert label_skew(labels, [np.array([0, 2]), np.array([1, 3])], 2) == pytest.approx(0.0)


def test_label_skew_is_measured_and_ordered_by_alpha(labels: np.ndarray) -> None:
    def skew(spec: str) -> float:
        return np.mean([
            label_skew(labels, partition(labels, 20, spec, np.random.default_rng(s)), 10)
            for s in range(5)
        ])

    iid, strong, mild, weak = skew("iid"), skew("dirichlet:0.1"), skew("dirichlet:1"), \
        skew("dirichlet:100")
    assert iid < 0.15
    assert strong > 0.6
    assert strong > mild > weak
    assert weak < 0.15


def test_pathological_shards_give_few_labels_per_client(labels: np.ndarray) -> None:
    parts = partition(labels, 30, "shards:2", np.random.default_rng(0))
    distinct = [len(np.unique(labels[p])) for p in parts]
    # A shard may straddle a class boundary, so 2 shards span at most 4 labels.
    assert max(distinct) <= 4
    assert np.mean(distinct) <= 2.6
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 2


def test_quantity_skew_varies_sizes_not_labels(labels: np.ndarray) -> None:
    parts = partition(labels, 20, "quantity:1.5", np.random.default_rng(0))
    sizes = np.array([len(p) for p in parts])
    assert sizes.std() / sizes.mean() > 0.7
    equal = partition(labels, 20, "iid", np.random.default_rng(0))
    assert np.ptp([len(p) for p in equal]) <= 1
    big = [p for p in parts if len(p) >= 60]
    assert label_skew(labels, big, 10) < 0.25


@pytest.mark.parametrize(
    "spec, clients",
    [("dirichlet:0", 5), ("dirichlet:-1", 5), ("dirichlet", 5), ("shards:1.5", 5),
     ("bogus", 5), ("iid:3", 5), ("quantity:x", 5), ("iid", 0), ("iid", 10_000),
     ("shards:2", 1_000), ("shards:inf", 5), ("quantity:nan", 5), ("quantity:inf", 5),
     ("dirichlet:inf", 5)],
)
def test_bad_specs_are_rejected(labels: np.ndarray, spec: str, clients: int) -> None:
    with pytest.raises(PartitionError):
        partition(labels, clients, spec, np.random.default_rng(0))
