"""Model versions and the running sums of open rounds.

:class:`ModelVersions` reads a version's parameters and writes the next one: blobs first
(atomic, durable), then one database transaction that records the version together with
whatever the caller commits alongside it (the round, the task's counters). A crash before
that transaction leaves only unreferenced blobs; the round is still open and commits again.

:class:`RoundSums` keeps one :class:`~coordinator.aggregation.RunningSum` per open round in
memory. After a restart (or for a round it has not seen) it rebuilds the sum by decoding
and folding the round's accepted update payloads, which were stored before they were
acknowledged: nothing acknowledged is lost, and memory stays O(model size) per open round.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import numpy as np

from coordinator.aggregation import RunningSum, make_server_optimizer
from coordinator.blobs import BlobStore
from coordinator.plan import TaskPlan
from coordinator.store import Store, Task, Version
from coordinator.tensors import decode_delta, params_from_bytes, params_to_bytes

__all__ = ["ModelVersions", "RoundSums"]


class ModelVersions:
    def __init__(self, store: Store, blobs: BlobStore) -> None:
        self.store = store
        self.blobs = blobs

    def params(self, task_id: str, version: int, num_parameters: int) -> np.ndarray:
        v = self.store.get_version(task_id, version)
        if v is None:
            raise KeyError(f"task {task_id} has no version {version}")
        return params_from_bytes(self.blobs.read(v.params_sha), num_parameters)

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
        new_params, state = opt.step(params, mean_delta, opt.unpack_state(state_in, num_parameters))
        params_sha = self.blobs.put(params_to_bytes(new_params))
        opt_sha = self.blobs.put(opt.pack_state(state)) if opt.state_names else None
        new_version = task.model_version + 1
        tx: AbstractContextManager[None] = self.store.atomic()
        with tx:
            self.store.add_version(
                Version(task.task_id, new_version, params_sha, opt_sha, round_id, now)
            )
            also(new_version)
        return new_version


class RoundSums:
    def __init__(self, store: Store, blobs: BlobStore) -> None:
        self.store = store
        self.blobs = blobs
        self._sums: dict[int, RunningSum] = {}

    def get(self, round_id: int, num_parameters: int) -> RunningSum:
        s = self._sums.get(round_id)
        if s is None:
            s = RunningSum(num_parameters)
            for u in self.store.round_updates(round_id):
                s.fold(decode_delta(self.blobs.read(u.payload_sha), num_parameters), u.num_examples)
            self._sums[round_id] = s
        return s

    def drop(self, round_id: int) -> None:
        self._sums.pop(round_id, None)
