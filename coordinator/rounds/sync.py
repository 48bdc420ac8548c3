"""Synchronous rounds: selection window, over-selection, configuration, reporting, commit.

A round of a task goes through::

    selecting ──(window over, >= goal candidates)──> reporting ──(goal reports)─> committed
        │                                         ▲     │
        ├─(timeout, >= min_reports candidates)────┘     └─(deadline)─> committed if >= min_reports
        └─(timeout, fewer)─> abandoned                                 abandoned otherwise

* **Selection.** The first eligible check-in opens a round (``window_ends_at = now +
  selection_window_s``). Eligible devices checking in during the window become candidates
  (at most ``target x max_candidates_factor``) and are told to come back just after it ends.
  Once the window is over and at least ``goal`` candidates came, ``target = ceil(goal x
  over_selection)`` of them are drawn uniformly at random and get assignments; the others
  are pace-steered away. Until ``goal`` candidates arrived the window stays open, but at most
  until ``opened_at + selection_timeout_s``: then the round starts with every candidate if at
  least ``min_reports`` came (it can still commit), else it is abandoned (``reason``
  ``selection_timeout`` in its metrics) and the next check-in opens a new window. A paused
  task's window neither selects nor times out.
* **First come** (plan ``first_come``, plain plans only): no window to draw from. The round
  opens straight into reporting (``deadline_at = opened_at + round_deadline_s``) and its first
  ``target`` eligible check-ins are assigned directly: no candidate checks in twice, and no
  round trip between the goal-th arrival and the cohort's assignments. Its candidates are the
  devices it took (each recorded with its assignment); the check-ins it turned away came
  after its draw, like those after a window's.
* **Configuration.** A selected device receives its assignment at its next check-in. While
  fewer than ``target`` assignments exist (too few candidates), later eligible check-ins are
  assigned directly until the deadline.
* **Straggler policy.** By default the round takes the first ``goal`` of ``target`` reports
  (over-selection). With ``wait_for_all`` the plan selects exactly ``goal`` devices and the
  round also ends as soon as none of them is still training (each reported or aborted).
* **Reporting** ends when ``goal`` updates were accepted (commit at once) or at ``deadline_at
  = selected_at + round_deadline_s``: commit if ``min_reports`` arrived, else abandon; the
  next check-in opens a new round on the same model version. Uploads for a closed round, or
  from assignments that expired or aborted, get ``409 round_closed``.
* **Secure aggregation** (plan ``secagg``, :mod:`coordinator.secagg.rounds`): the selected
  devices are the SecAgg+ session's cohort (no later fill-ins); after training they run its
  four stages instead of uploading, the first stage ending at ``deadline_at`` (or once
  ``goal`` devices advertised: over-selection), each later one ``secagg.stage_timeout_s``
  after the one before. The round commits the unmasked mean of the survivors, or is
  abandoned with the session's reason.
* **Evaluation rounds** (``kind = evaluate``, scheduled by the operator) run the same way on
  the current version; devices report metrics instead of updates, nothing is committed but
  the round's metrics.
"""

from __future__ import annotations

import math
import random
from typing import Any

import numpy as np

from coordinator.errors import Conflict, TaskFailure, Unprocessable
from coordinator.plan import TaskPlan
from coordinator.robust.clipping import example_cap
from coordinator.robust.commit import aggregate_updates
from coordinator.rounds.base import (
    IN_FLIGHT,
    TaskPolicy,
    assignment_json,
    closed_meanwhile,
    new_assignment_id,
)
from coordinator.rounds.base import wait_answer as _wait
from coordinator.secagg.rounds import SecAggRounds
from coordinator.store import (
    Assignment,
    EvalReport,
    Round,
    StoreError,
    Task,
    Update,
    UpdateTotals,
)
from coordinator.tensors import decode_delta
from edge_sdk.protocol import ErrorCode

__all__ = ["SyncRounds"]


class SyncRounds(TaskPolicy):
    mode = "sync"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._period: dict[str, float] = {}
        # Adaptive DP clipping bounds by (task, model version): each derived from the round
        # that made that version (durable), so a version's bound never changes.
        self._bounds: dict[tuple[str, int], float] = {}
        self.secagg = SecAggRounds(self.ctx)

    # -- check-in ---------------------------------------------------------------------------

    def check_in(self, task: Task, plan: TaskPlan, device_id: str, now: float) -> dict[str, Any]:
        store = self.ctx.store
        rnd = store.open_round(task.task_id)
        if rnd is not None:
            rnd = self._maybe_select(task, plan, rnd, now)  # may time the window out
            if rnd.metrics.get("stopped"):  # the privacy budget completed the task
                return _wait(self.steer(task, plan, now), "no_task")
        if rnd is None or not rnd.is_open:
            if task.state == "paused":
                return _wait(self.steer(task, plan, now), "paused")
            opened = self._open_round(task, plan, now)
            if opened is None:  # completed meanwhile (by another replica)
                return _wait(self.steer(task, plan, now), "no_task")
            rnd = opened
        mine = store.assignment_for(rnd.round_id, device_id)
        if mine is not None:
            if mine.state in IN_FLIGHT:
                return self._deliver(mine, rnd, task, plan, now)
            return _wait(self.steer(task, plan, now), "window_full")
        if task.state == "paused":
            return _wait(self.steer(task, plan, now), "paused")
        if rnd.state == "selecting":
            cap = math.ceil(rnd.target * plan.max_candidates_factor)
            if store.count_candidates(rnd.round_id) >= cap and device_id not in set(
                store.candidates(rnd.round_id)
            ):
                return _wait(self.steer(task, plan, now), "window_full")
            with store.relaxed_durability():  # a lost candidate checks in again
                store.add_candidate(rnd.round_id, device_id, now)
            rnd = self._maybe_select(task, plan, rnd, now)
            if rnd.state == "selecting":
                return _wait(self._until_selection(plan, rnd, now), "selecting")
            mine = store.assignment_for(rnd.round_id, device_id)
            if mine is not None:
                return self._deliver(mine, rnd, task, plan, now)
            return _wait(self.steer(task, plan, now), "window_full")
        # reporting: fill slots the window left empty (not under DP: the accountant assumes
        # a cohort drawn uniformly from the window's candidates, not first come)
        if (
            plan.dp is None
            and plan.secagg is None  # its cohort is fixed at selection
            and store.count_assignments(rnd.round_id) < rnd.target
            and (rnd.deadline_at or 0) > now
        ):
            # Among replicas, counted again under the round's lock: the target holds. First
            # come waits for the lock (an upload batch holds it for milliseconds): fills are
            # its only way in, and skipping would turn devices away from free slots.
            with self.ctx.turn(rnd, wait=plan.first_come) as locked:
                if locked is not None and (
                    self.ctx.replica is None
                    or (
                        store.count_assignments(rnd.round_id) < rnd.target
                        and store.assignment_for(rnd.round_id, device_id) is None
                    )
                ):
                    a = Assignment(
                        new_assignment_id(),
                        rnd.round_id,
                        task.task_id,
                        device_id,
                        rnd.kind,
                        "delivered",
                        now,
                        delivered_at=now,
                    )
                    # relaxed: its upload's commit syncs it
                    with store.relaxed_durability(), store.atomic():
                        if plan.first_come:  # no window: its candidates are those it takes
                            store.add_candidate(rnd.round_id, device_id, now)
                        store.add_assignments([a])
                    return self._assignment(a, rnd, task, plan, now)
        return _wait(self.steer(task, plan, now), "window_full")

    def _deliver(
        self, a: Assignment, rnd: Round, task: Task, plan: TaskPlan, now: float
    ) -> dict[str, Any]:
        if a.state == "selected":
            with self.ctx.store.relaxed_durability():  # a lost delivery is delivered again
                self.ctx.store.update_assignment(
                    a.assignment_id, only_from=("selected",), state="delivered", delivered_at=now
                )
        return self._assignment(a, rnd, task, plan, now)

    def _assignment(
        self, a: Assignment, rnd: Round, task: Task, plan: TaskPlan, now: float
    ) -> dict[str, Any]:
        answer = assignment_json(a, rnd, task, plan, now)
        if plan.dp is not None and plan.dp.adaptive is not None:
            # the device (Python SDK or Kotlin) clips to the plan's dp.clip: today's bound
            answer["assignment"]["plan"]["dp"]["clip"] = self._dp_bound(task, plan)
        return answer

    def _until_selection(self, plan: TaskPlan, rnd: Round, now: float) -> float:
        """When a candidate of a round still selecting should check in again."""
        if now < rnd.window_ends_at:
            return self.ctx.pacing.after_window(now, rnd.window_ends_at)
        # Never later than a quarter of the round's deadline from now: the rest may arrive
        # at once and select this candidate while it is away, and it must come back with
        # time left to train and report.
        latest = min(rnd.opened_at + plan.selection_timeout_s, now + plan.round_deadline_s / 4)
        return self.ctx.pacing.until_goal(
            now, rnd.opened_at, self.ctx.store.count_candidates(rnd.round_id), rnd.goal, latest
        )

    def steer(self, task: Task, plan: TaskPlan, now: float) -> float:
        return self.ctx.pacing.retry_after(now, plan.target, self._round_period(task, plan))

    def forget(self, task_id: str) -> None:
        super().forget(task_id)
        self._period.pop(task_id, None)
        self.secagg.forget(task_id)

    def _round_period(self, task: Task, plan: TaskPlan) -> float:
        if task.task_id not in self._period:
            # The last 5 closed rounds are among those on the last 5 versions (each version
            # was made by a round on the one before): no need to read the whole history.
            recent = self.ctx.store.list_rounds(task.task_id, task.model_version - 5)
            durations = [r.closed_at - r.opened_at for r in recent if r.closed_at is not None][-5:]
            self._period[task.task_id] = (
                sum(durations) / len(durations)
                if durations
                else plan.selection_window_s + plan.round_deadline_s
            )
        return max(1.0, self._period[task.task_id])

    def _open_round(self, task: Task, plan: TaskPlan, now: float) -> Round | None:
        return self._open_once(task, lambda t: self._new_round(t, plan, now))

    def _new_round(self, task: Task, plan: TaskPlan, now: float) -> Round | None:
        # What a check-in offers (the service's filter), as stored now: another replica may
        # have completed the task since.
        if task.state == "failed" or (task.state == "completed" and not task.pending_evaluations):
            return None
        evaluate = task.pending_evaluations > 0
        goal = (plan.eval_goal or plan.goal) if evaluate else plan.goal
        window = 0.0 if plan.first_come else plan.selection_window_s
        return Round(
            round_id=0,
            task_id=task.task_id,
            number=self._next_round_number(task),
            kind="evaluate" if evaluate else "train",
            state="reporting" if plan.first_come else "selecting",
            base_version=task.model_version,
            goal=goal,
            target=math.ceil(goal * plan.over_selection),
            min_reports=max(1, math.ceil(goal * plan.min_reporting_fraction)),
            opened_at=now,
            window_ends_at=now + window,
            selected_at=now if plan.first_come else None,
            deadline_at=now + plan.round_deadline_s if plan.first_come else None,
        )

    def _maybe_select(self, task: Task, plan: TaskPlan, rnd: Round, now: float) -> Round:
        if rnd.state != "selecting" or now < rnd.window_ends_at or task.state == "paused":
            return rnd
        with self.ctx.turn(rnd) as mine:
            if mine is not None and mine.state == "selecting":
                return self._select(task, plan, mine, now)
        out = self.ctx.store.get_round(rnd.round_id)  # another replica selected or closed it
        assert out is not None
        return out

    def _select(self, task: Task, plan: TaskPlan, rnd: Round, now: float) -> Round:
        store = self.ctx.store
        count = store.count_candidates(rnd.round_id)
        fewest = rnd.min_reports
        if plan.secagg is not None and rnd.kind == "train":
            fewest = max(fewest, 2)  # no SecAgg session has one device, whatever min_reports
        if count < rnd.goal:
            if now < rnd.opened_at + plan.selection_timeout_s:
                return rnd
            if count < fewest:
                return self._abandon_selection(task, plan, rnd, now)
        candidates = store.candidates(rnd.round_id)
        cohort = min(rnd.target, len(candidates))
        rng = self.ctx.rng
        if plan.dp is not None and rnd.kind == "train":
            if self._dp_would_exceed(task, plan, len(candidates), cohort):
                return self._stop_for_budget(task, plan, rnd, now)
            # Amplification by sampling needs a draw nobody can predict: not the seeded rng.
            rng = random.SystemRandom()
        if plan.secagg is not None and plan.secagg.dp is not None and rnd.kind == "train":
            # what the session commits with: never one survivor (fewest above), nor fewer
            # than its Shamir threshold; pricing it lower would stop a task that can pay
            fewest = max(fewest, plan.secagg.graph_parameters(cohort)[1])
            if self._ddp_would_exceed(task, plan, fewest):
                return self._stop_for_budget(task, plan, rnd, now)
        chosen = rng.sample(candidates, cohort)
        with store.atomic():
            store.add_assignments(
                [
                    Assignment(
                        new_assignment_id(),
                        rnd.round_id,
                        task.task_id,
                        d,
                        rnd.kind,
                        "selected",
                        now,
                    )
                    for d in chosen
                ]
            )
            if plan.secagg is not None and rnd.kind == "train":
                self.secagg.start(task, plan, rnd, chosen, now)
            store.update_round(
                rnd.round_id,
                state="reporting",
                selected_at=now,
                deadline_at=now + plan.round_deadline_s,
                # The population the cohort was drawn from: among replicas a check-in that
                # read the window open may store a candidate after this draw.
                metrics={"candidates": len(candidates)},
            )
        out = store.get_round(rnd.round_id)
        assert out is not None
        return out

    def _abandon_selection(self, task: Task, plan: TaskPlan, rnd: Round, now: float) -> Round:
        """Close a window that timed out with fewer than ``min_reports`` candidates."""
        metrics = self._metrics(task, plan, rnd, now)
        metrics.update(outcome="abandoned", reason="selection_timeout")
        self.ctx.store.update_round(rnd.round_id, state="abandoned", closed_at=now, metrics=metrics)
        self.ctx.round_closed(task.task_id, rnd.round_id)
        self._period.pop(task.task_id, None)
        out = self.ctx.store.get_round(rnd.round_id)
        assert out is not None
        return out

    # -- reporting --------------------------------------------------------------------------

    def check_upload(self, task: Task, plan: TaskPlan, assignment: Assignment, now: float) -> None:
        rnd = self.ctx.store.get_round(assignment.round_id)
        if rnd is None or rnd.state != "reporting" or assignment.state not in IN_FLIGHT:
            raise Conflict(
                f"round {rnd.number if rnd else '?'} of task {task.task_id} no longer takes "
                f"reports from this assignment ({assignment.state})",
                ErrorCode.ROUND_CLOSED,
            )
        if plan.secagg is not None and rnd.kind == "train":
            raise Conflict(
                "this task uses secure aggregation: send the masked update to "
                "/v1/assignments/{assignment_id}/secagg/mask (docs/protocol.md)",
                ErrorCode.SECAGG_STAGE,
            )
        if rnd.deadline_at is not None and now >= rnd.deadline_at:
            raise Conflict("the round's deadline has passed", ErrorCode.ROUND_CLOSED)

    def accept_update(
        self, task: Task, plan: TaskPlan, update: Update, delta: np.ndarray, now: float
    ) -> None:
        # Locked among replicas (the caller's transaction): the round cannot close, nor
        # another replica's upload count, between these checks and the write.
        rnd = self.ctx.store.lock_round(update.round_id)
        if rnd is not None and rnd.state != "reporting":
            raise Conflict("the round has closed", ErrorCode.ROUND_CLOSED)
        # A batch of uploads is accepted before the round closes: past the goal within one
        # batch, the round is as good as closed (the goal is also DP's fixed denominator).
        n = self.ctx.num_parameters(task)
        if rnd is not None and self.ctx.sums.stored(task.task_id, rnd.round_id, n) >= rnd.goal:
            raise Conflict("the round has reached its goal", ErrorCode.ROUND_CLOSED)
        try:  # rebuilt from the round's stored updates if not held
            staged = self.ctx.sums.stage(
                task.task_id, update.round_id, n, delta, update.num_examples
            )
        except ValueError as e:
            raise Unprocessable(f"update: {e}", ErrorCode.BAD_UPDATE) from e
        # Durable: the caller acknowledges after this.
        if not self.ctx.store.add_update(self.ctx.sums.tag(update, staged)):
            raise closed_meanwhile()
        self.ctx.sums.put(staged)

    def accept_eval(self, task: Task, plan: TaskPlan, report: EvalReport, now: float) -> None:
        store = self.ctx.store
        # Like an upload, under the round's lock among replicas: the goal bounds the reports
        # whichever replicas store them, and the round cannot close in between.
        with store.atomic():
            rnd = store.lock_round(report.round_id)
            # First: a retry that reached this replica while another stored its first try
            # (the caller found none) is that report, whatever happened to the round since.
            prior = store.get_eval_report(report.assignment_id)
            if prior is not None:
                if prior.same_figures(report.num_examples, report.loss, report.accuracy):
                    return
                raise Conflict("this assignment already reported", ErrorCode.DUPLICATE_UPLOAD)
            if rnd is not None and rnd.state != "reporting":
                raise Conflict("the round has closed", ErrorCode.ROUND_CLOSED)
            if rnd is not None and self._reports(rnd) >= rnd.goal:
                raise Conflict("the round has reached its goal", ErrorCode.ROUND_CLOSED)
            try:
                stored = store.add_eval_report(report)
            except StoreError as e:  # among replicas: the same report, stored by another
                raise Conflict(
                    "this assignment already reported", ErrorCode.DUPLICATE_UPLOAD
                ) from e
            if not stored:
                raise closed_meanwhile()

    def tick(self, task: Task, plan: TaskPlan, now: float) -> None:
        rnd = self.ctx.store.open_round(task.task_id)
        if rnd is None:
            return
        rnd = self._maybe_select(task, plan, rnd, now)
        if rnd.state != "reporting":
            return
        if plan.secagg is not None and rnd.kind == "train":
            if self.secagg.tick(task, rnd, now).done:
                self._close(task, plan, rnd, now)
            return
        reports = self._reports(rnd)
        if (
            reports >= rnd.goal
            or (rnd.deadline_at is not None and now >= rnd.deadline_at)
            or self._all_settled(plan, rnd)
        ):
            self._close(task, plan, rnd, now)

    def _all_settled(self, plan: TaskPlan, rnd: Round) -> bool:
        """With ``wait_for_all``: every selected device reported or gave up (aborted)."""
        return plan.wait_for_all and not self.ctx.store.open_assignments([rnd.round_id])

    def _reports(self, rnd: Round) -> int:
        if rnd.kind == "evaluate":
            return len(self.ctx.store.round_eval_reports(rnd.round_id))
        return self.ctx.store.count_updates(rnd.round_id)

    # -- closing ----------------------------------------------------------------------------

    def _close(self, task: Task, plan: TaskPlan, rnd: Round, now: float) -> None:
        # Among replicas, skipped while another one holds the round: it is closing it, or
        # storing an upload (the next tick tries again).
        with self.ctx.turn(rnd, wait=False, closing=True) as mine:
            if mine is not None:
                self._close_round(task, plan, mine, now)

    def _close_round(self, task: Task, plan: TaskPlan, rnd: Round, now: float) -> None:
        store = self.ctx.store
        task = store.get_task(task.task_id) or task
        metrics = self._metrics(task, plan, rnd, now)
        secagg = None
        if plan.secagg is not None and rnd.kind == "train":
            secagg = self.secagg.session(task, rnd)
            metrics.update(secagg.metrics())
            metrics["dropouts"] = metrics["participants"] - metrics["reported"]
        success = metrics["reported"] >= rnd.min_reports
        if secagg is not None and secagg.result is None:
            success = False
        if rnd.kind == "evaluate":
            metrics["outcome"] = "completed" if success else "abandoned"
            if not success:
                metrics["reason"] = "too_few_reports"
            with store.atomic():
                store.update_round(
                    rnd.round_id, state=metrics["outcome"], closed_at=now, metrics=metrics
                )
                store.expire_assignments(rnd.round_id, now)
                if success:
                    # Under the task's lock: another replica may have counted a new request.
                    fresh = store.lock_task(task.task_id) or task
                    store.update_task(
                        task.task_id, pending_evaluations=max(0, fresh.pending_evaluations - 1)
                    )
        elif success:
            n = self.ctx.num_parameters(task)
            metrics["outcome"] = "committed"
            if plan.dp is not None:
                delta = self._dp_mean(task, plan, rnd, n, metrics)
            elif secagg is not None and secagg.result is not None:
                # the server never saw one update; with distributed DP, nor an un-noised sum
                delta = (
                    secagg.result.mean
                    if plan.secagg is None or plan.secagg.dp is None
                    else self._ddp_mean(task, plan, rnd, secagg, n, metrics)
                )
            else:
                # The streaming sum only when undefended FedAvg asks for it: among replicas (or
                # after a restart) getting it adds up partial sums and decodes payloads, which
                # a defended commit reads back itself.
                agg = aggregate_updates(
                    store, self.ctx.blobs, task, plan, rnd.round_id, n,
                    streamed=lambda: self.ctx.sums.get(task.task_id, rnd.round_id, n).mean(),
                )  # fmt: skip
                metrics["robust"] = agg.metrics
                if agg.example_cap is not None:
                    capped = store.update_totals(rnd.round_id, agg.example_cap)
                    metrics.update(loss=capped.loss, accuracy=capped.accuracy)
                delta = agg.delta

            def record(new_version: int) -> None:
                metrics["model_version"] = new_version
                store.update_round(rnd.round_id, state="committed", closed_at=now, metrics=metrics)
                if secagg is not None:
                    self.secagg.mark_reported(rnd, secagg, now)
                store.expire_assignments(rnd.round_id, now)
                done = task.rounds_completed + 1 >= plan.rounds or "stopped" in metrics
                self._advance(task, new_version, done)

            self.ctx.versions.commit_next(task, plan, n, delta, rnd.round_id, now, also=record)
        else:
            reason = secagg.reason if secagg is not None and secagg.reason else "too_few_reports"
            metrics.update(outcome="abandoned", reason=reason)
            with store.atomic():
                store.update_round(rnd.round_id, state="abandoned", closed_at=now, metrics=metrics)
                store.expire_assignments(rnd.round_id, now)
        self.ctx.sums.drop(rnd.round_id)
        self.secagg.drop(rnd.round_id)
        self.ctx.round_closed(task.task_id, rnd.round_id)
        self._period.pop(task.task_id, None)

    # -- differential privacy (coordinator.privacy) -------------------------------------------

    def _dp_record(self, task: Task) -> dict[str, Any] | None:
        """``metrics["dp"]`` of the round that made the current version (None at version 0)."""
        if task.model_version == 0:
            return None
        recent = self.ctx.store.list_rounds(task.task_id, task.model_version - 1)
        for r in reversed(recent):
            made = r.metrics.get("model_version") == task.model_version
            if r.state == "committed" and made and "dp" in r.metrics:
                return dict(r.metrics["dp"])
        # Starting from an empty ledger would understate what the task has spent.
        raise TaskFailure(
            f"the privacy ledger of task {task.task_id} is lost (the round that made version "
            f"{task.model_version} is gone): refusing to release more rounds"
        )

    def _dp_bound(self, task: Task, plan: TaskPlan) -> float:
        """The clipping bound of the task's next round: the plan's ``dp.clip``, or with
        adaptive clipping the bound the last DP commit chose (the plan's before the first)."""
        assert plan.dp is not None
        if plan.dp.adaptive is None:
            return plan.dp.clip
        key = (task.task_id, task.model_version)
        if key not in self._bounds:
            before = self._dp_record(task)
            bound = plan.dp.clip if before is None else float(before["clip_next"])
            self._bounds = {k: v for k, v in self._bounds.items() if k[0] != task.task_id}
            self._bounds[key] = bound
        return self._bounds[key]

    def _dp_ledger(self, task: Task, plan: TaskPlan, population: int, cohort: int) -> Any:
        """``(this round, the ledger before it, the DP rounds released before it)``."""
        from coordinator import privacy  # the privacy extra; a DP plan validated with it

        assert plan.dp is not None
        this = plan.dp.round(population, cohort)
        before = self._dp_record(task)
        released = 0 if before is None else int(before["rounds"])
        return this, privacy.ledger_after(plan.dp.delta, before), released

    def _dp_would_exceed(self, task: Task, plan: TaskPlan, population: int, cohort: int) -> bool:
        assert plan.dp is not None
        if plan.dp.budget is None:
            return False
        this, ledger, _ = self._dp_ledger(task, plan, population, cohort)
        return bool(ledger.would_exceed(this, plan.dp.budget))

    def _stop_for_budget(self, task: Task, plan: TaskPlan, rnd: Round, now: float) -> Round:
        """Complete the task instead of selecting a round its privacy budget cannot pay for."""
        from coordinator.privacy import BUDGET_REASON

        store = self.ctx.store
        metrics = self._metrics(task, plan, rnd, now)
        metrics.update(outcome="abandoned", reason=BUDGET_REASON, stopped=BUDGET_REASON)
        with store.atomic():
            store.update_round(rnd.round_id, state="abandoned", closed_at=now, metrics=metrics)
            store.update_task(task.task_id, state="completed")
        self.ctx.round_closed(task.task_id, rnd.round_id)
        self._period.pop(task.task_id, None)
        out = store.get_round(rnd.round_id)
        assert out is not None
        return out

    def _dp_mean(
        self, task: Task, plan: TaskPlan, rnd: Round, n: int, metrics: dict[str, Any]
    ) -> np.ndarray:
        """The noised DP-FedAvg mean of the round's updates; records the round's privacy
        cost in ``metrics`` (stored with the version), and ``stopped`` if the task cannot
        afford another such round."""
        from coordinator import privacy

        assert plan.dp is not None
        # The window's candidates are the eligible population the cohort was drawn from
        # (docs/protocol.md, "Differential privacy"); every assignment was drawn from them.
        this, ledger, released = self._dp_ledger(
            task, plan, metrics["candidates"], max(1, metrics["participants"])
        )
        ledger = ledger.plus(this)
        store, blobs = self.ctx.store, self.ctx.blobs
        spec = plan.dp.at_bound(self._dp_bound(task, plan))
        result = privacy.noised_mean(
            (decode_delta(blobs.read(u.payload_sha), n) for u in store.round_updates(rnd.round_id)),
            n,
            spec,
            rnd.goal,
        )
        adaptive = None
        if plan.dp.adaptive is not None:
            adaptive = plan.dp.next_bound(spec.clip, result.unclipped, rnd.goal)
        metrics["dp"] = privacy.round_record(
            spec, ledger, this, result, rnd.goal, released, adaptive
        )
        budget = plan.dp.budget
        exceeds = budget is not None and ledger.would_exceed(this, budget)
        self._dp_released(task, plan, metrics, exceeds)
        return result.mean

    def _dp_released(
        self, task: Task, plan: TaskPlan, metrics: dict[str, Any], next_exceeds: bool
    ) -> None:
        """What every DP commit adds to its metrics besides its record."""
        from coordinator.privacy import BUDGET_REASON

        # The devices' training loss and accuracy carry no noise: published with the round,
        # they would escape the ledger.
        metrics.update(loss=None, accuracy=None)
        # The plan's last round completes the task anyway: no budget stop to report.
        if next_exceeds and task.rounds_completed + 1 < plan.rounds:
            metrics["stopped"] = BUDGET_REASON

    # -- distributed DP (coordinator.secagg.dp): the devices noised the sum in the ring --------

    def _ddp_ledger(self, task: Task, plan: TaskPlan) -> Any:
        """``(the ledger before this round, the DP rounds released before it)``."""
        from coordinator import privacy

        assert plan.secagg is not None and plan.secagg.dp is not None
        before = self._dp_record(task)
        released = 0 if before is None else int(before["rounds"])
        return privacy.ledger_after(plan.secagg.dp.delta, before), released

    def _ddp_would_exceed(self, task: Task, plan: TaskPlan, fewest: int) -> bool:
        from coordinator.secagg.dp import ledger_plus

        assert plan.secagg is not None and plan.secagg.dp is not None
        dp = plan.secagg.dp
        if dp.budget is None:
            return False
        ledger, _ = self._ddp_ledger(task, plan)
        this = dp.rdp(self.ctx.num_parameters(task), fewest)
        return bool(ledger_plus(ledger, this).epsilon() > dp.budget)

    def _ddp_mean(
        self, task: Task, plan: TaskPlan, rnd: Round, session: Any, n: int,
        metrics: dict[str, Any],
    ) -> np.ndarray:  # fmt: skip
        """The unmasked noisy sum over the fixed denominator (the round's goal, every device
        at full weight); records the round's privacy cost, accounted with the fewest
        survivors the session could have committed with."""
        from coordinator.secagg.dp import ledger_plus, round_record

        assert plan.secagg is not None and plan.secagg.dp is not None
        dp, result = plan.secagg.dp, session.result
        ledger, released = self._ddp_ledger(task, plan)
        this = dp.rdp(n, session.min_survivors)
        ledger = ledger_plus(ledger, this)
        metrics["dp"] = round_record(
            dp, ledger, dim=n, min_survivors=session.min_survivors,
            survivors=len(result.survivors), cohort=len(session.devices), goal=rnd.goal,
            released=released,
        )  # fmt: skip
        exceeds = dp.budget is not None and ledger_plus(ledger, this).epsilon() > dp.budget
        self._dp_released(task, plan, metrics, exceeds)
        mean: np.ndarray = result.weighted_sum / (session.spec.max_weight * rnd.goal)
        return mean

    def _metrics(self, task: Task, plan: TaskPlan, rnd: Round, now: float) -> dict[str, Any]:
        """A closing round's metrics, from aggregate queries (no per-update rows in memory)."""
        store = self.ctx.store
        states = store.assignment_counts(rnd.round_id)
        if rnd.kind == "evaluate":
            reports = store.round_eval_reports(rnd.round_id)
            # Capped as a defended commit caps its updates' weights (aggregate_updates):
            # one device declaring a huge count must not set the task's evaluation figures.
            cap = example_cap(plan.robust, [r.num_examples for r in reports])
            weighed = [(r, min(float(r.num_examples), cap)) for r in reports]
            totals = UpdateTotals(
                count=len(reports),
                num_examples=sum(r.num_examples for r in reports),
                loss_sum=sum(r.loss * w for r, w in weighed),
                loss_weight=sum(w for _, w in weighed),
                accuracy_sum=sum((r.accuracy or 0.0) * w for r, w in weighed),
                accuracy_weight=sum(w for r, w in weighed if r.accuracy is not None),
            )
        else:
            totals = store.update_totals(rnd.round_id)
        participants = sum(states.values())
        drawn = rnd.metrics.get("candidates")
        return {
            "kind": rnd.kind,
            "base_version": rnd.base_version,
            "goal": rnd.goal,
            "target": rnd.target,
            # the draw's population, which DP accounts the round with (recorded at selection)
            "candidates": drawn if drawn is not None else store.count_candidates(rnd.round_id),
            "participants": participants,
            "reported": totals.count,
            "dropouts": participants - totals.count,
            "aborted": states.get("aborted", 0),
            "num_examples": totals.num_examples,
            "loss": totals.loss,
            "accuracy": totals.accuracy,
            "bytes_in": totals.payload_bytes,
            "bytes_out": self.ctx.bytes_out.get(task.task_id),
            "duration_s": now - rnd.opened_at,
            "selection_s": (rnd.selected_at or now) - rnd.opened_at,
            "reporting_s": now - (rnd.selected_at or now),
        }
