"""The app's local data as the client sees it: a small dataset interface over numpy.

Two kinds, both yielding ``(x, y)`` numpy batches of the plan's batch size:

* :class:`ArrayDataset` holds arrays (or an ``.npz`` file's) and reshuffles every epoch from a
  seeded generator, so a round is reproducible for a given seed;
* :class:`BatchStreamDataset` wraps a callable that returns a fresh iterable of ``(x, y)`` chunks
  per epoch (a data loader, a generator reading files); chunks of any size are re-cut to the
  plan's batch size and used in the stream's own order (no shuffling: the stream owns it).

Usage::

    data = ArrayDataset(x_train, y_train)
    data = ArrayDataset.from_npz("local.npz")           # arrays "x" and "y"
    data = BatchStreamDataset(lambda: my_loader(), num_examples=5000)
    for x, y in data.batches(32, np.random.default_rng(0)):
        ...
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

__all__ = ["ArrayDataset", "BatchStreamDataset", "Dataset", "DatasetError", "as_dataset"]

Batch = tuple[np.ndarray, np.ndarray]


class DatasetError(ValueError):
    """Data the client cannot train on: mismatched lengths, empty, missing arrays."""


class Dataset(ABC):
    """What local training and evaluation need from the app's data."""

    @property
    @abstractmethod
    def num_examples(self) -> int | None:
        """Examples in one epoch, or None when the stream does not know."""

    @abstractmethod
    def batches(self, batch_size: int, rng: np.random.Generator) -> Iterator[Batch]:
        """One epoch of batches of ``batch_size`` (the last one may be smaller)."""


def _check_pair(x: np.ndarray, y: np.ndarray) -> None:
    if x.ndim == 0 or y.ndim == 0:
        raise DatasetError("x and y need a leading example axis")
    if len(x) != len(y):
        raise DatasetError(f"x has {len(x)} examples but y has {len(y)}")


class ArrayDataset(Dataset):
    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        x, y = np.asarray(x), np.asarray(y)
        _check_pair(x, y)
        if len(x) == 0:
            raise DatasetError("the dataset is empty")
        self.x = x
        self.y = y

    @classmethod
    def from_npz(cls, path: Path | str, *, x_key: str = "x", y_key: str = "y") -> ArrayDataset:
        # allow_pickle=False: a data file must never be able to run code on the device.
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in (x_key, y_key) if k not in f.files]
            if missing:
                raise DatasetError(f"{path} lacks arrays {missing} (has {sorted(f.files)})")
            return cls(f[x_key], f[y_key])

    @property
    def num_examples(self) -> int:
        return len(self.x)

    def batches(self, batch_size: int, rng: np.random.Generator) -> Iterator[Batch]:
        if batch_size < 1:
            raise DatasetError(f"batch_size must be at least 1, got {batch_size}")
        order = rng.permutation(len(self.x))
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            yield self.x[idx], self.y[idx]


class BatchStreamDataset(Dataset):
    def __init__(
        self, epoch: Callable[[], Iterable[Batch]], *, num_examples: int | None = None
    ) -> None:
        self._epoch = epoch
        self._num_examples = num_examples

    @property
    def num_examples(self) -> int | None:
        return self._num_examples

    def batches(self, batch_size: int, rng: np.random.Generator) -> Iterator[Batch]:
        if batch_size < 1:
            raise DatasetError(f"batch_size must be at least 1, got {batch_size}")
        xs: list[np.ndarray] = []
        ys: list[np.ndarray] = []
        held = 0
        for chunk in self._epoch():
            x, y = (np.asarray(a) for a in chunk)
            _check_pair(x, y)
            xs.append(x)
            ys.append(y)
            held += len(x)
            if held < batch_size:
                continue
            x_all, y_all = np.concatenate(xs), np.concatenate(ys)
            cut = held - held % batch_size
            for start in range(0, cut, batch_size):
                yield x_all[start : start + batch_size], y_all[start : start + batch_size]
            xs, ys, held = [x_all[cut:]], [y_all[cut:]], held - cut
        if held:
            yield np.concatenate(xs), np.concatenate(ys)


def as_dataset(data: Dataset | tuple[np.ndarray, np.ndarray] | Path | str) -> Dataset:
    """A :class:`Dataset` from what an app has: a dataset, ``(x, y)`` or an ``.npz`` path."""
    if isinstance(data, Dataset):
        return data
    if isinstance(data, str | Path):
        return ArrayDataset.from_npz(data)
    if isinstance(data, tuple) and len(data) == 2:
        return ArrayDataset(*data)
    raise DatasetError(f"cannot use {type(data).__name__} as a dataset: give (x, y) or a Dataset")
