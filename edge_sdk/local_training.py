"""One assignment's local work: the task's plan, run on the app's data with a trainer.

:class:`Plan` parses the ``plan`` object of an assignment (``docs/protocol.md``);
:func:`train` runs it (epochs or a step count, the plan's batch size, ``lr * lr_decay**round``,
FedProx through :meth:`Trainer.set_proximal`) and calls ``recheck`` every
``recheck_every_steps`` steps so the client can stop as soon as the device stops being eligible;
:func:`evaluate` runs the eval graph over the data in batches.

The trainer may be shared with other clients (the fleet emulator keeps one per bundle): every
call here sets the parameters, resets the optimizer, the dropout seeds (from ``rng``) and the
proximal term first, so no state leaks from one client's round into another's.

Batch norm layers follow the plan's ``batchnorm``: ``"aggregate"`` trains them like every other
entry of the model vector (their running statistics are averaged with the parameters), and
``"local"`` is FedBN (Li et al., ICLR 2021): the layers' parameters and running statistics
stay on the device. The device then starts each round from the global model with its own batch
norm entries put in (:class:`LocalLayers`, kept in its state directory), saves them after
training, and reports no change for them, so the coordinator's aggregate never mixes them.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_sdk.codecs import CodecSpec
from edge_sdk.data import Batch, Dataset
from edge_sdk.durable import write_durably
from edge_sdk.errors import ConditionsLapsed
from edge_sdk.protocol import SAFE_ID
from edge_sdk.trainers.base import BundleNotSupported, Trainer

__all__ = [
    "BATCHNORM_MODES",
    "EvalResult",
    "LocalLayers",
    "Plan",
    "PlanError",
    "TrainResult",
    "evaluate",
    "train",
]

# Rows per eval-graph call: the eval graphs take any batch size; this bounds memory.
EVAL_BATCH = 256


_FP32 = CodecSpec("fp32")
BATCHNORM_MODES = ("aggregate", "local")


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
    batchnorm: str = "aggregate"  # or "local" (FedBN)

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
        if self.batchnorm not in BATCHNORM_MODES:
            raise PlanError(
                f"plan 'batchnorm' must be one of {', '.join(BATCHNORM_MODES)}, "
                f"got {self.batchnorm!r}"
            )

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
                batchnorm=obj.get("batchnorm", "aggregate"),
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


class LocalLayers:
    """A device's own batch norm entries of one task (FedBN), as a float32 ``.npy`` file::

    local = LocalLayers.for_task(state_dir, task_id)
    local.load(size)     # None before the first round (or after a model change)
    local.save(values)   # written to a temporary file, renamed into place, made durable
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @classmethod
    def for_task(cls, state_dir: Path | str, task_id: str) -> LocalLayers:
        if not SAFE_ID.match(task_id):
            raise ValueError(f"task id {task_id!r} is not safe as a file name")
        return cls(Path(state_dir) / "local_layers" / f"{task_id}.npy")

    def load(self, size: int) -> np.ndarray | None:
        try:
            values = np.load(self.path, allow_pickle=False)  # never unpickle from disk
        except (OSError, ValueError, EOFError):  # EOFError: an empty file
            return None
        if values.shape != (size,) or values.dtype != np.float32:
            return None  # another model's layers: start from the global ones
        return values

    def save(self, values: np.ndarray) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        out = io.BytesIO()
        np.save(out, np.asarray(values, np.float32), allow_pickle=False)
        # Durable, or a power cut could undo the save after the round's upload was
        # acknowledged: the device would train on with the layers of an earlier round.
        write_durably(self.path, out.getvalue())


def _with_local(
    trainer: Trainer, params: np.ndarray, mode: str, local: LocalLayers | None
) -> tuple[np.ndarray, np.ndarray]:
    """``params`` with the device's own batch norm entries under FedBN, and their positions
    (empty when the layers are aggregated or the model has none)."""
    if mode != "local":
        return params, np.zeros(0, np.int64)
    index = trainer.manifest.batchnorm_indices()
    saved = local.load(index.size) if local is not None and index.size else None
    if saved is None:
        return params, index
    mine = np.array(params, np.float32, copy=True)
    mine[index] = saved
    return mine, index


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
    local: LocalLayers | None = None,
) -> TrainResult:
    """Run ``plan`` from parameters ``start``; the trainer holds the result afterwards.

    ``recheck`` returns the reasons the device is no longer eligible (empty while it is); a
    non-empty answer raises :class:`ConditionsLapsed` before the next step. ``local``: where
    the device keeps its batch norm layers under a ``"batchnorm": "local"`` plan (FedBN); the
    trainer then holds ``start``'s values for them afterwards (no change to report).
    """
    begin, index = _with_local(trainer, start, plan.batchnorm, local)
    _prepare(trainer, begin, plan.prox_mu)
    if trainer.manifest.step_seed:  # drawn only then: the batch order stays what it was
        trainer.seed(int(rng.integers(2**31)))
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
    if index.size:
        trained = trainer.get_parameters()
        if local is not None:
            local.save(trained[index])
        trained[index] = start[index]
        trainer.set_parameters(trained)
    known = data.num_examples
    return TrainResult(
        loss=total_loss / seen,
        num_examples=known if known is not None else seen,
        examples_seen=seen,
        steps=steps,
    )


def evaluate(
    trainer: Trainer,
    data: Dataset,
    params: np.ndarray,
    *,
    local: LocalLayers | None = None,
) -> EvalResult:
    """The model ``params`` on all of ``data``: example-weighted loss and accuracy. With
    ``local`` (FedBN), the device's own batch norm layers replace the global ones."""
    trainer.set_parameters(_with_local(trainer, params, "local" if local else "", local)[0])
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
