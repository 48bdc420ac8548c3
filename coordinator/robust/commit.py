"""The delta a commit hands to the server optimizer, under the task's ``robust`` plan.

Both task modes call :func:`aggregate_updates` when they commit, with the round (sync) or
buffer round (async) whose accepted updates make the next version. Undefended FedAvg
(``"robust": "none"``) takes the streaming sum the mode folded as updates arrived. Otherwise
the updates are read back from the blob store, where each was stored before it was
acknowledged, and decoded with the SDK codecs (:func:`coordinator.tensors.decode_delta`):

1. each update's weight is its declared ``num_examples`` capped
   (:func:`~coordinator.robust.clipping.example_cap`), times its staleness weight in async mode;
2. each update is clipped to the task's current norm bound, which the previous commit
   recorded in its round's metrics (``robust.clip_bound_next``), or which the first commit
   derives from its own updates (:func:`~coordinator.robust.clipping.first_bound`);
3. unless the plan switches it off, the clipped updates are written to an unlinked scratch
   file beside the blobs and read back in coordinate chunks: the updates whose direction
   disagrees with their coordinate-wise median are dropped
   (:mod:`~coordinator.robust.agreement`), and FedAvg, median, trimmed mean or multi-Krum
   combine the rest; FedAvg without that check folds the clipped updates one at a time into a
   :class:`~coordinator.aggregation.RunningSum` instead;
4. the next bound is computed from the norms and returned in the metrics, which the caller
   stores with the round in the version's transaction, with the round's loss and accuracy
   weighted by the same capped counts (:attr:`Aggregate.example_cap`).

Everything here is a function of stored records: a commit a crash interrupted gives the same
delta when it is finished after the restart.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from coordinator.aggregation import RunningSum
from coordinator.blobs import BlobStore
from coordinator.robust import aggregators
from coordinator.robust.agreement import agree
from coordinator.robust.clipping import clip_factor, example_cap, first_bound, next_bound
from coordinator.robust.spec import RobustSpec
from coordinator.staleness import StalenessPolicy
from coordinator.store import Store, Task, Update
from coordinator.tensors import decode_delta

if TYPE_CHECKING:
    from coordinator.plan import TaskPlan

__all__ = ["Aggregate", "aggregate_updates", "current_bound"]


@dataclass(frozen=True)
class Aggregate:
    delta: np.ndarray  # float64, model size
    metrics: dict[str, Any]  # stored under the round's metrics["robust"]

    @property
    def example_cap(self) -> float | None:
        """The most examples one update counted for; the round's published loss and
        accuracy weigh by it too, or one device declaring a huge count would set them."""
        cap = self.metrics.get("example_cap")
        return None if cap is None else float(cap)


def current_bound(store: Store, task: Task) -> float | None:
    """The clipping bound the commit that made the task's current version left for the next
    one; None before the first clipped commit."""
    if task.model_version == 0:
        return None
    for rnd in reversed(store.list_rounds(task.task_id, min_base_version=task.model_version - 1)):
        if rnd.state == "committed" and rnd.metrics.get("model_version") == task.model_version:
            bound = (rnd.metrics.get("robust") or {}).get("clip_bound_next")
            return None if bound is None else float(bound)
    return None


def _norm(delta: np.ndarray) -> float:
    # Elementwise, not BLAS (see coordinator.tensors.decode_delta).
    return float(np.sqrt(np.square(delta).sum()))


def aggregate_updates(
    store: Store,
    blobs: BlobStore,
    task: Task,
    plan: TaskPlan,
    round_id: int,
    num_parameters: int,
    *,
    streamed: Callable[[], np.ndarray],
    staleness: StalenessPolicy | None = None,
    chunk: int = aggregators.DEFAULT_CHUNK,
) -> Aggregate:
    """The next version's delta from ``round_id``'s accepted updates (see the module
    docstring). ``task`` must be the stored task as of this commit; ``streamed`` returns the
    mode's running weighted mean; ``staleness`` weighs updates by their stored staleness."""
    spec = plan.robust
    if spec.undefended:
        return Aggregate(streamed(), {"aggregator": "fedavg"})
    updates = list(store.round_updates(round_id))
    if not updates:
        raise ValueError(f"round {round_id} has no accepted update to aggregate")
    cap = example_cap(spec, [u.num_examples for u in updates])
    weights = np.array([min(float(u.num_examples), cap) * _staleness_weight(u, staleness)
                        for u in updates])  # fmt: skip

    def read(u: Update) -> np.ndarray:
        return decode_delta(blobs.read(u.payload_sha), num_parameters)

    bound: float | None = None
    if spec.clip is not None:
        bound = current_bound(store, task)
        if bound is None:
            bound = first_bound(spec.clip, [_norm(read(u)) for u in updates])
    norms: list[float] = []

    def clipped(u: Update) -> np.ndarray:
        delta = read(u)
        norms.append(_norm(delta))
        return delta if bound is None else delta * clip_factor(norms[-1], bound)

    metrics: dict[str, Any] = {
        "aggregator": spec.aggregator,
        "updates": len(updates),
        "example_cap": None if cap == float("inf") else cap,
        "capped": sum(u.num_examples > cap for u in updates),
    }
    if spec.aggregator == "fedavg" and spec.agreement is None:
        total = RunningSum(num_parameters)
        for u, w in zip(updates, weights, strict=True):
            total.fold(clipped(u), float(w))
        delta = total.mean()
    else:
        delta = _robust(spec, updates, weights, clipped, num_parameters, blobs, chunk, metrics)
    if norms:
        # For the operator's view of how large updates are against the bound.
        metrics.update(norm_median=float(np.median(norms)), norm_max=max(norms))
    if spec.clip is not None and bound is not None:
        metrics.update(
            clip_bound=bound,
            clip_bound_next=next_bound(spec.clip, bound, norms),
            clipped=sum(n > bound for n in norms),
        )
    return Aggregate(delta, metrics)


def _staleness_weight(u: Update, staleness: StalenessPolicy | None) -> float:
    return 1.0 if staleness is None else staleness.weight(int(u.report.get("staleness", 0)))


def _robust(
    spec: RobustSpec,
    updates: Sequence[Update],
    weights: np.ndarray,
    clipped: Callable[[Update], np.ndarray],
    num_parameters: int,
    blobs: BlobStore,
    chunk: int,
    metrics: dict[str, Any],
) -> np.ndarray:
    """The direction check, then FedAvg, median, trimmed mean or multi-Krum, over a scratch
    matrix of the clipped updates."""
    n = len(updates)
    # Unlinked from the start: nothing to clean up after a crash; beside the blobs: the disk
    # that is sized for updates.
    with tempfile.TemporaryFile(dir=blobs.root) as scratch:
        rows = np.memmap(scratch, dtype=np.float64, mode="w+", shape=(n, num_parameters))
        try:
            for i, u in enumerate(updates):
                rows[i] = clipped(u)
            select: np.ndarray | None = None
            if spec.agreement is not None:
                agreed = agree(spec.agreement, rows, weights, chunk)
                metrics.update(
                    disagreeing=n - len(agreed.keep),
                    cosine_min=float(agreed.cosines.min()),
                    cosine_median=float(np.median(agreed.cosines)),
                )
                if len(agreed.keep) == 0:
                    # No update agrees with the median (it is 0, or they all oppose it):
                    # there is no direction to take, so the model stays where it is.
                    return np.zeros(num_parameters)
                select, weights = agreed.keep, agreed.weights
            kept = n if select is None else len(select)
            if spec.aggregator == "fedavg":
                return aggregators.weighted_mean(rows, weights, chunk, select)
            if spec.aggregator == "median":
                return aggregators.coordinate_median(rows, chunk, select)
            if spec.aggregator == "trimmed_mean":
                metrics["trimmed"] = 2 * int(spec.trim * kept)
                return aggregators.trimmed_mean(rows, spec.trim, chunk, select)
            f = int(spec.byzantine * kept)
            delta, chosen = aggregators.multi_krum(rows, weights, f, chunk, select)
            metrics["selected"] = [int(i) for i in chosen]
            return delta
        finally:
            del rows  # unmap before the file closes
