"""The dataset interface: every example once per epoch, seeded shuffles, re-cut streams."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from edge_sdk.data import ArrayDataset, BatchStreamDataset, DatasetError, as_dataset


def _data(n: int = 103) -> tuple[np.ndarray, np.ndarray]:
    x = np.arange(n * 3, dtype=np.float32).reshape(n, 3)
    return x, np.arange(n)  # y[i] == i identifies the example


def test_an_epoch_visits_every_example_once_in_batches_of_the_size() -> None:
    x, y = _data()
    batches = list(ArrayDataset(x, y).batches(10, np.random.default_rng(0)))
    assert [len(b[1]) for b in batches] == [10] * 10 + [3]
    seen = np.concatenate([b[1] for b in batches])
    assert sorted(seen.tolist()) == list(range(103))
    for bx, by in batches:  # rows stay paired with their labels
        np.testing.assert_array_equal(bx, x[by])


def test_shuffle_is_seeded_and_differs_between_epochs() -> None:
    data = ArrayDataset(*_data())

    def order(rng: np.random.Generator) -> list[int]:
        return np.concatenate([b[1] for b in data.batches(16, rng)]).tolist()

    rng_a, rng_b = np.random.default_rng(7), np.random.default_rng(7)
    first = order(rng_a)
    assert first == order(rng_b)
    assert order(rng_a) != first  # the next epoch is another permutation
    assert first != list(range(103))


def test_stream_chunks_are_recut_to_the_batch_size_in_order() -> None:
    x, y = _data(50)
    cuts = [0, 7, 8, 30, 31, 50]  # chunks of 7, 1, 22, 1, 19
    stream = BatchStreamDataset(
        lambda: ((x[a:b], y[a:b]) for a, b in itertools.pairwise(cuts))
    )
    batches = list(stream.batches(12, np.random.default_rng(0)))
    assert [len(b[1]) for b in batches] == [12, 12, 12, 12, 2]
    np.testing.assert_array_equal(np.concatenate([b[1] for b in batches]), y)
    np.testing.assert_array_equal(np.concatenate([b[0] for b in batches]), x)
    assert stream.num_examples is None


def test_mismatched_or_empty_data_is_refused() -> None:
    with pytest.raises(DatasetError, match="examples"):
        ArrayDataset(np.zeros((4, 2)), np.zeros(3))
    with pytest.raises(DatasetError, match="empty"):
        ArrayDataset(np.zeros((0, 2)), np.zeros(0))
    bad = BatchStreamDataset(lambda: [(np.zeros((2, 2)), np.zeros(3))])
    with pytest.raises(DatasetError):
        list(bad.batches(4, np.random.default_rng(0)))
    with pytest.raises(DatasetError, match="batch_size"):
        list(ArrayDataset(*_data()).batches(0, np.random.default_rng(0)))


def test_npz_loading_and_as_dataset(tmp_path: Path) -> None:
    x, y = _data(20)
    path = tmp_path / "local.npz"
    np.savez(path, x=x, y=y)
    for data in (as_dataset(path), as_dataset(str(path)), as_dataset((x, y))):
        assert isinstance(data, ArrayDataset) and data.num_examples == 20
        np.testing.assert_array_equal(data.x, x)
    np.savez(tmp_path / "other.npz", features=x)
    with pytest.raises(DatasetError, match="lacks"):
        ArrayDataset.from_npz(tmp_path / "other.npz")
    with pytest.raises(DatasetError, match="cannot use"):
        as_dataset([1, 2, 3])  # type: ignore[arg-type]


def test_npz_with_pickled_objects_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.npz"
    np.savez(path, x=np.array([{"a": 1}], dtype=object), y=np.zeros(1))
    with pytest.raises(ValueError, match="pickle"):
        ArrayDataset.from_npz(path)
