"""Baselines on the real runtime: accuracy checked by numpy, and bounds a skewed split implies."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_sdk.bundle import load_manifest
from edge_sdk.trainers import load_trainer
from fedge.fleet.baselines import Recipe, centralized, local_only
from fedge.fleet.baselines import test_accuracy as accuracy_of  # not collected as a test
from fedge.fleet.datasets import Dataset, load_digits
from fedge.fleet.partition import partition


@pytest.fixture(scope="module")
def digits() -> tuple[Dataset, Dataset]:
    return load_digits(seed=0)


def _numpy_accuracy(bundle: Path, params: np.ndarray, test: Dataset) -> float:
    w = {p.name: params[p.offset : p.offset + p.size].reshape(p.shape)
         for p in load_manifest(bundle).parameters}
    hidden = np.maximum(test.x @ w["fc1.weight"].T + w["fc1.bias"], 0.0)
    return float(np.mean(np.argmax(hidden @ w["fc2.weight"].T + w["fc2.bias"], 1) == test.y))


def test_test_accuracy_matches_a_numpy_forward_pass(
    digits_bundle: Path, digits: tuple[Dataset, Dataset]
) -> None:
    trainer = load_trainer(digits_bundle, backend="ort-step")
    rng = np.random.default_rng(0)
    _, test = digits
    for _ in range(3):
        params = rng.normal(0, 0.3, trainer.get_parameters().size).astype(np.float32)
        assert accuracy_of(trainer, params, test) == pytest.approx(
            _numpy_accuracy(digits_bundle, params, test), abs=1e-9)


def test_centralized_learns_digits_and_local_only_is_bounded_by_its_labels(
    digits_bundle: Path, digits: tuple[Dataset, Dataset]
) -> None:
    trainer = load_trainer(digits_bundle, backend="ort-step")
    start = trainer.get_parameters()
    train, test = digits
    assert centralized(trainer, train, test, start, Recipe(32, 0.3, epochs=15)) > 0.9
    parts = [train.subset(p) for p in
             partition(train.y, 10, "shards:2", np.random.default_rng(0))]
    accs = local_only(trainer, parts, test, start, Recipe(16, 0.3, epochs=30))
    assert len(accs) == 10
    for part, acc in zip(parts, accs, strict=True):
        # A model that saw only these labels is right at most on test digits with these labels
        # (plus chance hits on the others, which training gives no logit mass: a small slack).
        share = float(np.isin(test.y, np.unique(part.y)).mean())
        assert acc <= share + 0.05
    assert np.mean(accs) < 0.4
