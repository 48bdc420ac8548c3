"""One assignment's local work: the task's plan, run on the app's data with a trainer.

:class:`Plan` parses the ``plan`` object of an assignment (``docs/protocol.md``);
:func:`train` runs it (epochs or a step count, the plan's batch size, ``lr * lr_decay**round``,
FedProx through :meth:`Trainer.set_proximal`) and calls ``recheck`` every
``recheck_every_steps`` steps so the client can stop as soon as the device stops being eligible;
:func:`evaluate` runs the eval graph over the data in batches.

The trainer may be shared with other clients (the fleet emulator keeps one per bundle): every
call here sets the parameters, resets the optimizer and sets the proximal term first, so no
state leaks from one client's round into another's.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from edge_sdk.codecs import CodecSpec
from edge_sdk.data import Batch, Dataset
from edge_sdk.errors import ConditionsLapsed
from edge_sdk.trainers.base import BundleNotSupported, Trainer

__all__ = ["EvalResult", "Plan", "PlanError", "TrainResult", "evaluate", "train"]

# Rows per eval-graph call: the eval graphs take any batch size; this bounds memory.
EVAL_BATCH = 256


_FP32 = CodecSpec("fp32")


class PlanError(ValueError):
    """An assignment's plan the device cannot run (missing fields, out-of-range values)."""


@dataclass(frozen=True)
class Plan:
    batch_size: int
    lr: float
    epochs: int | None = 1
    steps: int | None = None
    lr_decay: float = 1.0
    prox_mu: float = 0.0
    codec: CodecSpec = _FP32
    recheck_every_steps: int = 0  # 0: never re-check during training

    def __post_init__(self) -> None:
        if (self.epochs is None) == (self.steps is None):
            raise PlanError("a plan needs exactly one of 'epochs' and 'steps'")
        for name in ("epochs", "steps", "batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise PlanError(f"plan {name!r} must be at least 1, got {value}")
        for name in ("lr", "lr_decay", "prox_mu"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise PlanError(f"plan {name!r} must be a finite number >= 0, got {value}")
        if self.recheck_every_steps < 0:
            raise PlanError("plan 'recheck_every_steps' must be >= 0")

    @classmethod
    def from_json(cls, obj: Any) -> Plan:
        if not isinstance(obj, dict):
            raise PlanError(f"plan must be an object, got {type(obj).__name__}")

        def num(key: str, default: float | None, kind: type) -> Any:
            value = obj.get(key, default)
            if value is None:
                return None
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise PlanError(f"plan {key!r} must be a number, got {value!r}")
            if kind is int and not (math.isfinite(value) and value == int(value)):
                raise PlanError(f"plan {key!r} must be an integer, got {value!r}")
            return kind(value)

        if "lr" not in obj:
            raise PlanError("plan lacks 'lr'")
        try:
            # A step count, when given, replaces epochs (the coordinator sends both keys).
            steps = num("steps", None, int)
            epochs = None if steps is not None else num("epochs", 1, int)
            return cls(
                batch_size=num("batch_size", 32, int),
                lr=num("lr", None, float),
                epochs=epochs,
                steps=steps,
                lr_decay=num("lr_decay", 1.0, float),
                prox_mu=num("prox_mu", 0.0, float),
                codec=CodecSpec.from_json(obj.get("codec", "fp32")),
                recheck_every_steps=num("recheck_every_steps", 0, int) or 0,
            )
        except ValueError as e:  # CodecSpecError is one
            raise PlanError(str(e)) from e

    def lr_for_round(self, round_: int) -> float:
        return self.lr * self.lr_decay ** max(round_, 0)


@dataclass(frozen=True)
class TrainResult:
    loss: float  # mean batch loss over the steps, weighted by batch size
    num_examples: int  # the dataset's size if it knows it, else examples seen
    examples_seen: int
    steps: int


@dataclass(frozen=True)
class EvalResult:
    loss: float
    num_examples: int
    accuracy: float | None


def _plan_batches(data: Dataset, plan: Plan, rng: np.random.Generator) -> Iterator[Batch]:
    if plan.epochs is not None:
        for _ in range(plan.epochs):
            yield from data.batches(plan.batch_size, rng)
        return
    assert plan.steps is not None
    left = plan.steps
    while left:
        seen = 0
        for batch in data.batches(plan.batch_size, rng):
            yield batch
            seen += 1
            left -= 1
            if not left:
                return
        if not seen:
            return  # an empty epoch would loop forever


def _prepare(trainer: Trainer, start: np.ndarray, mu: float) -> None:
    trainer.set_parameters(start)
    trainer.reset_optimizer()
    if mu > 0:
        trainer.set_proximal(start, mu)
        return
    # A backend without the term has none to clear.
    with contextlib.suppress(BundleNotSupported):
        trainer.set_proximal(None, 0.0)


def train(
    trainer: Trainer,
    data: Dataset,
    plan: Plan,
    start: np.ndarray,
    *,
    round_: int,
    rng: np.random.Generator,
    recheck: Callable[[], tuple[str, ...]] | None = None,
) -> TrainResult:
    """Run ``plan`` from parameters ``start``; the trainer holds the result afterwards.

    ``recheck`` returns the reasons the device is no longer eligible (empty while it is); a
    non-empty answer raises :class:`ConditionsLapsed` before the next step.
    """
    _prepare(trainer, start, plan.prox_mu)
    lr = plan.lr_for_round(round_)
    total_loss = 0.0
    seen = 0
    steps = 0
    every = plan.recheck_every_steps
    for x, y in _plan_batches(data, plan, rng):
        if recheck is not None and every and steps and steps % every == 0:
            reasons = recheck()
            if reasons:
                raise ConditionsLapsed(tuple(reasons), step=steps)
        loss = trainer.train_step(x, y, lr=lr)
        if not math.isfinite(loss):
            raise FloatingPointError(f"training loss became {loss} at step {steps}")
        total_loss += float(loss) * len(x)
        seen += len(x)
        steps += 1
    if not steps:
        raise PlanError("the plan ran no step: the dataset yielded no batch")
    known = data.num_examples
    return TrainResult(
        loss=total_loss / seen,
        num_examples=known if known is not None else seen,
        examples_seen=seen,
        steps=steps,
    )


def evaluate(trainer: Trainer, data: Dataset, params: np.ndarray) -> EvalResult:
    """The model ``params`` on all of ``data``: example-weighted loss and accuracy."""
    trainer.set_parameters(params)
    total_loss = 0.0
    correct = 0.0
    n = 0
    has_accuracy = True
    for x, y in data.batches(EVAL_BATCH, np.random.default_rng(0)):
        metrics = trainer.evaluate(x, y)
        k = int(metrics["num_examples"])
        total_loss += float(metrics["loss"]) * k
        if "accuracy" in metrics and metrics["accuracy"] is not None:
            correct += float(metrics["accuracy"]) * k
        else:
            has_accuracy = False
        n += k
    if not n:
        raise PlanError("nothing to evaluate: the dataset yielded no batch")
    accuracy = correct / n if has_accuracy else None
    return EvalResult(loss=total_loss / n, num_examples=n, accuracy=accuracy)
