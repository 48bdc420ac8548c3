"""Model versions and the running sums of open rounds.

:class:`ModelVersions` reads a version's parameters and writes the next one: it checks that
the new parameters and optimizer state are finite (else :class:`~coordinator.errors.
TaskFailure`: retrying could only compute the same), writes blobs (atomic, durable), then
runs one database transaction that records the version together with whatever the caller
commits alongside it (the round, the task's counters). A crash or an error before that
transaction ends leaves only unreferenced blobs; the round is still open and commits again.

:class:`RoundSums` keeps one :class:`~coordinator.aggregation.RunningSum` per open round in
memory, derived from the store: for a round it has not seen (after a restart, or after
:meth:`RoundSums.forget_task` dropped a task's sums on an error) it decodes and folds the round's
accepted update payloads, which were stored before they were acknowledged. An update is
staged first (:meth:`RoundSums.stage`: checked), stored, and only then :meth:`RoundSums.put`
in: a failed store leaves the sum as the database says. Memory stays
O(model size) per open round.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from coordinator.aggregation import RunningSum, make_server_optimizer
from coordinator.blobs import BlobStore, held
from coordinator.errors import TaskFailure
from coordinator.plan import TaskPlan
from coordinator.store import Store, Task, Update, Version
from coordinator.tensors import decode_delta, encode_params, params_from_bytes, params_to_bytes

__all__ = ["ModelVersions", "RoundSums", "StagedFold"]


class ModelVersions:
    def __init__(self, store: Store, blobs: BlobStore) -> None:
        self.store = store
        self.blobs = blobs

    def params_frame(self, v: Version, num_parameters: int) -> Path:
        """The file holding version ``v``'s parameter frame: written at the commit (made
        again on a download if it is missing: a cache beside the parameters' blob,
        :mod:`coordinator.blobs`)."""
        return self.blobs.derived(
            v.params_sha,
            "frame",
            lambda raw: encode_params(params_from_bytes(raw, num_parameters)),
        )

    def commit_next(
        self,
        task: Task,
        plan: TaskPlan,
        num_parameters: int,
        mean_delta: np.ndarray,
        round_id: int,
        now: float,
        also: Callable[[int], None],
    ) -> int:
        """Apply the server optimizer to the current version; returns the new version number.

        ``also(new_version)`` runs inside the same transaction as the version's record.
        """
        base = self.store.get_version(task.task_id, task.model_version)
        assert base is not None, f"task {task.task_id} lost version {task.model_version}"
        opt = make_server_optimizer(plan.server_optimizer)
        params = params_from_bytes(self.blobs.read(base.params_sha), num_parameters)
        state_in = self.blobs.read(base.optimizer_sha) if base.optimizer_sha else None
        with np.errstate(over="ignore", invalid="ignore"):  # checked just below
            new_params, state = opt.step(
                params, mean_delta, opt.unpack_state(state_in, num_parameters)
            )
        stats = _running_statistics(self.store.get_bundle(task.bundle_id))
        if stats.size:
            # Batch norm running statistics are averages, not weights: they take the mean of
            # the devices' values whatever the server optimizer (momentum could push a
            # variance below zero). Under FedBN every device reports 0 for them.
            new_params[stats] = params[stats] + mean_delta[stats]
        finite = np.isfinite(new_params).all() and all(np.isfinite(v).all() for v in state.values())
        if not finite:
            raise TaskFailure(
                f"the server step ({plan.server_optimizer.name}) would make version "
                f"{task.model_version + 1} non-finite: nothing committed"
            )
        params_bytes, frame = params_to_bytes(new_params), encode_params(new_params)
        state_bytes = opt.pack_state(state) if opt.state_names else None

        def write() -> tuple[str, str | None]:
            # The version's download frame is written with its parameters, in the same round
            # of fsyncs: its first download is the next round's, and it would wait on the disk.
            sha = self.blobs.put_with_derived(params_bytes, {"frame": frame})
            return sha, None if state_bytes is None else self.blobs.put(state_bytes)

        params_sha, opt_sha = write()
        new_version = task.model_version + 1
        tx: AbstractContextManager[None] = self.store.atomic()
        with tx:
            # Written again if gone: a sweep deleting them now waits for this commit.
            if not held(self.store, self.blobs, [s for s in (params_sha, opt_sha) if s]):
                write()
            self.store.add_version(
                Version(task.task_id, new_version, params_sha, opt_sha, round_id, now)
            )
            also(new_version)
        return new_version


def _running_statistics(manifest: dict[str, Any] | None) -> np.ndarray:
    """Positions of the bundle's batch norm running statistics in the model vector."""
    spans = [
        np.arange(int(b["offset"]), int(b["offset"]) + int(np.prod(b["shape"], dtype=np.int64)))
        for b in (manifest or {}).get("buffers", [])
    ]
    return np.concatenate(spans) if spans else np.zeros(0, np.int64)


@dataclass(frozen=True)
class StagedFold:
    """An update checked for a round's sum (:meth:`RoundSums.stage`), to fold once stored;
    ``count``: the sum's count it was checked against."""

    round_id: int
    count: int
    delta: np.ndarray
    weight: float


class RoundSums:
    def __init__(self, store: Store, blobs: BlobStore) -> None:
        self.store = store
        self.blobs = blobs
        self._sums: dict[int, RunningSum] = {}
        self._task_of: dict[int, str] = {}  # round_id -> task_id, for forget_task

    def get(self, task_id: str, round_id: int, num_parameters: int) -> RunningSum:
        """The round's sum (do not mutate it: :meth:`stage` and :meth:`put` move it)."""
        s = self._sums.get(round_id)
        if s is None:
            s = RunningSum(num_parameters)
            self.fold_stored(s, self.store.round_updates(round_id), num_parameters)
            self._sums[round_id] = s
            self._task_of[round_id] = task_id
        return s

    def fold_stored(self, s: RunningSum, updates: Iterable[Update], num_parameters: int) -> None:
        """Fold stored updates into ``s`` from their payloads, weighted by their examples."""
        for u in updates:
            s.fold(decode_delta(self.blobs.read(u.payload_sha), num_parameters), u.num_examples)

    def tag(self, update: Update, staged: StagedFold) -> Update:
        """``update`` as it is stored once ``staged`` was checked for it (among replicas,
        numbered: :meth:`coordinator.replicas.Replica.tagged`)."""
        return update

    def stored(self, task_id: str, round_id: int, num_parameters: int) -> int:
        """How many updates of the round are stored: the count of its sum, which is derived
        from them (no query per upload)."""
        return self.get(task_id, round_id, num_parameters).count

    def stage(
        self, task_id: str, round_id: int, num_parameters: int, delta: np.ndarray, weight: float
    ) -> StagedFold:
        """One more update for the round's sum, checked (``ValueError`` if it could not
        count) but not taken in."""
        held = self._folding(task_id, round_id, num_parameters)
        held.check(delta, weight)
        return StagedFold(round_id, held.count, delta, weight)

    def put(self, staged: StagedFold) -> None:
        """Take a staged update in, once it is stored: folded in place (a batch of uploads
        copies no sum; if its transaction fails, the policy forgets the task's sums)."""
        held = self._held(staged.round_id)
        if held is None or held.count != staged.count:
            # Something else moved the sum in between: only the store knows the truth now.
            self.drop(staged.round_id)
            return
        held.fold(staged.delta, staged.weight)
        self._moved(staged.round_id, held)

    # What :meth:`stage` and :meth:`put` fold into (among replicas: this replica's share).

    def _folding(self, task_id: str, round_id: int, num_parameters: int) -> RunningSum:
        return self.get(task_id, round_id, num_parameters)

    def _held(self, round_id: int) -> RunningSum | None:
        return self._sums.get(round_id)

    def _moved(self, round_id: int, held: RunningSum) -> None:
        """Called once :meth:`put` folded an update into ``held``."""

    def drop(self, round_id: int) -> None:
        self._sums.pop(round_id, None)
        self._task_of.pop(round_id, None)

    def forget_task(self, task_id: str) -> None:
        """Forget a task's sums (after an error): rebuilt from the store when next needed."""
        for round_id in [r for r, t in self._task_of.items() if t == task_id]:
            self.drop(round_id)
