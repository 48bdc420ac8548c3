"""What the federated model is measured against, trained with the real device runtime.

* **local-only**: every device trains the model on its own partition alone, from the same
  initial parameters with the same local recipe (batch size, learning rate); the figure is the
  mean over devices of held-out accuracy. This is what each site gets by itself.
* **centralized**: the same model and recipe on the pooled training data: what the data could
  give if it were collected in one place.

The caller sets the budgets (:class:`Recipe`); the demo gives each device as many local steps
as the federation would have given it had it been selected every round, and the centralized
model as many steps as all the federation's counted updates together.

Both run :func:`edge_sdk.local_training.train` on a trainer from
:func:`edge_sdk.trainers.load_trainer` (the runtime the devices use, not torch), so the
comparison differs only in where the data is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from edge_sdk.data import ArrayDataset
from edge_sdk.local_training import Plan, evaluate, train
from edge_sdk.trainers.base import Trainer
from fedge.fleet.datasets import Dataset

__all__ = ["Recipe", "centralized", "local_only", "test_accuracy"]


@dataclass(frozen=True)
class Recipe:
    """A training budget: ``epochs`` passes or ``steps`` steps (exactly one) of SGD at ``lr``
    in batches of ``batch_size``."""

    batch_size: int
    lr: float
    epochs: int | None = None
    steps: int | None = None

    def plan(self) -> Plan:
        return Plan(batch_size=self.batch_size, lr=self.lr, epochs=self.epochs, steps=self.steps)


def test_accuracy(trainer: Trainer, params: np.ndarray, test: Dataset) -> float:
    result = evaluate(trainer, ArrayDataset(test.x, test.y), params)
    if result.accuracy is None:
        raise ValueError("the bundle's eval graph reports no accuracy (not a classifier?)")
    return float(result.accuracy)


def _fit(
    trainer: Trainer, data: Dataset, start: np.ndarray, recipe: Recipe, seed: int
) -> np.ndarray:
    train(trainer, ArrayDataset(data.x, data.y), recipe.plan(), start, round_=0,
          rng=np.random.default_rng(seed))
    return trainer.get_parameters()


def centralized(
    trainer: Trainer, train_data: Dataset, test: Dataset, start: np.ndarray, recipe: Recipe,
    seed: int = 0,
) -> float:
    return test_accuracy(trainer, _fit(trainer, train_data, start, recipe, seed), test)


def local_only(
    trainer: Trainer, parts: Sequence[Dataset], test: Dataset, start: np.ndarray, recipe: Recipe,
    seed: int = 0,
) -> list[float]:
    """Held-out accuracy of each device's own model (take the mean for the baseline)."""
    return [
        test_accuracy(trainer, _fit(trainer, part, start, recipe, seed + i), test)
        for i, part in enumerate(parts)
    ]
