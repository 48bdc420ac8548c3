"""Asynchronous buffered aggregation (FedBuff): no rounds to wait for, a version every K updates.

A task created with ``"mode": "async"`` runs like this:

* **Check-in.** An eligible device gets an assignment on the *current* model version at once,
  as long as fewer than ``max_concurrency`` assignments of the task are in flight; otherwise
  it is pace-steered away (``window_full``). A device holding an open assignment gets the
  same one again, and so does one whose assignment on the current version expired or was
  aborted before it reported (with a new deadline): a small fleet that all missed one
  deadline would otherwise never fill the buffer.
* **Upload.** Each accepted update is stored durably (then acknowledged) and folded into the
  buffer of the current version (:class:`~coordinator.async_buffer.AsyncBuffer`) with weight
  ``num_examples x w(staleness)``; the ``buffer_k``-th update commits the next version through
  the task's server optimizer. An update more than ``max_staleness`` versions behind gets
  ``409 too_stale`` and changes nothing.
* **Expiry.** An assignment not reported within ``round_deadline_s`` of its delivery, or that
  fell more than ``max_staleness`` versions behind, expires and frees its slot (its upload
  would be refused anyway).

Storage reuses the synchronous records: the buffer that makes version ``v + 1`` is a round
with ``base_version = v`` (``goal = buffer_k``, ``target = max_concurrency``, reporting from
the moment it opens, no deadline). An assignment belongs to the round that was open when it
was issued, so its round's ``base_version`` is the version it trains on; an accepted update
is recorded under the buffer round it was folded into, with ``base_version`` and
``staleness`` added to its stored report. The buffer in memory is derived from those records:
an update is staged (checked: bound, weight, finiteness), stored, and only then applied; a
full buffer's commit is held as due until the version is committed. After a restart or any
error the buffer is dropped and rebuilt by folding the open round's stored updates again, and
a commit that did not happen is finished before anything else (a new update is not stored
into a full buffer). A device contributes at most once to a version: one that reported
into the open buffer (even on an older assignment) gets no new assignment on it.
``rounds`` in the plan counts versions (server steps). Federated evaluation rounds are for
synchronous tasks only.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

from coordinator.async_buffer import AsyncBuffer, BufferedUpdate, Commit
from coordinator.errors import ApiError, Conflict, Overloaded, TaskFailure, Unprocessable
from coordinator.plan import TaskPlan
from coordinator.replicas import combine
from coordinator.robust.commit import aggregate_updates
from coordinator.rounds.base import (
    IN_FLIGHT,
    TaskPolicy,
    assignment_json,
    closed_meanwhile,
    new_assignment_id,
)
from coordinator.rounds.base import wait_answer as _wait
from coordinator.staleness import TooStale
from coordinator.store import Assignment, EvalReport, PartialSum, Round, Task, Update
from coordinator.tensors import decode_delta
from edge_sdk.protocol import ErrorCode

__all__ = ["BufferedAsync"]

# An assignment its device gave up on (or was given up on) without reporting.
_GAVE_UP = ("expired", "aborted")

# What _held says among replicas of a buffer holding K updates: _commit computes the commit
# itself, under the round's lock, from what the store holds then.
_DUE_AMONG_REPLICAS = Commit(version=-1, delta=np.zeros(0), num_updates=0, num_examples=0,
                             mean_staleness=0.0, max_staleness=0)  # fmt: skip


@contextmanager
def _refolding(rnd: Round) -> Iterator[None]:
    """Around folding stored updates again: one that does not fold now means the stored
    history is inconsistent, and the task fails."""
    try:
        yield
    except (ApiError, TooStale, ValueError) as e:  # ApiError: a payload that does not decode
        raise TaskFailure(f"version {rnd.base_version}'s stored buffer: {e}") from e


class BufferedAsync(TaskPolicy):
    mode = "async"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # task_id -> (round_id, buffer) of its open round (derived from the store).
        self._buffers: dict[str, tuple[int, AsyncBuffer]] = {}
        # task_id -> (round_id, commit) of a full buffer whose version is not committed yet.
        self._due: dict[str, tuple[int, Commit]] = {}
        # task_id -> earliest time an in-flight assignment can expire (skip scans before it).
        self._next_expiry: dict[str, float] = {}
        # task_id -> moving average of delivery-to-report seconds (pace steering only).
        self._job_s: dict[str, float] = {}

    def forget(self, task_id: str) -> None:
        super().forget(task_id)
        self._let_go(task_id)
        self._due.pop(task_id, None)
        self._next_expiry.pop(task_id, None)

    def _let_go(self, task_id: str) -> None:
        """Drop the task's buffer in memory; among replicas, with this replica's unwritten
        partial buffer of its round (rebuilt from the store if that round is still open)."""
        held = self._buffers.pop(task_id, None)
        if held is not None and self.ctx.replica is not None:
            self.ctx.replica.forget(held[0])

    # -- state ------------------------------------------------------------------------------

    def _state(
        self, task: Task, plan: TaskPlan, now: float, *, open_new: bool = True
    ) -> tuple[Task, Round, AsyncBuffer] | None:
        """The task, its open buffer round and the buffer; None once the task completed
        (or, with ``open_new=False``, when no round is open).

        Commits a full buffer first (one this process filled, or found full in the store
        after a restart or an error), so that no update is stored into a full buffer.
        """
        store = self.ctx.store
        rnd = store.open_round(task.task_id)
        if rnd is not None:
            due = self._held(task, plan, rnd)
            if due is None:
                return task, rnd, self._buffers[task.task_id][1]
            self._commit(task, plan, rnd, due, now)
            task = self._task(task)
        if task.state in ("completed", "failed") or not open_new:
            return None
        opened = self._open_once(task, lambda t: self._new_buffer(t, plan, now))
        if opened is None:
            return None
        if self._held(task, plan, opened) is not None:
            # Among replicas: another one opened it and filled it already; an upload waits
            # for its commit (accept_update), a check-in may assign it.
            n = self.ctx.num_parameters(task)
            return task, opened, AsyncBuffer(n, plan.buffer, opened.base_version)
        return task, opened, self._buffers[task.task_id][1]

    def _new_buffer(self, task: Task, plan: TaskPlan, now: float) -> Round | None:
        if task.state in ("completed", "failed"):  # as stored now (another replica's commit)
            return None
        return Round(
            round_id=0,
            task_id=task.task_id,
            number=self._next_round_number(task),
            kind="train",
            state="reporting",
            base_version=task.model_version,
            goal=plan.buffer.buffer_k,
            target=plan.buffer.max_concurrency,
            min_reports=plan.buffer.buffer_k,
            opened_at=now,
            window_ends_at=now,
            selected_at=now,
        )

    def _held(self, task: Task, plan: TaskPlan, rnd: Round) -> Commit | None:
        """The commit due for the open round, or None with its buffer held in ``_buffers``;
        rebuilt from the round's stored updates unless held for that round already."""
        if self.ctx.replica is not None:
            if self.ctx.store.count_updates(rnd.round_id) >= plan.buffer.buffer_k:
                # Due; what it holds is read by _commit, under the round's lock: read here
                # too it would be folded twice, and another replica's commit meanwhile
                # deletes the payloads.
                return _DUE_AMONG_REPLICAS
            return self._shared(task, plan, rnd)
        due = self._due.get(task.task_id)
        if due is not None and due[0] == rnd.round_id:
            return due[1]
        held = self._buffers.get(task.task_id)
        if held is not None and held[0] == rnd.round_id:
            return None
        self._let_go(task.task_id)
        self._due.pop(task.task_id, None)
        buf, pending = self._replay(task, plan, rnd)
        if pending is None:
            self._buffers[task.task_id] = (rnd.round_id, buf)
        return pending

    def _replay(self, task: Task, plan: TaskPlan, rnd: Round) -> tuple[AsyncBuffer, Commit | None]:
        """The round's buffer folded again from its stored updates."""
        n = self.ctx.num_parameters(task)
        with _refolding(rnd):
            stored = self._buffered(self.ctx.store.round_updates(rnd.round_id), n)
            return AsyncBuffer.replay(n, plan.buffer, rnd.base_version, stored)

    def _buffered(self, updates: Iterable[Update], n: int) -> Iterator[BufferedUpdate]:
        for u in updates:
            delta = decode_delta(self.ctx.blobs.read(u.payload_sha), n)
            yield BufferedUpdate(delta, u.num_examples, int(u.report["base_version"]))

    def _shared(self, task: Task, plan: TaskPlan, rnd: Round) -> Commit | None:
        """:meth:`_held` among replicas (:mod:`coordinator.replicas`): the commit is due once
        the round holds K updates from any replica, their partial buffers added up (or, for
        updates stored without them, folded again); until then this replica holds its own
        partial buffer of the round."""
        replica, store = self.ctx.replica, self.ctx.store
        assert replica is not None
        n = self.ctx.num_parameters(task)
        stored = store.count_updates(rnd.round_id)
        if stored >= plan.buffer.buffer_k:
            self._let_go(task.task_id)
            partials, tail = replica.covered(rnd.round_id)
            whole = self._restored(plan, rnd, partials, tail, n)
            return whole.due() if len(whole) == stored else self._replay(task, plan, rnd)[1]
        held = self._buffers.get(task.task_id)
        if held is not None and held[0] == rnd.round_id:
            return None
        self._let_go(task.task_id)  # a buffer another replica committed
        row, tail = replica.own(rnd.round_id)
        buf = self._restored(plan, rnd, [] if row is None else [row], tail, n)
        self._buffers[task.task_id] = (rnd.round_id, buf)
        return None

    def _restored(
        self, plan: TaskPlan, rnd: Round, partials: Sequence[PartialSum],
        tail: Sequence[Update], n: int,
    ) -> AsyncBuffer:  # fmt: skip
        """A buffer from partial buffers and the stored updates they do not cover."""
        state = {**combine(partials, n), "version": rnd.base_version}
        buf = AsyncBuffer.from_state(plan.buffer, state)
        with _refolding(rnd):
            buf.restore(self._buffered(tail, n))
        return buf

    def _window(self, task: Task, plan: TaskPlan) -> list[Round]:
        """Rounds whose assignments may still report: the last ``max_staleness + 1`` versions."""
        oldest = task.model_version - plan.buffer.staleness.max_staleness
        return self.ctx.store.list_rounds(task.task_id, min_base_version=oldest)

    def _in_flight(self, rounds: Sequence[Round]) -> list[Assignment]:
        return self.ctx.store.open_assignments([r.round_id for r in rounds])

    def _task(self, task: Task) -> Task:
        fresh = self.ctx.store.get_task(task.task_id)
        assert fresh is not None
        return fresh

    def _base_version(self, assignment: Assignment) -> int:
        rnd = self.ctx.store.get_round(assignment.round_id)
        assert rnd is not None
        return rnd.base_version

    def steer(self, task: Task, plan: TaskPlan, now: float) -> float:
        # All slots turn over once per job time: ask for check-ins at that rate. Before any
        # report a quarter of the deadline is the guess; the moving average replaces it.
        period = self._job_s.get(task.task_id, plan.round_deadline_s / 4)
        return self.ctx.pacing.retry_after(now, plan.buffer.max_concurrency, period)

    # -- check-in ---------------------------------------------------------------------------

    def check_in(self, task: Task, plan: TaskPlan, device_id: str, now: float) -> dict[str, Any]:
        state = self._state(task, plan, now) if task.state == "running" else None
        if state is None:
            return _wait(self.steer(task, plan, now), "paused")
        task, rnd, _ = state
        window = self._window(task, plan)
        # Expired here too: the service ticks only tasks with an open round, and this
        # check-in may have just opened the first since a commit.
        in_flight = self._expire_due(task, plan, self._in_flight(window), now)
        rounds = {r.round_id: r for r in window}
        for a in in_flight:
            if a.device_id == device_id:
                return self._answer(a, rounds[a.round_id], task, plan, now)
        store = self.ctx.store
        earlier = store.assignment_for(rnd.round_id, device_id)
        if (
            earlier is not None and earlier.state not in _GAVE_UP
        ) or store.count_updates(rnd.round_id, device_id=device_id) > 0:
            # It already trained on this version (or reported into its buffer on an older
            # one): one update per device and version.
            return _wait(self.steer(task, plan, now), "window_full")
        if not plan.buffer.admits(len(in_flight)):
            return _wait(self.steer(task, plan, now), "window_full")
        with self.ctx.turn(rnd) as locked:
            # Among replicas, counted again under the buffer round's lock (every assignment
            # goes to the open round; held briefly: by a check-in, a batch of uploads or the
            # commit of K updates): max_concurrency holds.
            if locked is None or (
                self.ctx.replica is not None
                and (
                    not plan.buffer.admits(len(self._in_flight(window)))
                    or store.assignment_for(rnd.round_id, device_id) != earlier
                )
            ):
                return _wait(self.steer(task, plan, now), "window_full")
            if earlier is None:
                a = Assignment(
                    new_assignment_id(), rnd.round_id, task.task_id, device_id,
                    "train", "delivered", now, delivered_at=now,
                )  # fmt: skip
                with store.relaxed_durability():  # its upload's commit syncs it
                    store.add_assignments([a])
            else:
                # Its assignment on this version expired or was aborted with nothing
                # reported: it gets the same one again, with a new deadline. Otherwise a
                # fleet whose devices all missed a deadline (an outage) could never fill the
                # buffer: one assignment per device and round.
                a = dataclasses.replace(earlier, state="delivered", delivered_at=now,
                                        closed_at=None, abort_reason=None)  # fmt: skip
                with store.relaxed_durability():
                    if not store.update_assignment(
                        a.assignment_id, only_from=_GAVE_UP, state="delivered",
                        delivered_at=now, closed_at=None, abort_reason=None,
                    ):  # fmt: skip
                        return _wait(self.steer(task, plan, now), "window_full")
        # _expire_due noted the earliest deadline of the others, as the store holds them.
        expiry = now + plan.round_deadline_s
        self._next_expiry[task.task_id] = min(self._next_expiry[task.task_id], expiry)
        return self._answer(a, rnd, task, plan, now)

    def _answer(
        self, a: Assignment, rnd: Round, task: Task, plan: TaskPlan, now: float
    ) -> dict[str, Any]:
        answer = assignment_json(a, rnd, task, plan, now)
        delivered = a.delivered_at if a.delivered_at is not None else a.created_at
        answer["assignment"]["deadline_in_s"] = max(0.0, delivered + plan.round_deadline_s - now)
        return answer

    # -- reporting --------------------------------------------------------------------------

    def check_upload(self, task: Task, plan: TaskPlan, assignment: Assignment, now: float) -> None:
        try:
            # First: an assignment expired for staleness should hear why.
            plan.buffer.staleness.check(task.model_version - self._base_version(assignment))
        except TooStale as e:
            raise Conflict(str(e), ErrorCode.TOO_STALE) from e
        if assignment.state not in IN_FLIGHT or task.state == "completed":
            raise Conflict(
                f"this assignment no longer takes reports ({assignment.state}; task {task.state})",
                ErrorCode.ROUND_CLOSED,
            )
        delivered = assignment.delivered_at or assignment.created_at
        if now >= delivered + plan.round_deadline_s:
            raise Conflict("the assignment's deadline has passed", ErrorCode.ROUND_CLOSED)

    def accept_update(
        self, task: Task, plan: TaskPlan, update: Update, delta: np.ndarray, now: float
    ) -> None:
        a = self.ctx.store.get_assignment(update.assignment_id)
        assert a is not None
        base = self._base_version(a)
        task, rnd, buf = self._buffer_for_update(task, plan, now)
        try:
            staged = buf.stage(delta, update.num_examples, base)
        except TooStale as e:
            raise Conflict(str(e), ErrorCode.TOO_STALE) from e
        except ValueError as e:
            raise Unprocessable(f"update: {e}", ErrorCode.BAD_UPDATE) from e
        stored = dataclasses.replace(
            update,
            round_id=rnd.round_id,
            report={**update.report, "base_version": base, "staleness": staged.staleness},
        )
        if self.ctx.replica is not None:
            stored = self.ctx.replica.tagged(stored, staged.count)
        if not self.ctx.store.add_update(stored):  # durable: the caller acknowledges after this
            raise closed_meanwhile()
        # Pace steering's job time: among replicas too, each from the reports it accepts.
        job = now - (a.delivered_at if a.delivered_at is not None else a.created_at)
        self._job_s[task.task_id] = 0.8 * self._job_s.get(task.task_id, job) + 0.2 * job
        if self.ctx.replica is not None:
            # This replica's partial buffer, written with the batch; the K-th update of the
            # round, from whichever replica, makes the commit due (tick).
            buf.apply(staged, commit=False)
            self.ctx.replica.fold(rnd.round_id, buf.state)
            return
        fold = buf.apply(staged)
        if fold.commit is not None:  # tick() commits it
            self._let_go(task.task_id)
            self._due[task.task_id] = (rnd.round_id, fold.commit)

    def _buffer_for_update(
        self, task: Task, plan: TaskPlan, now: float
    ) -> tuple[Task, Round, AsyncBuffer]:
        """The open buffer an update goes into. Among replicas, with the round's row lock
        held (the caller's transaction) and fewer than K updates stored: a full buffer is
        committed first (by this replica, or by the one holding it, waited for)."""
        for _ in range(4):
            state = self._state(task, plan, now)
            if state is None:
                raise Conflict("the task has completed", ErrorCode.ROUND_CLOSED)
            if self.ctx.replica is None:
                return state
            task, rnd = state[0], state[1]
            locked = self.ctx.store.lock_round(rnd.round_id)
            store = self.ctx.store
            if (
                locked is not None
                and locked.is_open
                and store.count_updates(rnd.round_id) < plan.buffer.buffer_k
            ):
                return state
            self._let_go(task.task_id)
        raise Overloaded("the update buffer is being committed; try again", 1.0)

    def accept_eval(self, task: Task, plan: TaskPlan, report: EvalReport, now: float) -> None:
        raise Conflict("async tasks run no evaluation rounds")

    def _commit(self, task: Task, plan: TaskPlan, rnd: Round, commit: Commit, now: float) -> None:
        # Among replicas, once: under the round's lock, from what the store holds then.
        # Not claimed as a sync close is (turn's closing): an upload that finds the buffer
        # full commits it inside its batch, and other replicas' batches wait for that batch
        # (a buffer of K is brief to commit) rather than being refused.
        with self.ctx.turn(rnd, wait=False) as mine:
            if mine is None:
                return  # committed already, or being committed by another replica
            due = commit if self.ctx.replica is None else self._shared(task, plan, mine)
            if due is not None:
                self._commit_buffer(task, plan, mine, due, now)

    def _commit_buffer(
        self, task: Task, plan: TaskPlan, rnd: Round, commit: Commit, now: float
    ) -> None:
        store = self.ctx.store
        task = self._task(task)
        n = self.ctx.num_parameters(task)
        agg = aggregate_updates(
            store, self.ctx.blobs, task, plan, rnd.round_id, n,
            streamed=lambda: commit.delta, staleness=plan.buffer.staleness,
        )  # fmt: skip
        totals = store.update_totals(rnd.round_id, agg.example_cap)
        metrics: dict[str, Any] = {
            "kind": "train",
            "mode": self.mode,
            "base_version": rnd.base_version,
            "goal": rnd.goal,
            "reported": commit.num_updates,
            "num_examples": commit.num_examples,
            "mean_staleness": commit.mean_staleness,
            "max_staleness": commit.max_staleness,
            "loss": totals.loss,
            "bytes_in": totals.payload_bytes,
            "bytes_out": self.ctx.bytes_out.get(task.task_id),
            "duration_s": now - rnd.opened_at,
            "outcome": "committed",
            "robust": agg.metrics,
        }
        too_old = commit.version - plan.buffer.staleness.max_staleness - 1

        def record(new_version: int) -> None:
            metrics["model_version"] = new_version
            store.update_round(rnd.round_id, state="committed", closed_at=now, metrics=metrics)
            done = task.rounds_completed + 1 >= plan.rounds
            # Assignments on versions now past the bound could only be refused: free their
            # slots; once the task completes, none can report.
            for old in store.list_rounds(task.task_id, min_base_version=0 if done else too_old):
                if old.base_version == too_old or done:
                    store.expire_assignments(old.round_id, now)
            self._advance(task, new_version, done)

        # Dropped whatever happens: after a failure the due commit is rebuilt from the store.
        self._let_go(task.task_id)
        self._due.pop(task.task_id, None)
        self.ctx.versions.commit_next(task, plan, n, agg.delta, rnd.round_id, now, also=record)
        self.ctx.round_closed(task.task_id, rnd.round_id)

    # -- time -------------------------------------------------------------------------------

    def tick(self, task: Task, plan: TaskPlan, now: float) -> None:
        self._state(task, plan, now, open_new=False)  # commits a full buffer
        task = self._task(task)
        if task.state == "completed":
            return
        # Among replicas, others issue assignments too: scan every tick.
        if self.ctx.replica is None and now < self._next_expiry.get(task.task_id, -math.inf):
            return
        self._expire_due(task, plan, self._in_flight(self._window(task, plan)), now)

    def _expire_due(
        self, task: Task, plan: TaskPlan, in_flight: Sequence[Assignment], now: float
    ) -> list[Assignment]:
        """Expire the assignments of ``in_flight`` (all the task's) past their deadline;
        returns the others, and notes the earliest deadline among them."""
        later, live = float("inf"), []
        for a in in_flight:
            due = (a.delivered_at or a.created_at) + plan.round_deadline_s
            if due <= now:
                # Only from in flight: another replica's batch may have stored its update
                # since the read, and "reported" stays.
                self.ctx.store.update_assignment(
                    a.assignment_id, only_from=IN_FLIGHT, state="expired", closed_at=now
                )
            else:
                later = min(later, due)
                live.append(a)
        self._next_expiry[task.task_id] = later
        return live
