"""Where a fleet's device data comes from, as picklable recipes a worker process can run.

A fleet split over processes (:mod:`fedge.fleet.processes`) does not ship arrays to its
workers: each worker calls its data source for its own slice of device indices
(``source(first, count)`` returns one :class:`~fedge.fleet.datasets.Dataset` per device), so a
50,000-device fleet costs no pickled copies. Every source is deterministic in its arguments:
device ``i`` gets the same data whichever process builds it.

* :class:`NpzPartitions` — the user's own partitions: a directory with one ``.npz`` per device
  (arrays ``x`` and ``y``, as :meth:`edge_sdk.data.ArrayDataset.from_npz` reads), devices in
  file-name order;
* :class:`DigitsPartitions` — scikit-learn digits split by a partition spec
  (:func:`fedge.fleet.partition.partition`);
* :class:`DigitsWindows` — ``size`` consecutive digits per device from a rotating offset, for
  fleets far larger than the data set (idle-capacity and 50,000-device runs);
* :class:`FedProxSynthetic` — the FedProx synthetic generator.
"""

from __future__ import annotations

import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from fedge.fleet.datasets import Dataset, load_digits
from fedge.fleet.partition import partition
from fedge.fleet.synthetic import fedprox_synthetic

__all__ = [
    "DataSource",
    "DigitsPartitions",
    "DigitsWindows",
    "FedProxSynthetic",
    "NpzPartitions",
    "SourceError",
]


class SourceError(ValueError):
    """A data source that cannot give the devices asked for (missing, malformed files)."""


class DataSource(Protocol):
    """Device data by global index: ``source(first, count)`` is devices first..first+count-1."""

    @property
    def devices(self) -> int | None:
        """How many devices the source holds (None: any number)."""
        ...

    def __call__(self, first: int, count: int) -> Sequence[Dataset]: ...


def _check_slice(source: DataSource, first: int, count: int) -> None:
    total = source.devices
    if first < 0 or count < 0 or (total is not None and first + count > total):
        raise SourceError(f"devices {first}..{first + count - 1} are outside 0..{total}")


@dataclass(frozen=True)
class NpzPartitions:
    """One ``.npz`` file per device in ``directory`` (arrays ``x``: features, ``y``: integer
    labels), sorted by file name; ``num_classes`` defaults to the largest label + 1 over all
    files (read once, from the labels only)."""

    directory: Path
    num_classes: int | None = None

    def __post_init__(self) -> None:
        if not self.files():
            raise SourceError(f"{self.directory}: no .npz files (one per device expected)")

    def files(self) -> list[Path]:
        d = Path(self.directory)
        if not d.is_dir():
            raise SourceError(f"{d} is not a directory")
        return sorted(d.glob("*.npz"))

    @property
    def devices(self) -> int:
        return len(self.files())

    def classes(self) -> int:
        if self.num_classes is not None:
            return self.num_classes
        labels = (self._arrays(f, features=False)[1] for f in self.files())
        return 1 + max(int(np.max(y, initial=0)) for y in labels)

    @staticmethod
    def _arrays(path: Path, features: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """x and y of one file; without ``features`` only y is read (x comes back empty)."""
        try:
            with np.load(path, allow_pickle=False) as z:
                y = np.asarray(z["y"])
                x = np.asarray(z["x"], np.float32) if features else np.empty((0, 0), np.float32)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            raise SourceError(f"{path}: not an .npz with arrays x and y ({e})") from e
        if not np.issubdtype(y.dtype, np.integer):
            raise SourceError(f"{path}: labels y must be integers, got {y.dtype}")
        # Shapes before lengths: len() of a 0-d array raises TypeError, and a column or
        # one-hot y would pass every later check only to fail as its device's data set.
        if y.ndim != 1:
            raise SourceError(f"{path}: labels y must be one integer per example (shape (n,)), "
                              f"got shape {y.shape}")
        if features and x.ndim == 0:
            raise SourceError(f"{path}: x must hold one row per example, got a scalar")
        x = x.reshape(len(x), -1) if x.ndim != 2 and len(x) else x
        return x, y.astype(np.int64)

    def check(self) -> int:
        """Every file read once, before any device starts (a bad one would otherwise fail
        its device mid-run, or its part of the fleet after the others registered): x and y
        of one length, not empty, finite, labels from 0 (below ``num_classes`` if given),
        and every file's examples shaped as the first file's. Labels the model has no
        class for show only once its bundle is known.

        Returns the number of classes (as :meth:`classes`), so that a caller can fix
        ``num_classes`` and the processes of a fleet need not read every file's labels
        again."""
        shape: tuple[int, ...] | None = None
        top = -1
        for path in self.files():
            x, y = self._arrays(path)
            if len(x) == 0 or len(x) != len(y):
                raise SourceError(f"{path}: {len(x)} examples in x, {len(y)} labels in y "
                                  "(one or more of each, as many labels as examples)")  # fmt: skip
            if not np.isfinite(x).all():
                raise SourceError(f"{path}: x holds NaN or Inf")
            if y.min() < 0 or (self.num_classes is not None and y.max() >= self.num_classes):
                below = "" if self.num_classes is None else f" below {self.num_classes}"
                raise SourceError(f"{path}: labels must be from 0{below}, "
                                  f"found {y.min()}..{y.max()}")  # fmt: skip
            top = max(top, int(y.max()))
            if shape is None:
                shape, first = x.shape[1:], path
            elif x.shape[1:] != shape:
                raise SourceError(f"{path}: examples of shape {x.shape[1:]}, but "
                                  f"{first.name}'s are {shape}")  # fmt: skip
        return self.num_classes if self.num_classes is not None else top + 1

    def __call__(self, first: int, count: int) -> list[Dataset]:
        _check_slice(self, first, count)
        classes = self.classes()
        out = []
        for path in self.files()[first : first + count]:
            x, y = self._arrays(path)
            try:
                out.append(Dataset(x, y, classes))
            except ValueError as e:
                raise SourceError(f"{path}: {e}") from e
        return out


@dataclass(frozen=True)
class DigitsPartitions:
    """The training digits split over ``num_devices`` by ``spec`` (e.g. ``dirichlet:1.0``)."""

    num_devices: int
    spec: str = "dirichlet:0.5"
    seed: int = 0

    @property
    def devices(self) -> int:
        return self.num_devices

    def __call__(self, first: int, count: int) -> list[Dataset]:
        _check_slice(self, first, count)
        train, _ = load_digits(seed=self.seed)
        parts = partition(train.y, self.num_devices, self.spec, np.random.default_rng(self.seed))
        return [train.subset(p) for p in parts[first : first + count]]


@dataclass(frozen=True)
class DigitsWindows:
    """Device ``i`` holds ``size`` consecutive training digits from offset ``i * size``
    (wrapping): any number of devices, each with a small real data set."""

    size: int = 8
    seed: int = 0

    @property
    def devices(self) -> None:
        return None

    def __call__(self, first: int, count: int) -> list[Dataset]:
        _check_slice(self, first, count)
        train, _ = load_digits(seed=self.seed)
        n = len(train)
        return [train.subset((i * self.size + np.arange(self.size)) % n)
                for i in range(first, first + count)]


@dataclass(frozen=True)
class FedProxSynthetic:
    """FedProx's synthetic (alpha, beta) data for ``num_devices`` devices."""

    num_devices: int
    alpha: float
    beta: float
    seed: int = 0
    max_samples: int = 1000

    @property
    def devices(self) -> int:
        return self.num_devices

    def __call__(self, first: int, count: int) -> list[Dataset]:
        _check_slice(self, first, count)
        every = fedprox_synthetic(self.alpha, self.beta, self.num_devices, seed=self.seed,
                                  max_samples=self.max_samples)
        return list(every[first : first + count])
