"""Labelled data sets as the fleet sees them, and the real one it ships with (sklearn digits).

A :class:`Dataset` is a pair of arrays in the dtypes bundles expect (float32 features, int64
labels) with the number of classes. Partitioners (:mod:`fedge.fleet.partition`) and the
FedProx generator (:mod:`fedge.fleet.synthetic`) produce lists of them, one per device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Dataset", "load_digits", "stratified_split"]


@dataclass(frozen=True)
class Dataset:
    """Features ``x`` (float32, ``(n, features)``) and labels ``y`` (int64, ``(n,)``)."""

    x: np.ndarray
    y: np.ndarray
    num_classes: int

    def __post_init__(self) -> None:
        if self.x.ndim != 2 or self.y.ndim != 1 or len(self.x) != len(self.y):
            raise ValueError(f"x {self.x.shape} and y {self.y.shape} do not form a data set")
        if len(self.y) and (self.y.min() < 0 or self.y.max() >= self.num_classes):
            raise ValueError(f"labels outside [0, {self.num_classes})")

    def __len__(self) -> int:
        return len(self.y)

    @property
    def num_features(self) -> int:
        return int(self.x.shape[1])

    def subset(self, indices: np.ndarray) -> Dataset:
        return Dataset(self.x[indices], self.y[indices], self.num_classes)

    def label_counts(self) -> np.ndarray:
        return np.bincount(self.y, minlength=self.num_classes)

    @staticmethod
    def concat(parts: Sequence[Dataset]) -> Dataset:
        if not parts:
            raise ValueError("nothing to concatenate")
        return Dataset(
            np.concatenate([p.x for p in parts]),
            np.concatenate([p.y for p in parts]),
            max(p.num_classes for p in parts),
        )


def stratified_split(
    data: Dataset, test_fraction: float, rng: np.random.Generator
) -> tuple[Dataset, Dataset]:
    """Split into (train, test) keeping each class's share; each class gets >= 1 test example
    when it has at least two."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    test_parts = []
    for c in range(data.num_classes):
        members = rng.permutation(np.flatnonzero(data.y == c))
        k = round(test_fraction * len(members))
        if len(members) >= 2:
            k = min(max(k, 1), len(members) - 1)
        test_parts.append(members[:k])
    test_idx = np.sort(np.concatenate(test_parts)).astype(np.int64)
    train_mask = np.ones(len(data), dtype=bool)
    train_mask[test_idx] = False
    return data.subset(np.flatnonzero(train_mask)), data.subset(test_idx)


def load_digits(test_fraction: float = 0.25, seed: int = 0) -> tuple[Dataset, Dataset]:
    """scikit-learn's 1,797 handwritten 8x8 digits, pixels scaled to [0, 1], split
    (train, held-out test) stratified by class with ``seed``."""
    from sklearn.datasets import load_digits as sk_load_digits

    raw = sk_load_digits()
    # Pixel intensities are integers 0..16.
    data = Dataset(
        (np.asarray(raw.data, dtype=np.float64) / 16.0).astype(np.float32),
        np.asarray(raw.target, dtype=np.int64),
        10,
    )
    return stratified_split(data, test_fraction, np.random.default_rng(seed))
