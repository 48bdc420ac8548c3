"""A task's round history as the dashboard polls it: read from the store, kept where it is final.

A dashboard left open asks every two seconds, on the worker thread that also serves the
devices; reading every round and assignment each time would cost that thread more the longer a
task runs. What can no longer change is read once:

* a round that has closed and whose every assignment reached a final state (reported, aborted,
  expired) keeps its facts (assignments, candidates, update staleness, funnel counts) and its
  table row (recomputed only when an upload refusal, which may name one of its assignments,
  was counted since): :class:`RoundFacts`;
* a task's list of closed rounds, with the funnel, staleness and versions summed over its
  settled ones, is kept while the task's open round, version and counters stay as they were
  (a round closing or opening changes them) and for at most :data:`RELIST_S` seconds, after
  which the list is read again (retention deletes old rounds: they leave the views then).

An async buffer's assignments may still report after the buffer closed: such a round is read
again at every poll until they settle. Memory only; after a restart the first poll reads all.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from coordinator.dashboard.funnel import LATE_CODES, FunnelCounts
from coordinator.rounds.base import IN_FLIGHT

if TYPE_CHECKING:
    from coordinator.store import Assignment, Round, Store, Task

__all__ = ["RELIST_S", "History", "RoundFacts"]

RELIST_S = 30.0


@dataclass
class Facts:
    task_id: str
    assignments: list[Assignment]
    candidates: int
    staleness: Counter[int]
    funnel: FunnelCounts
    expired: list[str]  # training assignments that expired (a late upload may name one)
    # The round's row as last built, and the refusal count it was built at.
    row: dict[str, Any] | None = None
    row_version: int = -1


@dataclass
class History:
    """A task's rounds (oldest first, the open one last) and their sums."""

    rounds: list[Round]
    funnel: FunnelCounts
    staleness: Counter[int]
    versions: dict[int, dict[str, Any]]  # model version -> train / evaluation loss, accuracy


@dataclass
class _Listing:
    signature: tuple[Any, ...]
    read_at: float
    closed: list[Round]
    pending: list[Round]  # closed, but an assignment may still report
    funnel: FunnelCounts = field(default_factory=FunnelCounts)  # over the settled ones
    staleness: Counter[int] = field(default_factory=Counter)
    expired: list[str] = field(default_factory=list)
    late: int = 0  # how many of ``expired`` uploaded late, as of refusal count ``late_at``
    late_at: int = -1
    versions: dict[int, dict[str, Any]] = field(default_factory=dict)


class RoundFacts:
    """See the module docstring. One per app; used from the worker thread only."""

    def __init__(self, store: Store, clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self._clock = clock
        self._settled: dict[int, Facts] = {}
        self._listings: dict[str, _Listing] = {}

    def get(self, rnd: Round) -> Facts:
        known = self._settled.get(rnd.round_id)
        if known is not None:
            return known
        assignments = self.store.round_assignments(rnd.round_id)
        staleness: Counter[int] = Counter(
            int(u.report["staleness"]) for u in self.store.round_updates(rnd.round_id)
            if "staleness" in u.report
        )
        funnel = FunnelCounts()
        expired = []
        if rnd.kind == "train":
            for a in assignments:
                funnel.add(a)
                if a.state == "expired" and a.delivered_at is not None:
                    expired.append(a.assignment_id)
        facts = Facts(rnd.task_id, assignments, self.store.count_candidates(rnd.round_id),
                      staleness, funnel, expired)
        if not rnd.is_open and not any(a.state in IN_FLIGHT for a in assignments):
            self._settled[rnd.round_id] = facts
        return facts

    def row(
        self, rnd: Round, version: int, build: Callable[[Round, Facts], dict[str, Any]]
    ) -> dict[str, Any]:
        """``build(rnd, facts)``, kept for a settled round while ``version`` stays the same."""
        facts = self.get(rnd)
        if facts.row is not None and facts.row_version == version:
            return facts.row
        row = build(rnd, facts)
        if rnd.round_id in self._settled:
            facts.row, facts.row_version = row, version
        return row

    def history(
        self, task: Task, refused: Mapping[str, str] | None = None, refusals: int = 0
    ) -> History:
        """The task's rounds and sums; with ``refused`` (assignment id -> the error code of its
        refused upload, ``refusals`` counting them), late uploads count in the funnel."""
        open_round = self.store.open_round(task.task_id)
        signature = (
            task.state, task.model_version, task.rounds_completed, task.pending_evaluations,
            None if open_round is None else open_round.round_id,
        )
        listing = self._listings.get(task.task_id)
        if (
            listing is None
            or listing.signature != signature
            or self._clock() - listing.read_at > RELIST_S
        ):
            listing = self._list(task, signature)
        funnel = FunnelCounts().merge(listing.funnel)
        staleness = Counter(listing.staleness)
        live = listing.pending + ([] if open_round is None else [open_round])
        late = 0
        if refused is not None:
            if listing.late_at != refusals:
                listing.late = sum(refused.get(a) in LATE_CODES for a in listing.expired)
                listing.late_at = refusals
            late = listing.late
        for rnd in live:
            facts = self.get(rnd)
            funnel.merge(facts.funnel)
            staleness.update(facts.staleness)
            if refused is not None:
                late += sum(refused.get(a) in LATE_CODES for a in facts.expired)
        funnel.count_late(late)
        return History(listing.closed + ([] if open_round is None else [open_round]), funnel,
                       staleness, listing.versions)

    def _list(self, task: Task, signature: tuple[Any, ...]) -> _Listing:
        listed = self.store.list_rounds(task.task_id)
        ids = {r.round_id for r in listed}
        for round_id in [i for i, f in self._settled.items()
                         if f.task_id == task.task_id and i not in ids]:
            del self._settled[round_id]  # deleted by retention
        closed = [r for r in listed if not r.is_open]
        listing = _Listing(signature, self._clock(), closed, [])
        for rnd in closed:
            facts = self.get(rnd)
            if rnd.round_id in self._settled:
                listing.funnel.merge(facts.funnel)
                listing.staleness.update(facts.staleness)
                listing.expired.extend(facts.expired)
            else:
                listing.pending.append(rnd)
            m = rnd.metrics
            if rnd.kind == "train" and rnd.state == "committed" and "model_version" in m:
                v = listing.versions.setdefault(m["model_version"],
                                                {"version": m["model_version"]})
                v["train_loss"] = m.get("loss")
            elif rnd.kind == "evaluate" and rnd.state == "completed":
                v = listing.versions.setdefault(rnd.base_version, {"version": rnd.base_version})
                v["eval_loss"], v["eval_accuracy"] = m.get("loss"), m.get("accuracy")
        self._listings[task.task_id] = listing
        return listing
