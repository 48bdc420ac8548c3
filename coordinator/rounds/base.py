"""The task-mode interface and the context every mode works in.

The service does everything mode-independent (authentication, body parsing, ownership of
assignments, idempotent replays, decoding and checking the delta) and hands the rest to the
task's policy:

* ``check_in``: an eligible device asks for work; answer ``wait`` (with pace steering) or an
  assignment;
* ``steer``: the pace-steered wait for a device of this task (also sent with the answer to a
  report or an abort, so that a device that just finished does not come straight back);
* ``check_upload``: may this assignment still upload (before the body is decoded)?
* ``accept_update`` / ``accept_eval``: check an accepted report, store it durably, fold it;
* ``tick``: do what is due: commit a full round or buffer, apply deadlines (the service calls
  it after every report, and periodically);
* ``forget``: drop what the policy holds in memory for a task, after an error in one of its
  steps (it is derived from the store and rebuilt from it when next needed).

What a policy holds in memory moves only after the write that makes it durable returned, and
everything that could make a report unusable is checked before that write.
"""

from __future__ import annotations

import logging
import random
import secrets
import threading
from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from coordinator.blobs import BackgroundDeletes, BlobStore, delete_unneeded
from coordinator.errors import Conflict
from coordinator.pacing import PaceSteering
from coordinator.plan import TaskPlan
from coordinator.store import Assignment, EvalReport, Round, Store, Task, Update
from coordinator.versions import ModelVersions, RoundSums
from edge_sdk.protocol import ErrorCode, Route

if TYPE_CHECKING:
    from coordinator.replicas import Replica

__all__ = [
    "IN_FLIGHT",
    "PolicyContext",
    "TaskPolicy",
    "assignment_json",
    "closed_meanwhile",
    "new_assignment_id",
    "wait_answer",
]

# Assignment states of a device still training (it may report or abort).
IN_FLIGHT = ("selected", "delivered")


def wait_answer(retry_after_s: float, reason: str) -> dict[str, Any]:
    """A check-in's ``wait`` answer (docs/protocol.md)."""
    return {"action": "wait", "retry_after_s": round(retry_after_s, 3), "reason": reason}


def closed_meanwhile() -> Conflict:
    """The refusal of a report whose assignment was expired or aborted after its checks
    read it in flight (among replicas: by another one), before it was stored."""
    return Conflict(
        "the assignment was closed (expired or aborted) while its report was stored",
        ErrorCode.ROUND_CLOSED,
    )


def new_assignment_id() -> str:
    return "a-" + secrets.token_hex(12)


def assignment_json(
    a: Assignment, rnd: Round, task: Task, plan: TaskPlan, now: float
) -> dict[str, Any]:
    """A check-in's assignment answer (docs/protocol.md)."""
    client = plan.client_json()
    # A device scales its learning rate by lr_decay**round, and round numbers also count
    # abandoned and evaluation rounds: the decay is applied here instead, once per committed
    # version (the round's base version), and the device is told lr_decay 1.
    client.update(lr=plan.lr * plan.lr_decay**rnd.base_version, lr_decay=1.0)
    return {
        "action": a.action,
        "assignment": {
            "assignment_id": a.assignment_id,
            "task_id": task.task_id,
            "round": rnd.number,
            "model_version": rnd.base_version,
            "bundle_id": task.bundle_id,
            "params_url": Route.VERSION_PARAMS.format(
                task_id=task.task_id, version=rnd.base_version
            ),
            "deadline_in_s": max(0.0, (rnd.deadline_at or now) - now),
            "plan": client,
        },
    }


class SentBytes:
    """Parameter bytes sent to devices per task since its last round closed (in memory:
    metrics only). Added on the event loop as each download ends, read and reset by the
    worker when a round closes: hence the lock, which no worker hop per download needs."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sent: defaultdict[str, int] = defaultdict(int)

    def add(self, task_id: str, nbytes: int) -> None:
        with self._lock:
            self._sent[task_id] += nbytes

    def get(self, task_id: str) -> int:
        with self._lock:
            return self._sent.get(task_id, 0)

    def forget(self, task_id: str) -> None:
        with self._lock:
            self._sent.pop(task_id, None)


@dataclass
class PolicyContext:
    store: Store
    blobs: BlobStore
    pacing: PaceSteering
    rng: random.Random
    versions: ModelVersions
    sums: RoundSums
    retain_updates: bool = False
    # This process among several on one database (coordinator.replicas); None: alone.
    replica: Replica | None = None
    # Among replicas: where a closed round's payloads are deleted (off the worker thread).
    deletes: BackgroundDeletes | None = None
    bytes_out: SentBytes = field(default_factory=SentBytes)

    # Bundles are immutable and content-addressed: their manifests are cached once read.
    # Callers must not mutate what they get.
    manifests: dict[str, dict[str, Any]] = field(default_factory=dict)

    def manifest(self, bundle_id: str) -> dict[str, Any] | None:
        manifest = self.manifests.get(bundle_id)
        if manifest is None:
            manifest = self.store.get_bundle(bundle_id)
            if manifest is not None:
                self.manifests[bundle_id] = manifest
        return manifest

    # Rounds closed inside a transaction that is not yet durable (see deferring_deletes).
    closed_in_transaction: list[int] | None = None

    def round_closed(self, task_id: str, round_id: int) -> None:
        """Forget what a closed round held: its bytes-out count and, unless retained by
        configuration, its update payloads.

        Blobs are content-addressed, so two updates with identical bytes (a zero delta, say)
        share one: a payload an open round still needs for recovery is kept.
        """
        self.bytes_out.forget(task_id)
        if self.replica is not None:  # folded into the version (or abandoned with the round)
            self.store.delete_partials(round_id)
        if self.retain_updates:
            return
        if self.closed_in_transaction is not None:
            self.closed_in_transaction.append(round_id)
            return
        self._delete_payloads(round_id)

    def _delete_payloads(self, round_id: int) -> None:
        shas = self.store.round_payloads(round_id)
        if self.deletes is not None:
            self.deletes.submit(shas)
            return
        delete_unneeded(self.blobs, self.store, shas, self.store.payload_in_open_round)

    @contextmanager
    def deferring_deletes(self) -> Iterator[None]:
        """Around a transaction that may close rounds (a batch of uploads can fill an async
        buffer and commit it): their payloads are deleted only once the block has committed.
        If it rolls back, the rounds are open again and their acknowledged updates still need
        every payload, so nothing is deleted."""
        if self.closed_in_transaction is not None:  # nested: the outermost block decides
            yield
            return
        self.closed_in_transaction = []
        try:
            yield
            closed = self.closed_in_transaction
        finally:
            self.closed_in_transaction = None
        for round_id in closed:
            try:
                self._delete_payloads(round_id)
            except Exception:  # left for the orphan sweep at start-up; the commit stands
                logging.getLogger(__name__).warning("payloads of round %d not deleted", round_id)

    @contextmanager
    def turn(
        self, rnd: Round, *, wait: bool = True, closing: bool = False
    ) -> Iterator[Round | None]:
        """``rnd``, for a change that must happen once (select, assign, close, commit).

        Alone, as given. Among replicas, read again in a transaction holding its row lock
        (:mod:`coordinator.replicas`), None if it closed meanwhile or, without ``wait``,
        while another replica holds it; payloads of rounds closed inside are deleted once
        the transaction committed. A ``closing`` turn (a sync round's close, which may
        compute for seconds) claims the round first, so that uploads into it are refused at
        once rather than wait (:meth:`Store.claim_round`): None if another holds the claim."""
        if self.replica is None:
            yield rnd
            return
        with self.deferring_deletes(), self.store.atomic():
            if closing and not self.store.claim_round(rnd.round_id, closing=True):
                yield None
                return
            mine = self.store.lock_round(rnd.round_id, skip_locked=not wait)
            yield mine if mine is not None and mine.is_open else None

    def num_parameters(self, task: Task) -> int:
        manifest = self.manifest(task.bundle_id)
        assert manifest is not None
        return int(manifest["num_parameters"])


class TaskPolicy(ABC):
    mode: ClassVar[str]

    def __init__(self, ctx: PolicyContext) -> None:
        self.ctx = ctx

    @abstractmethod
    def check_in(self, task: Task, plan: TaskPlan, device_id: str, now: float) -> dict[str, Any]:
        """The check-in answer for an eligible device (a JSON object per docs/protocol.md)."""

    @abstractmethod
    def steer(self, task: Task, plan: TaskPlan, now: float) -> float:
        """Seconds a device should wait before checking in again (jittered pace steering)."""

    @abstractmethod
    def check_upload(self, task: Task, plan: TaskPlan, assignment: Assignment, now: float) -> None:
        """Raise :class:`~coordinator.errors.Conflict` if the assignment may not report now."""

    @abstractmethod
    def accept_update(
        self, task: Task, plan: TaskPlan, update: Update, delta: np.ndarray, now: float
    ) -> None:
        """Check the update, store it (payload blob already written) and fold it in; it is
        durable once this returns. A commit it makes due is :meth:`tick`'s work."""

    @abstractmethod
    def accept_eval(self, task: Task, plan: TaskPlan, report: EvalReport, now: float) -> None:
        """Store an evaluation report; closing the round it completes is :meth:`tick`'s work."""

    @abstractmethod
    def tick(self, task: Task, plan: TaskPlan, now: float) -> None:
        """Commit what is complete, apply deadlines and whatever else is due at ``now``."""

    def forget(self, task_id: str) -> None:
        """Drop what is held in memory for a task (after an error in one of its steps); it
        is rebuilt from the store when next needed."""
        self.ctx.sums.forget_task(task_id)

    def _open_once(self, task: Task, build: Callable[[Task], Round | None]) -> Round | None:
        """The task's open round: a new one from ``build(task as stored)``, or, among
        replicas, the one another replica opened first (under the task's row lock). None if
        ``build`` opens none."""
        store = self.ctx.store
        if self.ctx.replica is None:
            rnd = build(task)
            return None if rnd is None else store.add_round(rnd)
        with store.atomic():
            fresh = store.lock_task(task.task_id)
            found = store.open_round(task.task_id)
            if found is not None or fresh is None:
                return found
            rnd = build(fresh)
            return None if rnd is None else store.add_round(rnd)

    def _advance(self, task: Task, new_version: int, done: bool) -> None:
        """Count the commit of ``new_version`` on the task, inside the commit's transaction,
        completing it if ``done`` (over a pause too: a task paused during its last round
        must not train on). The state is read under the task's row lock: among replicas
        another may have paused the task since ``task`` was read, and the pause stands."""
        fresh = self.ctx.store.lock_task(task.task_id) or task
        self.ctx.store.update_task(
            task.task_id,
            model_version=new_version,
            rounds_completed=fresh.rounds_completed + 1,
            state="completed" if done else fresh.state,
        )

    def _next_round_number(self, task: Task) -> int:
        # Numbers count every round of the task, abandoned attempts and evaluations included.
        # From the newest round, not a count: retention deletes old rounds (never the newest).
        rounds = self.ctx.store.list_rounds(task.task_id, min_base_version=task.model_version - 1)
        return max((r.number for r in rounds), default=0) + 1
